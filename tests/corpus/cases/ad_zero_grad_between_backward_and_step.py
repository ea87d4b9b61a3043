"""HyperStyle coach: asking whether the multi-iteration update can become "one loss backward and
one optimizer step in the for loop", the user proposes ``loss.backward(); opt.zero_grad();
opt.step()`` -- zeroing between backward and step wipes the gradients just computed, so the
step never uses them.

Source: https://github.com/yuval-alaluf/hyperstyle/issues/40
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/yuval-alaluf/hyperstyle/issues/40"
FAMILY = "accumulated_grad_discarded"
EXPECT = dict(kind="accumulated_grad_discarded", tensor="weight.grad")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = nn.Linear(6, 6)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    with watch(net, opt):
        for x in [torch.randn(2, 6)] * 2:
            y_hat = x
            for _iter in range(2):
                y_hat = net(y_hat.detach())
                loss = (y_hat - x).pow(2).mean()
                loss.backward()
                opt.zero_grad()  # <- culprit
                opt.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
