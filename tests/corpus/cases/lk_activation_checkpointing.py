"""Correct: activation checkpointing -- ``torch.utils.checkpoint.checkpoint(block, x,
use_reentrant=False)`` drops the block's activations in forward and recomputes them in
backward (the issue rolls out this non-reentrant implementation); weights are stepped after.

Source: https://github.com/pytorch/pytorch/issues/65537
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/pytorch/issues/65537"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block1 = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6))
    block2 = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2))
    model = nn.Sequential(block1, block2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with watch(model, optimizer):
        for _ in range(3):
            x = torch.randn(4, 6)
            h = checkpoint(block1, x, use_reentrant=False)
            out = checkpoint(block2, h, use_reentrant=False)
            loss = out.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
