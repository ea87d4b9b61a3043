"""MonoLayout: after adding discriminators, training fails with "[torch.cuda.FloatTensor
[2, 16, 3, 3]] is at version 2; expected version 1"; anomaly detection points back at the
decoder's convolution -- the decoder was stepped and the discriminator's loss, computed on the
decoder's (not detached) output, then backpropagated into it.

Source: https://github.com/manila95/monolayout/issues/6
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/manila95/monolayout/issues/6"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="decoder.weight", raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    decoder = nn.Conv2d(2, 2, 3, padding=1)
    discr = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1), nn.Sigmoid())
    model_optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    optimizer_D = torch.optim.Adam(discr.parameters(), lr=1e-5)
    bce = nn.BCELoss()
    with watch([decoder, discr], [model_optimizer, optimizer_D]):
        for features, gt in [(torch.rand(1, 2, 6, 6), torch.rand(1, 2, 6, 6))] * 2:
            outputs = decoder(features)
            fake_pred = discr(outputs)
            valid = torch.ones_like(fake_pred)
            loss = nn.functional.mse_loss(outputs, gt) + 0.01 * bce(fake_pred, valid)
            model_optimizer.zero_grad()
            loss.backward(retain_graph=True)
            model_optimizer.step()  # <- culprit
            optimizer_D.zero_grad()
            loss_D = bce(discr(gt), valid) + bce(fake_pred, torch.zeros_like(fake_pred))
            try:
                loss_D.backward()
            except RuntimeError as err:
                return err
            optimizer_D.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
