"""DualTalk main.py: gradient accumulation with ``optimizer.zero_grad()`` before *every*
``loss.backward()`` and ``optimizer.step()`` only every ``gradient_accumulation_steps``
iterations: each zero_grad throws away the gradients accumulated since the last step, so only
the last micro-batch of a window is ever applied.

Source: https://github.com/ZiqiaoPeng/DualTalk/issues/9
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/ZiqiaoPeng/DualTalk/issues/9"
FAMILY = "accumulated_grad_discarded"
EXPECT = dict(kind="accumulated_grad_discarded", tensor="weight.grad")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(5, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gradient_accumulation_steps = 2
    loss_log = []
    with watch(model, optimizer):
        for i, (audio, vertice) in enumerate([(torch.randn(3, 5), torch.randn(3, 5))] * 4, 1):
            loss = ((model(audio) - vertice) ** 2).mean()
            optimizer.zero_grad()  # <- culprit
            loss.backward()
            loss_log.append(loss.item())
            if i % gradient_accumulation_steps == 0:
                optimizer.step()
                optimizer.zero_grad()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
