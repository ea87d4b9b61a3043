"""pytorch_optimizer's AdamP: the projection divides by a norm computed with ``rsqrt()`` and no
epsilon ("Potential NaN issue when performing rsqrt() in AdamP"): a parameter whose entries are
all zero gives ``rsqrt(0) = inf`` and the update writes NaN/Inf into it; the fix adds eps
before ``rsqrt()``.

Source: https://github.com/kozistr/pytorch_optimizer/pull/481
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.optim import Optimizer

SOURCE = "https://github.com/kozistr/pytorch_optimizer/pull/481"
FAMILY = "nonfinite_introduced"
EXPECT = dict(kind="nonfinite_introduced", tensor="0.bias")
KNOWN_MISS = {}


class AdamP(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                perturb = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
                wd_ratio = p.pow(2).sum().rsqrt() * p.abs().max()  # projection scale: no eps
                p.add_(perturb * wd_ratio, alpha=-group["lr"])  # <- culprit


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    nn.init.zeros_(model[0].bias)
    optimizer = AdamP(model.parameters())
    with watch(model, optimizer):
        for x in [torch.randn(5, 4)] * 2:
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
