"""real-world-sr (DSGAN): "[torch.FloatTensor [1, 256, 1, 1]] is at version 2; expected
version 1" -- the discriminator is optimised between the computation of the generator's
adversarial loss (through the discriminator) and its backward pass.

Source: https://github.com/manuelfritsche/real-world-sr/issues/18
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/manuelfritsche/real-world-sr/issues/18"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="model_d.2.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model_g = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    model_d = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2),
                            nn.Conv2d(4, 1, 1))
    optimizer_g = torch.optim.Adam(model_g.parameters(), lr=2e-4)
    optimizer_d = torch.optim.Adam(model_d.parameters(), lr=2e-4)
    with watch([model_g, model_d], [optimizer_g, optimizer_d]):
        for input_img, disc_img in [(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))] * 2:
            fake_img = model_g(input_img)
            fake_tgt = model_d(fake_img)
            g_loss = -fake_tgt.mean() + (fake_img - input_img).abs().mean()
            d_loss = model_d(fake_img.detach()).mean() - model_d(disc_img).mean()
            optimizer_d.zero_grad()
            d_loss.backward()
            optimizer_d.step()  # <- culprit
            optimizer_g.zero_grad()
            try:
                g_loss.backward()
            except RuntimeError as err:
                return err
            optimizer_g.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
