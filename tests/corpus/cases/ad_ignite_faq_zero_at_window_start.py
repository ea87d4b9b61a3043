"""Ignite FAQ's gradient-accumulation example: ``if engine.state.iteration % accumulation_steps
== 0: optimizer.zero_grad()`` at the *start* of the update function, then ``loss.backward()``
and ``optimizer.step()`` under the same condition: on a window's last iteration the gradients of
the window's other iterations are zeroed just before the step.

Source: https://github.com/pytorch/ignite/issues/583
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/ignite/issues/583"
FAMILY = "accumulated_grad_discarded"
EXPECT = dict(kind="accumulated_grad_discarded", tensor="weight.grad")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.MSELoss()
    accumulation_steps = 2

    def update_fn(iteration, batch):
        model.train()
        if iteration % accumulation_steps == 0:
            optimizer.zero_grad()  # <- culprit
        x, y = batch
        y_pred = model(x)
        loss = criterion(y_pred, y) / accumulation_steps
        loss.backward()
        if iteration % accumulation_steps == 0:
            optimizer.step()
        return loss.item()

    with watch(model, optimizer):
        for iteration in range(1, 5):
            update_fn(iteration, (torch.randn(4, 4), torch.randn(4, 1)))


if __name__ == "__main__":  # gradwatch run <this file>
    run()
