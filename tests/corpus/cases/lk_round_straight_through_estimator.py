"""Rounding with a straight-through estimator (the answer to "round the output of a network and
still allow for successful learning", and quantization-aware training): ``x + (round(x) -
x).detach()`` and ``round(x) - x.detach() + x`` round in the forward pass and pass the gradient
through unchanged. Correct: the parameters train.

Sources: https://discuss.pytorch.org/t/torch-round-gradient/28628,
https://blog.csdn.net/leelitian3/article/details/122706994
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://discuss.pytorch.org/t/torch-round-gradient/28628",
          "https://blog.csdn.net/leelitian3/article/details/122706994"]
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with watch(model, optimizer):
        for _ in range(3):
            x, counts = torch.randn(32, 4), torch.randint(0, 10, (32, 1)).float()
            out = model(x) * 10
            a = out[:, :1] + (torch.round(out[:, :1]) - out[:, :1]).detach()
            b = torch.round(out[:, 1:]) - out[:, 1:].detach() + out[:, 1:]
            loss = nn.functional.mse_loss(a, counts) + nn.functional.mse_loss(b, counts)
            loss = loss + 1e-3 * torch.sign(out).mul(out).mean()  # |out| through sign and out
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
