"""skorch 0.8 moved ``optimizer_.zero_grad()`` out of the closure it passes to ``step``: LBFGS
calls the closure several times per step, at the weights of each line-search iterate, so every
``backward()`` after the first adds to gradients taken at other weights ("nets that had
previously worked ... now quickly hit nan loss"). Lightning's automatic optimisation had the same
bug (zero_grad once per step, closure evaluated 20 times), fixed by calling ``zero_grad`` inside
the closure.

Sources: https://github.com/skorch-dev/skorch/issues/636,
https://github.com/Lightning-AI/pytorch-lightning/pull/6147
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/skorch-dev/skorch/issues/636",
          "https://github.com/Lightning-AI/pytorch-lightning/pull/6147"]
FAMILY = "stale_grad_accumulation"
EXPECT = dict(kind="stale_grad_accumulation", tensor="weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # <- culprit
        return loss

    with watch(model, optimizer):
        for _ in range(3):
            optimizer.zero_grad()  # once per step, not once per closure call
            optimizer.step(closure)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
