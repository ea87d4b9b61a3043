"""Correct: HyperStyle's coach runs several refinement iterations per batch, each with
its own forward, loss and ``loss.backward()``, and takes a single optimizer step for all of
them (the maintainer: the backward calls accumulate the gradients across the iterative steps).

Source: https://github.com/yuval-alaluf/hyperstyle/issues/40
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/yuval-alaluf/hyperstyle/issues/40"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = nn.Linear(6, 6)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    with watch(net, optimizer):
        for x in [torch.randn(2, 6)] * 2:
            optimizer.zero_grad()
            y_hat = x
            for _iter in range(3):
                y_hat = net(y_hat.detach())
                loss = (y_hat - x).pow(2).mean()
                loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
