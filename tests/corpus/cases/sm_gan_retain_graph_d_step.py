"""GAN fitting sin(x) (MorvanZhou's 406_GAN.py): D and G losses are built from one forward,
``D_loss.backward(retain_graph=True)``, then ``opt_D.step()`` updates D's weights in place, then
``G_loss.backward()`` needs D's old weights: "one of the variables needed for gradient
computation has been modified by an inplace operation: [torch.FloatTensor [128, 1]] ... is at
version 2; expected version 1" since PyTorch 1.5.

Sources: https://github.com/pytorch/pytorch/issues/39141
https://github.com/MorvanZhou/PyTorch-Tutorial/issues/89
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/pytorch/pytorch/issues/39141",
          "https://github.com/MorvanZhou/PyTorch-Tutorial/issues/89"]
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="D.2.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 15))
    D = nn.Sequential(nn.Linear(15, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-4)
    opt_G = torch.optim.Adam(G.parameters(), lr=1e-4)
    with watch([G, D], [opt_G, opt_D]):
        for _step in range(2):
            artist_paintings = torch.sin(torch.linspace(-1, 1, 15)).expand(8, 15)
            G_paintings = G(torch.randn(8, 5))
            prob_artist0 = D(artist_paintings)
            prob_artist1 = D(G_paintings)
            D_loss = -torch.mean(torch.log(prob_artist0) + torch.log(1.0 - prob_artist1))
            G_loss = torch.mean(torch.log(1.0 - prob_artist1))
            opt_D.zero_grad()
            D_loss.backward(retain_graph=True)
            opt_D.step()  # <- culprit
            opt_G.zero_grad()
            try:
                G_loss.backward()
            except RuntimeError as err:
                return err
            opt_G.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
