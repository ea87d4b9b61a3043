"""Correct: the two-layer net with autograd, updated by hand and zeroed after each
update (``w1.data -= learning_rate * w1.grad.data`` then ``w1.grad.data.zero_()``), as the PR's
reviewer suggested.

Source: https://github.com/jcjohnson/pytorch-examples/pull/4
"""
from contextlib import nullcontext

import torch

SOURCE = "https://github.com/jcjohnson/pytorch-examples/pull/4"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    x, y = torch.randn(8, 10), torch.randn(8, 3)
    w1 = torch.randn(10, 6, requires_grad=True)
    w2 = torch.randn(6, 3, requires_grad=True)
    learning_rate = 1e-6
    with watch():
        for _t in range(3):
            y_pred = x.mm(w1).clamp(min=0).mm(w2)
            loss = (y_pred - y).pow(2).sum()
            loss.backward()
            w1.data -= learning_rate * w1.grad.data
            w2.data -= learning_rate * w2.grad.data
            w1.grad.data.zero_()
            w2.grad.data.zero_()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
