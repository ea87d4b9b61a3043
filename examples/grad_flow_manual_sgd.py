"""grad_flow_cut: manual SGD that rebinds the weight under no_grad (`w = w - lr * w.grad`).
The new `w` does not require grad: it silently stops training.

Run: python examples/grad_flow_manual_sgd.py
"""

import torch
from _show import show

import gradwatch

torch.manual_seed(0)
x = torch.randn(64, 3)
y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
w = torch.zeros(3, requires_grad=True)
b = torch.zeros(1, requires_grad=True)

with gradwatch.watch(on_anomaly="log") as watcher:
    for step in range(5):
        loss = ((x @ w + b) - y).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            if w.grad is not None:
                w = w - 0.1 * w.grad  # BUG: rebinds w to a tensor without grad
            b -= 0.1 * b.grad  # fine: in place, b stays the trained leaf
            b.grad.zero_()
        print(f"step {step}: loss {loss.item():.3f}, w.requires_grad={w.requires_grad}")
show(watcher)
