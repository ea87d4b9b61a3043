"""NNI model speedup: ``m_speedup.speedup_model()`` replaces the pruned model's layers with
smaller ones after the optimizer was built, so "the parameters registered in the optimizer are
outdated": fine-tuning computes gradients for the new layers and never updates them (fix:
create a new optimizer).

Source: https://github.com/microsoft/nni/issues/4521
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/microsoft/nni/issues/4521"
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied", tensor="fc1.weight")
KNOWN_MISS = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def speedup_model(model):
    """Replace fc1 by a smaller layer holding the unmasked rows (what ModelSpeedup does)."""
    keep = torch.arange(8)
    new_fc1, new_fc2 = nn.Linear(8, 8), nn.Linear(8, 2)
    with torch.no_grad():
        new_fc1.weight.copy_(model.fc1.weight[keep])
        new_fc1.bias.copy_(model.fc1.bias[keep])
        new_fc2.weight.copy_(model.fc2.weight[:, keep])
        new_fc2.bias.copy_(model.fc2.bias)
    model.fc1, model.fc2 = new_fc1, new_fc2


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    speedup_model(model)
    with watch(model, optimizer):
        for x, y in [(torch.randn(4, 8), torch.randint(0, 2, (4,)))] * 3:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # <- culprit
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
