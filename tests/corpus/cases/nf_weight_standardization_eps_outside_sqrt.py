"""Weight Standardization: the weights are normalised as ``w' = (w - Mean(w)) / (sqrt(Var(w)) +
epsilon)``, epsilon outside the square root (the formulation the issues discuss), so a filter
whose weights are all equal (var = 0) gets an infinite derivative of ``sqrt`` and NaN gradients
("torch.sqrt is a major source of NaN"); the optimizer's update then writes the NaN into the
weights.

Sources: https://github.com/joe-siyuan-qiao/WeightStandardization/issues/16
https://github.com/joe-siyuan-qiao/WeightStandardization/issues/1
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = ["https://github.com/joe-siyuan-qiao/WeightStandardization/issues/16",
          "https://github.com/joe-siyuan-qiao/WeightStandardization/issues/1"]
FAMILY = "nonfinite_introduced"
EXPECT = dict(kind="nonfinite_introduced", tensor="weight")
KNOWN_MISS = {}


class Conv2d(nn.Conv2d):
    def forward(self, x):
        weight = self.weight
        weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(
            dim=3, keepdim=True)
        weight = weight - weight_mean
        var = weight.view(weight.size(0), -1).var(dim=1).view(-1, 1, 1, 1)
        std = torch.sqrt(var) + 1e-5  # w' = (w - Mean(w)) / (sqrt(Var(w)) + eps)
        weight = weight / std.expand_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    conv = Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[1].fill_(0.5)  # a constant filter: var = 0
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    with watch(conv, optimizer):
        for x in [torch.randn(1, 2, 5, 5)] * 2:
            optimizer.zero_grad()
            loss = conv(x).pow(2).mean()
            loss.backward()
            optimizer.step()  # <- culprit


if __name__ == "__main__":  # gradwatch run <this file>
    run()
