"""Correct: tez's train step runs the forward pass first and calls
``optimizer.zero_grad()`` only afterwards, before ``backward()`` (the user thought zero_grad must
precede the forward; it only has to precede backward).

Source: https://github.com/abhishekkrthakur/tez/issues/38
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/abhishekkrthakur/tez/issues/38"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model, optimizer):
        for batch in [torch.randn(3, 4)] * 3:
            output = model(batch)
            loss = output.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
