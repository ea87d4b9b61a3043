"""LyCORIS DoRA: ``apply_weight_decompose`` divides by ``weight_norm``, which can be 0, "which
causes NaN weight during training": the NaN gradients of the 0/0 reach the optimizer, whose
update writes NaN into the weights (the fix adds a small value to the norm).

Source: https://github.com/KohakuBlueleaf/LyCORIS/pull/166
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/KohakuBlueleaf/LyCORIS/pull/166"
FAMILY = "nonfinite_introduced"
EXPECT = dict(kind="nonfinite_introduced", tensor="lora_up")
KNOWN_MISS = {}


class DoRALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.org_weight = torch.zeros(3, 4)  # a pruned (all-zero) base layer
        self.lora_down = nn.Parameter(torch.zeros(2, 4))
        self.lora_up = nn.Parameter(torch.zeros(3, 2))
        self.dora_scale = nn.Parameter(torch.ones(1, 4))

    def apply_weight_decompose(self, weight):
        weight_norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        return weight * (self.dora_scale / weight_norm)

    def forward(self, x):
        weight = self.org_weight + self.lora_up @ self.lora_down
        return x @ self.apply_weight_decompose(weight).t()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    layer = DoRALinear()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    with watch(layer, optimizer):
        for x in [torch.randn(2, 4)] * 2:
            optimizer.zero_grad()
            loss = layer(x).pow(2).mean()
            loss.backward()
            optimizer.step()  # <- culprit


if __name__ == "__main__":  # gradwatch run <this file>
    run()
