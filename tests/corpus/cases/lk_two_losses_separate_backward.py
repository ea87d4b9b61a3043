"""Correct: DAFormer backpropagates its source loss and its mixed-image loss
separately (to free the first graph early), then takes one optimizer step -- the gradients of
both losses accumulate, as with summing the losses.

Source: https://github.com/lhoyer/DAFormer/issues/48
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/lhoyer/DAFormer/issues/48"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    with watch(model, optimizer):
        for _ in range(2):
            optimizer.zero_grad()
            src_img, src_lbl = torch.rand(1, 3, 8, 8), torch.randint(0, 5, (1, 8, 8))
            src_loss = nn.functional.cross_entropy(model(src_img), src_lbl)
            src_loss.backward()
            mix_img, pseudo_lbl = torch.rand(1, 3, 8, 8), torch.randint(0, 5, (1, 8, 8))
            mix_loss = nn.functional.cross_entropy(model(mix_img), pseudo_lbl)
            mix_loss.backward()
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
