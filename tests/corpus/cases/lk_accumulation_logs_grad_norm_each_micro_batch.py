"""Gradient accumulation that logs the running gradient norm after every micro-batch (what a
Lightning ``on_after_backward`` hook that logs ``grad_norm`` does with
``accumulate_grad_batches``): ``.grad`` is read between backward passes of one window, then one
step uses the sum. Correct: the reads are of a running sum, and the sum is what is applied.

Source: https://lightning.ai/docs/pytorch/stable/common/lightning_module.html#on-after-backward
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://lightning.ai/docs/pytorch/stable/common/lightning_module.html#on-after-backward"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norms = []
    with watch(model, optimizer):
        for _ in range(3):
            for _micro in range(4):
                loss = model(torch.randn(8, 4)).pow(2).mean() / 4
                loss.backward()
                norms.append(sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5)
            optimizer.step()
            optimizer.zero_grad()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
