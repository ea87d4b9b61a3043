"""The fixed per-task gradient loop of gradient surgery (PCGrad, as in Pytorch-PCGrad's
``_pack_grad``): ``zero_grad()`` before each task's ``backward(retain_graph=True)``, each task's
gradient read on its own, the merged gradient written back to ``.grad``, one step. Correct.

Sources: https://github.com/WeiChengTseng/Pytorch-PCGrad/blob/master/pcgrad.py,
https://github.com/KanishJebaMathewM/Truxify/pull/11585
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/WeiChengTseng/Pytorch-PCGrad/blob/master/pcgrad.py",
          "https://github.com/KanishJebaMathewM/Truxify/pull/11585"]
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer):
        for _ in range(3):
            out = model(torch.randn(8, 4))
            losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean()]
            task_grads = []
            for loss in losses:
                optimizer.zero_grad(set_to_none=True)
                loss.backward(retain_graph=True)
                task_grads.append([p.grad.clone() for p in model.parameters()])
            for p, g1, g2 in zip(model.parameters(), *task_grads):
                p.grad = (g1 + g2) / 2
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
