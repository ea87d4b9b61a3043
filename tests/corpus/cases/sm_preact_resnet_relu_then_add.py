"""torchvision's BasicBlock with ``nn.ReLU(inplace=True)``: the maintainer's example of where
in-place ReLU is *not* safe -- swapping the residual sum and the ReLU (pre-activation style),
``out = self.relu(out); out += identity``, overwrites the ReLU output that ReLU's backward
needs: "one of the variables needed for gradient computation has been modified by an inplace
operation".

Source: https://github.com/pytorch/vision/issues/807
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/vision/issues/807"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated", tensor="tensor float32[2,4,6,6]", raises=True)
KNOWN_MISS = {}


class BasicBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn1(self.conv1(x))
        out = self.relu(out)
        out += identity  # <- culprit
        return out


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = BasicBlock()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer):
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(torch.randn(2, 4, 6, 6)).pow(2).mean()
            try:
                loss.backward()
            except RuntimeError as err:
                return err
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
