"""gpt-neox training.py (2021): with gradient accumulation the parameters are stepped inside
the micro-batch loop, after every backward, while the gradients are zeroed once per
accumulation window: "If step() works inside the loop, the parameter will be updated every time
backward" -- and each later backward adds to gradients taken before those updates.

Source: https://github.com/EleutherAI/gpt-neox/issues/405
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/EleutherAI/gpt-neox/issues/405"
FAMILY = "stale_grad_accumulation"
EXPECT = dict(kind="stale_grad_accumulation", tensor="weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(6, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gradient_accumulation_steps = 3
    with watch(model, optimizer):
        for _iteration in range(2):
            optimizer.zero_grad()
            for _micro in range(gradient_accumulation_steps):
                loss = model(torch.randn(4, 6)).pow(2).mean() / gradient_accumulation_steps
                loss.backward()  # <- culprit
                optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
