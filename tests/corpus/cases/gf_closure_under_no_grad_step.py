"""HeavyBall's SOAP optimizers: ``step`` is decorated with ``@torch.no_grad()`` and calls
``loss = closure()`` directly, so the closure's forward runs without grad and its ``backward()``
fails with "element 0 of tensors does not require grad and does not have a grad_fn" (seen
through Lightning, whose automatic optimisation passes a closure; the fix wraps the call in
``torch.enable_grad()``, as torch's own optimizers do).

Sources: https://github.com/HomebrewML/HeavyBall/issues/10,
https://github.com/Lightning-AI/pytorch-lightning/issues/18254
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.optim import Optimizer

SOURCE = ["https://github.com/HomebrewML/HeavyBall/issues/10",
          "https://github.com/Lightning-AI/pytorch-lightning/issues/18254"]
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


class ForeachSOAP(Optimizer):
    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()  # <- culprit
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = ForeachSOAP(model.parameters())
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with watch(model, optimizer):
        try:
            for _ in range(2):
                optimizer.step(closure)
        except RuntimeError as exc:
            return exc


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
