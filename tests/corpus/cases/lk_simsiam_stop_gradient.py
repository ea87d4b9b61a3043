"""Correct: SimSiam's symmetric loss with the stop-gradient on the target branch,
``D(p1, z2.detach())`` -- the detach is the method (the issue: "Stop grad is implemented using
the detach operation").

Source: https://github.com/PatrickHua/SimSiam/issues/22
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/PatrickHua/SimSiam/issues/22"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def D(p, z):
    return -nn.functional.cosine_similarity(p, z, dim=-1).mean()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6))
    predictor = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6))
    optimizer = torch.optim.SGD(list(encoder.parameters()) + list(predictor.parameters()), lr=0.05)
    with watch([encoder, predictor], optimizer):
        for _ in range(3):
            x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
            z1, z2 = encoder(x1), encoder(x2)
            p1, p2 = predictor(z1), predictor(z2)
            loss = D(p1, z2.detach()) / 2 + D(p2, z1.detach()) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
