"""simple_CycleGAN: the generator is stepped, then the discriminator's loss is computed on the
generator's output *without* ``.detach()`` and backpropagated: backward reaches the generator's
first convolution, whose weight ``optimizer_G.step()`` already changed: "[torch.cuda.FloatTensor
[3, 64, 7, 7]] is at version 3; expected version 1" with PyTorch >= 1.5.

Source: https://github.com/cy-xu/simple_CycleGAN/issues/3
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/cy-xu/simple_CycleGAN/issues/3"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated", tensor="netG.2.weight", raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    netD = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
    optimizer_G = torch.optim.Adam(netG.parameters(), lr=2e-4)
    optimizer_D = torch.optim.Adam(netD.parameters(), lr=2e-4)
    mse = nn.MSELoss()
    with watch([netG, netD], [optimizer_G, optimizer_D]):
        for real_A, real_B in [(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))] * 2:
            fake_B = netG(real_A)
            optimizer_G.zero_grad()
            loss_G = mse(netD(fake_B), torch.ones(1, 1, 8, 8)) + (fake_B - real_B).abs().mean()
            loss_G.backward(retain_graph=True)
            optimizer_G.step()  # <- culprit
            optimizer_D.zero_grad()
            loss_D = (mse(netD(real_B), torch.ones(1, 1, 8, 8))
                      + mse(netD(fake_B), torch.zeros(1, 1, 8, 8))) * 0.5
            try:
                loss_D.backward()
            except RuntimeError as err:
                return err
            optimizer_D.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
