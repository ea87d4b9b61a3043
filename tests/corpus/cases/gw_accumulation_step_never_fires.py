"""PyTorch-YOLOv3 train.py: ``if batches_done % opt.gradient_accumulations:`` guards
``optimizer.step()``; with ``gradient_accumulations = 1`` the modulus is always 0, "the optimizer
never gets called": every batch's gradients pile up in ``.grad`` and the model never trains
(transformers' run_glue had the same silent failure when an epoch held fewer batches than
``gradient_accumulation_steps``).

Sources: https://github.com/eriklindernoren/PyTorch-YOLOv3/issues/325,
https://github.com/huggingface/transformers/issues/2995
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/eriklindernoren/PyTorch-YOLOv3/issues/325",
          "https://github.com/huggingface/transformers/issues/2995"]
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied", tensor="0.weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters())
    gradient_accumulations = 1
    with watch(model, optimizer):
        for batches_done in range(1, 7):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()  # <- culprit
            if batches_done % gradient_accumulations:
                optimizer.step()
                optimizer.zero_grad()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
