"""Correct (if wasteful): iTAML's model returns two heads computed by the same layer, ``x1 =
self.fc(x); x2 = self.fc(x); return x1, x2``, and the learner often keeps one, ``outputs2, _ =
model(inputs)``: the unused output's graph, which saved the layer's input and weight, stays
alive across ``optimizer.step()`` but is never backpropagated (the maintainer: "Algorithmic wise
it doesn't change anything at all").

Source: https://github.com/brjathu/iTAML/issues/14
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/brjathu/iTAML/issues/14"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.body(x))
        x1 = self.fc(x)
        x2 = self.fc(x)
        return x1, x2


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with watch(model, optimizer):
        for inputs, targets in [(torch.randn(5, 6), torch.randint(0, 4, (5,)))] * 3:
            outputs2, _ = model(inputs)
            loss = nn.functional.cross_entropy(outputs2, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
