"""SRGAN training (leftthomas/SRGAN train.py): ``fake_out = netD(fake_img).mean()`` is computed
once, ``d_loss.backward(retain_graph=True)`` and ``optimizerD.step()`` run, then
``g_loss = generator_criterion(fake_out, ...)`` backpropagates through netD's graph whose
weights the step changed: "[torch.cuda.FloatTensor [1, 1024, 1, 1]] is at version 2; expected
version 1". A commenter's fix: step both optimizers after both backward passes.

Source: https://github.com/leftthomas/SRGAN/issues/89
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/leftthomas/SRGAN/issues/89"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="netD.3.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(), nn.Conv2d(4, 3, 3, padding=1))
    netD = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 1, 1), nn.Sigmoid())
    optimizerG = torch.optim.Adam(netG.parameters())
    optimizerD = torch.optim.Adam(netD.parameters())
    with watch([netG, netD], [optimizerG, optimizerD]):
        for data, target in [(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))] * 2:
            real_img, z = target, data
            fake_img = netG(z)
            netD.zero_grad()
            real_out = netD(real_img).mean()
            fake_out = netD(fake_img).mean()
            d_loss = 1 - real_out + fake_out
            d_loss.backward(retain_graph=True)
            optimizerD.step()  # <- culprit
            netG.zero_grad()
            g_loss = 0.001 * (1 - fake_out) + ((fake_img - real_img) ** 2).mean()
            try:
                g_loss.backward()
            except RuntimeError as err:
                return err
            optimizerG.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
