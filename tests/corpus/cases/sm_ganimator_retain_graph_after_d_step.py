"""GANimator ``optimize_parameters``: the discriminator is updated first, then ``backward_G()``
calls ``loss_total.backward(retain_graph=True)`` on a generator loss whose adversarial term was
computed through the discriminator before its step: "one of the variables needed for gradient
computation has been modified by an inplace operation".

Source: https://github.com/PeizhuoLi/ganimator/issues/5
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/PeizhuoLi/ganimator/issues/5"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="D.0.weight", raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    G = nn.Conv1d(4, 4, 3, padding=1)
    D = nn.Sequential(nn.Conv1d(4, 1, 3, padding=1))
    optimizerG = torch.optim.Adam(G.parameters(), lr=1e-4)
    optimizerD = torch.optim.Adam(D.parameters(), lr=1e-4)
    with watch([G, D], [optimizerG, optimizerD]):
        for real in [torch.randn(1, 4, 16)] * 2:
            fake = G(torch.randn(1, 4, 16))
            loss_G_adv = -D(fake).mean()  # forward_G: the adversarial term, through D
            optimizerD.zero_grad()
            loss_D = D(fake.detach()).mean() - D(real).mean()
            loss_D.backward()
            optimizerD.step()  # <- culprit
            optimizerG.zero_grad()
            loss_total = loss_G_adv + (fake - real).pow(2).mean()
            try:
                loss_total.backward(retain_graph=True)
            except RuntimeError as err:
                return err
            optimizerG.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
