"""ECO-pytorch: with ``iter_size > 1`` the optimizer step was performed outside the
``if (i+1) % iter_size == 0`` clause, i.e. after every batch, while ``zero_grad()`` ran only
inside it; the PR "fixes duplicate optimizer step when using iter_size > 1".

Source: https://github.com/mzolfaghari/ECO-pytorch/pull/1
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/mzolfaghari/ECO-pytorch/pull/1"
FAMILY = "stale_grad_accumulation"
EXPECT = dict(kind="stale_grad_accumulation", tensor="fc.weight")
KNOWN_MISS = {}


class ECO(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.base(x).mean(dim=(2, 3)))


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = ECO()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    iter_size = 2
    with watch(model, optimizer):
        optimizer.zero_grad()
        for i, (inp, target) in enumerate([(torch.rand(2, 3, 6, 6), torch.tensor([1, 3]))] * 4):
            loss = criterion(model(inp), target) / iter_size
            loss.backward()  # <- culprit
            if (i + 1) % iter_size == 0:
                optimizer.zero_grad()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
