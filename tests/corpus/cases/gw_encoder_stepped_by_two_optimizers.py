"""CURL ``update_cpc()``: the critic's encoder is in both ``encoder_optimizer`` and
``cpc_optimizer``; after one ``loss.backward()`` both ``encoder_optimizer.step()`` and
``cpc_optimizer.step()`` are called, so "critic.encoder is updated twice using the same
gradient".

Source: https://github.com/MishaLaskin/curl/issues/28
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/MishaLaskin/curl/issues/28"
FAMILY = "grad_applied_twice"
EXPECT = dict(kind="grad_applied_twice", tensor={"explicit": "encoder.weight", "*": "weight"})
KNOWN_MISS = {}


class CURL(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.W = nn.Parameter(torch.rand(4, 4))

    def compute_logits(self, z_a, z_pos):
        return z_a @ self.W @ z_pos.T


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    curl = CURL(encoder)
    encoder_optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    cpc_optimizer = torch.optim.Adam(curl.parameters(), lr=1e-3)
    with watch(curl, [encoder_optimizer, cpc_optimizer]):
        for obs_anchor, obs_pos in [(torch.randn(5, 6), torch.randn(5, 6))] * 2:
            z_a = curl.encoder(obs_anchor)
            z_pos = curl.encoder(obs_pos).detach()
            logits = curl.compute_logits(z_a, z_pos)
            loss = nn.functional.cross_entropy(logits, torch.arange(5))
            encoder_optimizer.zero_grad()
            cpc_optimizer.zero_grad()
            loss.backward()
            encoder_optimizer.step()
            cpc_optimizer.step()  # <- culprit


if __name__ == "__main__":  # gradwatch run <this file>
    run()
