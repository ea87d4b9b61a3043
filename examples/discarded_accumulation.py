"""accumulated_grad_discarded: gradient accumulation with zero_grad() inside the window, so only
the last micro-batch of each window reaches the optimizer.

Run: python examples/discarded_accumulation.py
"""

import torch
from _show import show
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Linear(10, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
accumulate = 4

with gradwatch.watch(model, opt, on_anomaly="log") as w:
    for i in range(12):
        opt.zero_grad()  # BUG: belongs after opt.step(), once per window
        x = torch.randn(8, 10)
        loss = model(x).pow(2).mean() / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            opt.step()
show(w)
