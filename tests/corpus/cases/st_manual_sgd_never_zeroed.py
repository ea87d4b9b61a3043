"""Deep Reinforcement Learning in Action, appendix A.4: a two-layer MNIST net trained by hand,
``loss.backward()`` then ``with torch.no_grad(): w1 -= lr * w1.grad; w2 -= lr * w2.grad`` -- the
gradients are never zeroed, so every update uses the sum of all past gradients, taken at
earlier weights.

Source: https://github.com/DeepReinforcementLearning/DeepReinforcementLearningInAction/issues/42
"""
from contextlib import nullcontext

import torch

SOURCE = "https://github.com/DeepReinforcementLearning/DeepReinforcementLearningInAction/issues/42"
FAMILY = "stale_grad_accumulation"
EXPECT = dict(kind="stale_grad_accumulation", tensor="w1")
KNOWN_MISS = {}


def nn(x, w1, w2):
    l1 = x @ w1
    l1 = torch.relu(l1)
    l2 = l1 @ w2
    return l2


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    w1 = torch.randn(16, 8, requires_grad=True)
    w2 = torch.randn(8, 10, requires_grad=True)
    lr = 0.0001
    lossfn = torch.nn.CrossEntropyLoss()
    losses = []
    with watch():
        for _i in range(3):
            x = torch.rand(4, 16)
            target = torch.randint(0, 10, (4,))
            pred = nn(x, w1, w2)
            loss = lossfn(pred, target)
            losses.append(loss.item())
            loss.backward()  # <- culprit
            with torch.no_grad():
                w1 -= lr * w1.grad
                w2 -= lr * w2.grad


if __name__ == "__main__":  # gradwatch run <this file>
    run()
