"""Correct: VQ-VAE's two backward passes with no ``zero_grad`` between them --
``loss.backward(retain_graph=True)`` for the decoder, then the straight-through gradient into the
encoder; "by not zeroing grads, we could accumulate two gradients" before one step.

Source: https://github.com/nakosung/VQ-VAE/issues/2
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/nakosung/VQ-VAE/issues/2"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    decoder = nn.Linear(4, 6)
    codebook = nn.Embedding(8, 4)
    params = [*encoder.parameters(), *decoder.parameters(), *codebook.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-4)
    with watch([encoder, decoder, codebook], optimizer):
        for x in [torch.randn(5, 6)] * 2:
            z_e = encoder(x)
            idx = torch.cdist(z_e, codebook.weight).argmin(1)
            z_q = codebook(idx)
            z_q_st = z_q.detach().requires_grad_(True)
            x_rec = decoder(z_q_st)
            loss_rec = (x_rec - x).pow(2).mean()
            loss_e1 = (z_q - z_e.detach()).pow(2).mean()
            loss_e2 = (z_e - z_q.detach()).pow(2).mean()
            loss = loss_rec + loss_e1 + 0.25 * loss_e2
            optimizer.zero_grad()
            loss.backward(retain_graph=True)
            z_e.backward(z_q_st.grad)
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
