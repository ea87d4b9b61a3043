"""nonfinite_introduced: a hand-written optimizer that normalises the update by its norm; when a
gradient is all zeros the update is 0/0 = NaN and the weights are ruined.

Run: python examples/nonfinite_custom_optimizer.py
"""

import torch
from _show import show
from torch import nn

import gradwatch


class NormalizedSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad / p.grad.norm()  # BUG: 0/0 when the gradient is zero
                p.sub_(group["lr"] * update)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
with torch.no_grad():
    model[0].bias.fill_(-10.0)  # dead ReLUs: the last layer's weight gets a zero gradient
opt = NormalizedSGD(model.parameters())

with gradwatch.watch(model, opt, on_anomaly="log") as w:
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
print("weights finite:", all(torch.isfinite(p).all().item() for p in model.parameters()))
show(w)
