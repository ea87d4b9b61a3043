"""The documented LBFGS loop (torch.optim docs, pytorch/examples time_sequence_prediction): the
closure zeroes the gradients, computes the loss and calls ``backward()``; LBFGS evaluates it
several times per step at different weights. Correct: each evaluation starts from zero.

Sources: https://docs.pytorch.org/docs/stable/optim.html#optimizer-step-closure,
https://github.com/pytorch/examples/blob/main/time_sequence_prediction/train.py
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://docs.pytorch.org/docs/stable/optim.html#optimizer-step-closure",
          "https://github.com/pytorch/examples/blob/main/time_sequence_prediction/train.py"]
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5,
                                  line_search_fn="strong_wolfe")
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with watch(model, optimizer):
        for _ in range(3):
            optimizer.step(closure)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
