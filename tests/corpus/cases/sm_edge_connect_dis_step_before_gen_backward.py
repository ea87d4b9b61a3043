"""EdgeConnect: ``process()`` computes the generator's and the discriminator's losses, then
``backward(gen_loss, dis_loss)`` runs ``dis_loss.backward(); dis_optimizer.step()`` before
``gen_loss.backward()``, whose adversarial term goes through the discriminator: "[torch.cuda.
FloatTensor [1, 512, 4, 4]] is at version 2; expected version 1". A commenter: the backward
passes must come before the optimizer steps.

Source: https://github.com/knazeri/edge-connect/issues/188
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/knazeri/edge-connect/issues/188"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="discriminator.2.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    discriminator = nn.Sequential(nn.Conv2d(3, 4, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(4, 1, 3, padding=1))
    gen_optimizer = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    dis_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-5, betas=(0.0, 0.9))
    with watch([generator, discriminator], [gen_optimizer, dis_optimizer]):
        for images, edges in [(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8))] * 2:
            gen_optimizer.zero_grad()
            dis_optimizer.zero_grad()
            outputs = generator(torch.cat((images, edges), dim=1))
            dis_real = discriminator(images)
            dis_fake = discriminator(outputs.detach())
            dis_loss = (nn.functional.relu(1 - dis_real).mean()
                        + nn.functional.relu(1 + dis_fake).mean()) / 2
            gen_fake = discriminator(outputs)
            gen_loss = -gen_fake.mean() + nn.functional.l1_loss(outputs, images)
            dis_loss.backward()
            dis_optimizer.step()  # <- culprit
            try:
                gen_loss.backward()
            except RuntimeError as err:
                return err
            gen_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
