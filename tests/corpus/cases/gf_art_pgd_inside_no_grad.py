"""Adversarial Robustness Toolbox: running ``ProjectedGradientDescent`` inside a ``with
torch.no_grad():`` block raises "element 0 of tensors does not require grad and does not have
a grad_fn" -- the attack's loss gradient w.r.t. the input cannot be taken with autograd off
(maintainer: white-box attacks will not work inside no_grad).

Source: https://github.com/Trusted-AI/adversarial-robustness-toolbox/issues/498
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/Trusted-AI/adversarial-robustness-toolbox/issues/498"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def loss_gradient(model, x, y):
    x_grad = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x_grad), y)  # <- culprit
    loss.backward()
    return x_grad.grad


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    with watch(model), torch.no_grad():
        x, y = torch.rand(3, 5), torch.randint(0, 4, (3,))
        try:
            x_adv = x + 0.1 * loss_gradient(model, x, y).sign()
        except RuntimeError as err:
            return err
        model(x_adv)


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
