"""BPPNet (dehazing GAN): the discriminator's and the generator's losses are computed together
from one forward; the discriminator is then updated, and the generator's adversarial loss is
backpropagated through the discriminator whose weights the step changed: "[torch.cuda.
FloatTensor [1, 512, 4, 4]], which is output 4 of BroadcastBackward, is at version 2; expected
version 1". The author: do the discriminator's descent first, *then* compute the generator loss.

Source: https://github.com/ayu-22/BPPNet-Back-Projected-Pyramid-Network/issues/6
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/ayu-22/BPPNet-Back-Projected-Pyramid-Network/issues/6"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="discriminator.0.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid())
    discriminator = nn.Sequential(nn.Conv2d(3, 1, 4, stride=2, padding=1), nn.Sigmoid())
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-4)
    bce = nn.BCELoss()
    with watch([generator, discriminator], [opt_g, opt_d]):
        for hazy, clear in [(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))] * 2:
            dehazed = generator(hazy)
            d_fake = discriminator(dehazed)
            d_real = discriminator(clear)
            gen_loss = bce(d_fake, torch.ones_like(d_fake)) + (dehazed - clear).pow(2).mean()
            dis_loss = bce(d_real, torch.ones_like(d_real)) + bce(discriminator(dehazed.detach()),
                                                                   torch.zeros_like(d_fake))
            opt_d.zero_grad()
            dis_loss.backward()
            opt_d.step()  # <- culprit
            opt_g.zero_grad()
            try:
                gen_loss.backward()
            except RuntimeError as err:
                return err
            opt_g.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
