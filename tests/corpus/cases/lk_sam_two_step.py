"""Correct: Sharpness-Aware Minimization -- ``first_step(zero_grad=True)`` uses the
gradients to move the weights to the worst-case neighbour in place, zeroes them, a second
forward/backward is taken there, and ``second_step()`` restores the weights and steps the base
optimizer (the issue: why plain gradient accumulation does not mix with this).

Source: https://github.com/davda54/sam/issues/62
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/davda54/sam/issues/62"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for group in self.param_groups
                                            for p in group["params"] if p.grad is not None]))
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with watch(model, optimizer):
        for inputs, targets in [(torch.randn(6, 5), torch.randint(0, 3, (6,)))] * 2:
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.second_step(zero_grad=True)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
