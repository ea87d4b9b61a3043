"""ContentWeightedCNN (2018): a residual block whose ``self.left`` branch ends in
``nn.ReLU(inplace=True)``, followed by ``out += residual``: the in-place sum overwrites the ReLU
output that ReLU's backward reads. PyTorch said nothing at the time and "the loss goes to
hundreds of thousands"; today backward raises the in-place version error.

Source: https://github.com/pytorch/pytorch/issues/5687
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/pytorch/issues/5687"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated", tensor="tensor float32[1,4,6,6]", raises=True)
KNOWN_MISS = {}


class ResidualBlock(nn.Module):
    def __init__(self, ch_in, ch_out, shortcut=None):
        super().__init__()
        self.left = nn.Sequential(
            nn.Conv2d(ch_in, 8, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, ch_out, 3, 1, 1),
            nn.ReLU(inplace=True),
        )
        self.right = shortcut

    def forward(self, x):
        out = self.left(x)
        residual = x if self.right is None else self.right(x)
        out += residual  # <- culprit
        return nn.functional.relu(out, inplace=False)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = ResidualBlock(4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model, optimizer):
        for x in [torch.randn(1, 4, 6, 6)] * 2:
            optimizer.zero_grad()
            loss = (model(x) - x).pow(2).mean()
            try:
                loss.backward()
            except RuntimeError as err:
                return err
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
