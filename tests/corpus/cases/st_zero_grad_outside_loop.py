"""corr_based_prediction main.py: ``zero_grad()`` is called once, outside the training stage,
"the gradients will be accumulated along the training data": each ``backward()`` adds to the
gradient of previous batches, taken at weights that the optimizer has since changed.

Source: https://github.com/salesforce/corr_based_prediction/issues/1
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/salesforce/corr_based_prediction/issues/1"
FAMILY = "stale_grad_accumulation"
EXPECT = dict(kind="stale_grad_accumulation", tensor="0.weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    with watch(model, optimizer):
        optimizer.zero_grad()
        for data, target in [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3:
            loss = criterion(model(data), target)
            loss.backward()  # <- culprit
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
