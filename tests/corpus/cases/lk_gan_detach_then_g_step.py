"""Correct: the GAN loop as fixed in the discussion of the PyTorch 1.5 in-place error --
D is trained on ``fake.detach()``, stepped, and only then is G's loss computed through the
updated D and backpropagated.

Source: https://github.com/pytorch/pytorch/issues/39141
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/pytorch/issues/39141"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 15))
    D = nn.Sequential(nn.Linear(15, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-4)
    opt_G = torch.optim.Adam(G.parameters(), lr=1e-4)
    with watch([G, D], [opt_G, opt_D]):
        for _ in range(3):
            real = torch.sin(torch.linspace(-1, 1, 15)).expand(8, 15)
            fake = G(torch.randn(8, 5))
            D_loss = -torch.mean(torch.log(D(real)) + torch.log(1.0 - D(fake.detach())))
            opt_D.zero_grad()
            D_loss.backward()
            opt_D.step()
            G_loss = torch.mean(torch.log(1.0 - D(fake)))
            opt_G.zero_grad()
            G_loss.backward()
            opt_G.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
