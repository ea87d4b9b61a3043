"""Revisiting Reverse Distillation: ``optimizer_proj.zero_grad(); optimizer_distill.zero_grad();
loss.backward()`` on every batch, but both optimizers step only when ``(i + 1) %
accumulation_steps == 0``: the accumulated gradients are wiped before they are used (the
author confirmed and moved the zero_grad calls after the steps).

Source: https://github.com/tientrandinh/Revisiting-Reverse-Distillation/issues/12
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/tientrandinh/Revisiting-Reverse-Distillation/issues/12"
FAMILY = "accumulated_grad_discarded"
EXPECT = dict(kind="accumulated_grad_discarded",
              tensor="proj.weight.grad")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    proj = nn.Linear(6, 6)
    distill = nn.Linear(6, 6)
    optimizer_proj = torch.optim.Adam(proj.parameters(), lr=1e-3)
    optimizer_distill = torch.optim.Adam(distill.parameters(), lr=5e-3)
    accumulation_steps = 2
    with watch([proj, distill], [optimizer_proj, optimizer_distill]):
        for i, img in enumerate([torch.randn(2, 6)] * 4):
            loss = (distill(proj(img)) - img).pow(2).mean()
            optimizer_proj.zero_grad()  # <- culprit
            optimizer_distill.zero_grad()
            loss.backward()
            if (i + 1) % accumulation_steps == 0:
                optimizer_proj.step()
                optimizer_distill.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
