"""Correct: the original WGAN clips the critic's weights in place, ``p.data.clamp_(clamp_lower,
clamp_upper)``, at the top of each critic iteration before its forward (the issue: the clip is
done before ``optimizerD.step()``, "too early"); weight clipping is the method's Lipschitz
constraint.

Source: https://github.com/martinarjovsky/WassersteinGAN/issues/50
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/martinarjovsky/WassersteinGAN/issues/50"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    netD = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    netG = nn.Linear(3, 2)
    optimizerD = torch.optim.RMSprop(netD.parameters(), lr=5e-5)
    optimizerG = torch.optim.RMSprop(netG.parameters(), lr=5e-5)
    with watch([netD, netG], [optimizerD, optimizerG]):
        for _ in range(2):
            for _ in range(2):
                for p in netD.parameters():
                    p.data.clamp_(-0.01, 0.01)
                netD.zero_grad()
                errD_real = netD(torch.randn(8, 2)).mean()
                with torch.no_grad():
                    fake = netG(torch.randn(8, 3))
                errD_fake = netD(fake).mean()
                errD = errD_real - errD_fake
                errD.backward()
                optimizerD.step()
            netG.zero_grad()
            errG = netD(netG(torch.randn(8, 3))).mean()
            errG.backward()
            optimizerG.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
