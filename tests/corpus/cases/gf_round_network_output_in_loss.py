""""I was just wondering if you know a way to round the output of a network and still allow for
successful learning?": the network's output is rounded inside the loss; ``round`` is a step
function whose gradient is zero almost everywhere, so every parameter behind it gets an exactly
zero gradient and never trains -- no error, the loss just stays flat (the answers: a custom
backward or a straight-through estimator).

Source: https://discuss.pytorch.org/t/torch-round-gradient/28628
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://discuss.pytorch.org/t/torch-round-gradient/28628"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor="0.weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with watch(model, optimizer):
        for _ in range(3):
            x, counts = torch.randn(32, 4), torch.randint(0, 10, (32, 1)).float()
            predicted_counts = torch.round(model(x) * 10)  # <- culprit
            loss = nn.functional.mse_loss(predicted_counts, counts)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
