"""The fixed HeavyBall step (and every torch optimizer): ``@torch.no_grad()`` on ``step``, the
closure called under ``torch.enable_grad()``. Correct.

Source: https://github.com/HomebrewML/HeavyBall/issues/10
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.optim import Optimizer

SOURCE = "https://github.com/HomebrewML/HeavyBall/issues/10"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


class ForeachSOAP(Optimizer):
    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = ForeachSOAP(model.parameters())
    x, y = torch.randn(8, 4), torch.randn(8, 1)

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
