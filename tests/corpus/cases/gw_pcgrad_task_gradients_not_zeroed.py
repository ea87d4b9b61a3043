"""Per-task gradients for gradient surgery (PCGrad): each task's loss is backwarded with
``retain_graph=True`` and its gradient read from ``p.grad``; without a ``zero_grad()`` before each
task's backward, the second task's "gradient" is the sum of both, the projection runs on mixed
gradients and the merged result written back to ``.grad`` is wrong. The fix in the report
computes per-task gradients and zeroes between task passes (the forum thread warns of the same
implicit accumulation when inspecting each loss's gradient after separate backward calls).

Sources: https://github.com/KanishJebaMathewM/Truxify/issues/11390,
https://github.com/KanishJebaMathewM/Truxify/pull/11585,
https://discuss.pytorch.org/t/multi-task-learning-whats-the-difference-between-jointly-backward-and-backward-with-retain-graph-true/28162
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/KanishJebaMathewM/Truxify/issues/11390",
          "https://github.com/KanishJebaMathewM/Truxify/pull/11585",
          "https://discuss.pytorch.org/t/multi-task-learning-whats-the-difference-between-"
          "jointly-backward-and-backward-with-retain-graph-true/28162"]
FAMILY = "grad_read_mid_window"
EXPECT = dict(kind="grad_read_mid_window", tensor={"explicit": "0.weight.grad",
                                                   "*": "0.weight.grad"})
KNOWN_MISS = {}


def project(g_i, g_j):
    dot = (g_i * g_j).sum()
    return g_i - torch.clamp(dot, max=0) * g_j / (g_j.pow(2).sum() + 1e-12)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer):
        for _ in range(3):
            out = model(torch.randn(8, 4))
            loss_a, loss_b = out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean()
            optimizer.zero_grad()
            loss_a.backward(retain_graph=True)
            grads_a = [p.grad.clone() for p in model.parameters()]
            loss_b.backward()  # no zero_grad() before the second task's backward
            grads_b = [p.grad.clone() for p in model.parameters()]  # <- culprit
            for p, g1, g2 in zip(model.parameters(), grads_a, grads_b):
                p.grad = project(g1, g2) + project(g2, g1)
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
