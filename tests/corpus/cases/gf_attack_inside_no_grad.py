"""AdverTorch: evaluating robustness with ``adversary.perturb(inputs, targets)`` inside the test
loop's ``with torch.no_grad():``: the attack's own ``loss.backward()`` (on the input) fails with
"element 0 of tensors does not require grad and does not have a grad_fn" (maintainer: gradient
based attacks need autograd; remove the ``no_grad``).

Source: https://github.com/BorealisAI/advertorch/issues/79
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/BorealisAI/advertorch/issues/79"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def perturb(net, x, y, eps=0.1):
    xadv = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(net(xadv), y)  # <- culprit
    loss.backward()
    return (xadv + eps * xadv.grad.sign()).detach()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    net.eval()
    with watch(net), torch.no_grad():
        for inputs, targets in [(torch.rand(4, 6), torch.randint(0, 3, (4,)))]:
            try:
                adv_untargeted = perturb(net, inputs, targets)
            except RuntimeError as err:
                return err
            net(adv_untargeted)


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
