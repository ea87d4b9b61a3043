"""Correct: word_language_model's manual SGD, ``p.data.add_(p.grad, alpha=-lr)`` for every
parameter after ``model.zero_grad()``, backward and gradient clipping (the PR moved the update to
``.data`` because the in-place update of a leaf raised).

Source: https://github.com/pytorch/examples/pull/779
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/examples/pull/779"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
    lr = 20.0
    with watch(model):
        for _ in range(3):
            data, targets = torch.randint(0, 10, (5,)), torch.randint(0, 10, (5,))
            model.zero_grad()
            output = model(data)
            loss = nn.functional.cross_entropy(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
