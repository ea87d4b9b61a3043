"""Correct: BYOL -- the target encoder is an exponential moving average of the online
encoder, updated in place under ``no_grad`` after each step, and its projections are computed
under ``no_grad`` (target networks receive no gradient).

Source: https://github.com/Lightning-Universe/lightning-bolts/issues/801
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/Lightning-Universe/lightning-bolts/issues/801"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    predictor = nn.Linear(4, 4)
    target = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    target.load_state_dict(online.state_dict())
    for p in target.parameters():
        p.requires_grad = False
    optimizer = torch.optim.Adam(list(online.parameters()) + list(predictor.parameters()), lr=3e-4)
    beta = 0.99
    with watch([online, predictor, target], optimizer):
        for _ in range(3):
            x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
            p1 = predictor(online(x1))
            with torch.no_grad():
                t2 = target(x2)
            loss = 2 - 2 * nn.functional.cosine_similarity(p1, t2, dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for t, o in zip(target.parameters(), online.parameters()):
                    t.mul_(beta).add_(o, alpha=1 - beta)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
