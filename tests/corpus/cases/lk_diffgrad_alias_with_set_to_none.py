"""DiffGrad as first published keeps ``state['previous_grad'] = grad`` by reference; with today's
``zero_grad()`` (``set_to_none=True``, the default since PyTorch 2.0) the next backward makes a
new ``.grad`` tensor, so the kept one really is the previous gradient: correct, silent.

Source: https://github.com/jettify/pytorch-optimizer/pull/57
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.optim import Optimizer

SOURCE = "https://github.com/jettify/pytorch-optimizer/pull/57"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


class DiffGrad(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["previous_grad"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                diff = torch.abs(state["previous_grad"] - grad)
                dfc = 1.0 / (1.0 + torch.exp(-diff))
                state["previous_grad"] = grad
                p.addcdiv_(exp_avg * dfc, exp_avg_sq.sqrt().add_(group["eps"]), value=-group["lr"])


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = DiffGrad(model.parameters())
    with watch(model, optimizer):
        for x in [torch.randn(4, 3)] * 3:
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
