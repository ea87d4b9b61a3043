"""convex_adversarial: uncommenting the PGD evaluation in ``evaluate_robust`` fails with
"element 0 of tensors does not require grad" because gradients were disabled a few lines above
(``torch.set_grad_enabled(False)`` for the robust bound); the maintainer: re-enable gradients
before running the PGD attack.

Source: https://github.com/locuslab/convex_adversarial/issues/34
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/locuslab/convex_adversarial/issues/34"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def _pgd(model, X, y, epsilon, niters=2, alpha=0.05):
    X_pgd = X.clone().requires_grad_(True)
    for _i in range(niters):
        opt = torch.optim.Adam([X_pgd], lr=1e-3)
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(X_pgd), y)  # <- culprit
        loss.backward()
        eta = alpha * X_pgd.grad.sign()
        X_pgd = (X_pgd + eta).clamp(X - epsilon, X + epsilon).detach().requires_grad_(True)
    return X_pgd


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with watch(model):
        torch.set_grad_enabled(False)
        try:
            for X, y in [(torch.rand(4, 6), torch.randint(0, 3, (4,)))]:
                robust_err = model(X).argmax(1).ne(y).float().mean()
                try:
                    _pgd(model, X, y, 0.1)
                except RuntimeError as err:
                    return err
                del robust_err
        finally:
            torch.set_grad_enabled(True)


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
