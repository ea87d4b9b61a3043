"""Correct (if wasteful): the course's train step appends the loss *tensor* to a
results list for plotting, so every step's graph stays alive while the optimizer keeps updating
the weights those graphs saved; nothing ever backpropagates through them again (the issue: the
plot then needs ``.detach()``; ``.item()`` is the fix).

Source: https://github.com/mrdbourke/pytorch-deep-learning/issues/583
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/mrdbourke/pytorch-deep-learning/issues/583"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model_0 = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(params=model_0.parameters(), lr=0.001)
    results = {"train_loss": []}
    with watch(model_0, optimizer):
        for _epoch in range(3):
            X, y = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,))
            y_pred = model_0(X)
            loss = loss_fn(y_pred, y)
            train_loss = loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results["train_loss"].append(train_loss)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
