"""Correct: adversarial training with an FGSM/PGD attack -- the input gets
``requires_grad``, ``torch.autograd.grad(cost, images)`` gives its gradient (no parameter
``.grad`` is touched), the perturbed images are detached, then the model trains on them with
an SGD optimizer using weight decay.

Source: https://github.com/Harry24k/adversarial-attacks-pytorch/issues/57
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/Harry24k/adversarial-attacks-pytorch/issues/57"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    eps, alpha = 0.1, 0.05
    with watch(model, optimizer):
        for images, labels in [(torch.rand(4, 6), torch.randint(0, 3, (4,)))] * 2:
            adv_images = images.clone().detach()
            for _ in range(2):
                adv_images.requires_grad = True
                cost = loss_fn(model(adv_images), labels)
                grad = torch.autograd.grad(cost, adv_images, retain_graph=False,
                                           create_graph=False)[0]
                adv_images = adv_images.detach() + alpha * grad.sign()
                delta = torch.clamp(adv_images - images, min=-eps, max=eps)
                adv_images = torch.clamp(images + delta, min=0, max=1).detach()
            loss = loss_fn(model(adv_images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
