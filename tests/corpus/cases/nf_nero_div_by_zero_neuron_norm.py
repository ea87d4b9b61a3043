"""pytorch_optimizer's Nero: the update projects each neuron back onto the unit sphere with
``p.div_(neuron_norm(p))`` (no epsilon); a neuron whose weights are all zero gives 0/0 and NaN
weights ("Lion NaN on optimization" -- the fix adds an eps).

Source: https://github.com/kozistr/pytorch_optimizer/issues/120
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.optim import Optimizer

SOURCE = "https://github.com/kozistr/pytorch_optimizer/issues/120"
FAMILY = "nonfinite_introduced"
EXPECT = dict(kind="nonfinite_introduced", tensor="0.weight")
KNOWN_MISS = {}


def neuron_norm(x):
    view_shape = [x.shape[0]] + [1] * (x.dim() - 1)
    return x.view(x.shape[0], -1).norm(dim=1).view(*view_shape)


def neuron_mean(x):
    view_shape = [x.shape[0]] + [1] * (x.dim() - 1)
    return x.view(x.shape[0], -1).mean(dim=1).view(*view_shape)


class Nero(Optimizer):
    def __init__(self, params, lr=0.01, beta=0.999):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(group["lr"] * p.grad / neuron_norm(p.grad).clamp(min=1e-12))
                if p.dim() > 1:
                    p.sub_(neuron_mean(p))
                    p.div_(neuron_norm(p))  # <- culprit


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    optimizer = Nero(model.parameters())
    with watch(model, optimizer):
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(torch.randn(4, 1)).pow(2).mean()  # a 1-input neuron: mean-centred to 0
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
