"""stale_grad_accumulation: a loop that forgets optimizer.zero_grad(). Each .grad sums gradients
taken at different parameter values; nothing raises, training is just wrong.

Run: python examples/stale_forgotten_zero_grad.py
"""

import torch
from _show import show
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

with gradwatch.watch(model, opt, on_anomaly="log") as w:
    for _ in range(5):
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()  # BUG: no opt.zero_grad() before this backward
        opt.step()
show(w)
