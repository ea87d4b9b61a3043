"""snake activation: with ``a`` initialised as ``Parameter(...).squeeze()`` in one branch, the
module attribute is a plain (non-leaf) tensor, not a registered parameter: gradients reach the
hidden Parameter on every backward, but no optimizer holds it, so "the ``a`` parameters were not
updated"; the fix applies ``squeeze()`` inside ``Parameter()``.

Source: https://github.com/EdwardDixon/snake/pull/2
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import Parameter

SOURCE = "https://github.com/EdwardDixon/snake/pull/2"
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied", tensor="tensor float32[1,4]")
KNOWN_MISS = {}


class Snake(nn.Module):
    def __init__(self, in_features, a=None):
        super().__init__()
        if a is not None:
            self.a = Parameter(torch.ones(in_features) * a)
        else:
            self.a = Parameter(torch.rand(1, in_features) * 0.5).squeeze()

    def forward(self, x):
        return x + (1.0 / self.a) * torch.pow(torch.sin(x * self.a), 2)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Snake(4), nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model, optimizer):
        for x, y in [(torch.randn(6, 3), torch.randn(6, 1))] * 3:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()  # <- culprit
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
