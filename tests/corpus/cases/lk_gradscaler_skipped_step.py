"""Correct: mixed precision with ``GradScaler`` -- when the scaled gradients overflow,
``scaler.step(optimizer)`` skips the optimizer step and ``scaler.update()`` lowers the scale;
the skipped window's gradients are then zeroed on purpose (the issue: the scheduler cannot tell
that the step was skipped).

Source: https://github.com/pytorch/pytorch/issues/55585
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/pytorch/issues/55585"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -120)
    with watch(net, optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = net(torch.randn(8, 4))
                loss = nn.functional.mse_loss(output.float(), 10 * torch.randn(8, 2),
                                              reduction="sum")  # the first step overflows
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
