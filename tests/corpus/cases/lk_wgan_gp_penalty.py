"""Correct: WGAN-GP's gradient penalty -- the interpolates require grad,
``autograd.grad(disc_interpolates, interpolates, create_graph=True)`` gives the penalty's
gradient, and the penalty is backpropagated into D along with the critic loss.

Source: https://github.com/caogang/wgan-gp/issues/4
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/caogang/wgan-gp/issues/4"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    netD = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizerD = torch.optim.Adam(netD.parameters(), lr=1e-4, betas=(0.5, 0.9))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=1e-4, betas=(0.5, 0.9))
    with watch([netG, netD], [optimizerG, optimizerD]):
        for _ in range(2):
            for p in netD.parameters():
                p.requires_grad = True
            real_data = torch.randn(8, 2)
            netD.zero_grad()
            D_real = netD(real_data).mean()
            fake = netG(torch.randn(8, 2)).detach()
            D_fake = netD(fake).mean()
            alpha = torch.rand(8, 1)
            interpolates = (alpha * real_data + (1 - alpha) * fake).requires_grad_(True)
            disc_interpolates = netD(interpolates)
            gradients = torch.autograd.grad(outputs=disc_interpolates, inputs=interpolates,
                                            grad_outputs=torch.ones_like(disc_interpolates),
                                            create_graph=True, retain_graph=True)[0]
            gradient_penalty = ((gradients.norm(2, dim=1) - 1) ** 2).mean() * 10
            D_cost = D_fake - D_real + gradient_penalty
            D_cost.backward()
            optimizerD.step()
            for p in netD.parameters():
                p.requires_grad = False
            netG.zero_grad()
            G_cost = -netD(netG(torch.randn(8, 2))).mean()
            G_cost.backward()
            optimizerG.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
