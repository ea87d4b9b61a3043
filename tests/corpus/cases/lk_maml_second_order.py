"""Correct: MAML with more than one inner step -- the inner updates are functional
(``fast_weights = p - lr * g`` from ``torch.autograd.grad(..., create_graph=True)``), the query
loss is recomputed with grad enabled, and the meta-optimizer steps the real parameters (the
issue's failure only occurs when the grad-enabled query loss is skipped).

Source: https://github.com/dragen1860/MAML-Pytorch/issues/40
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/dragen1860/MAML-Pytorch/issues/40"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    meta_optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    with watch(net, meta_optim):
        for _ in range(2):
            x_spt, y_spt = torch.randn(5, 4), torch.randint(0, 3, (5,))
            x_qry, y_qry = torch.randn(5, 4), torch.randint(0, 3, (5,))
            fast_weights = list(net.parameters())
            for _k in range(2):
                loss = F.cross_entropy(F.linear(x_spt, *fast_weights), y_spt)
                grad = torch.autograd.grad(loss, fast_weights, create_graph=True)
                fast_weights = [w - 0.4 * g for g, w in zip(grad, fast_weights)]
            with torch.no_grad():
                accuracy = (F.linear(x_qry, *fast_weights).argmax(1) == y_qry).float().mean()
            loss_q = F.cross_entropy(F.linear(x_qry, *fast_weights), y_qry)
            meta_optim.zero_grad()
            loss_q.backward()
            meta_optim.step()
            del accuracy


if __name__ == "__main__":  # gradwatch run <this file>
    run()
