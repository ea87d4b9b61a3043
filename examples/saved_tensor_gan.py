"""saved_tensor_mutated: a GAN that steps the discriminator between the generator's forward and
its backward. torch says "modified by an inplace operation" at backward; gradwatch names the
discriminator's optimizer.step() line.

Run: python examples/saved_tensor_gan.py
"""

import torch
from _show import show
from torch import nn

import gradwatch

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
bce = nn.BCEWithLogitsLoss()

err = None
with gradwatch.watch([G, D], [opt_g, opt_d], on_anomaly="log") as w:
    try:
        for _ in range(3):
            real = torch.randn(32, 2) * 0.5 + 1
            fake = G(torch.randn(32, 8))
            loss_g = bce(D(fake), torch.ones(32, 1))  # saves D's weights for backward

            opt_d.zero_grad()
            loss_d = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
            loss_d.backward()
            opt_d.step()  # BUG: updates D's weights in place; loss_g's graph still needs them

            opt_g.zero_grad()
            loss_g.backward()  # fails: fix by computing loss_g after opt_d.step()
            opt_g.step()
    except RuntimeError as e:
        err = e
show(w, err)
