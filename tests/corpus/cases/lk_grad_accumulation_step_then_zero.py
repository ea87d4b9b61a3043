"""Correct: the fixed gradient-accumulation recipe from the Ignite FAQ discussion --
``loss / accumulation_steps``, backward every iteration, then ``optimizer.step()`` and
``optimizer.zero_grad()`` every ``accumulation_steps`` iterations.

Source: https://github.com/pytorch/ignite/issues/583
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/ignite/issues/583"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.MSELoss()
    accumulation_steps = 2
    with watch(model, optimizer):
        for iteration in range(1, 7):
            x, y = torch.randn(4, 4), torch.randn(4, 1)
            loss = criterion(model(x), y) / accumulation_steps
            loss.backward()
            if iteration % accumulation_steps == 0:
                optimizer.step()
                optimizer.zero_grad()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
