"""MAML-Pytorch: with ``update_step=1`` the query loss used for the meta-update is the one
computed inside ``with torch.no_grad():`` (the loop that would recompute it with grad is
skipped), so the meta ``loss_q.backward()`` fails with "element 0 of tensors does not require
grad and does not have a grad_fn".

Source: https://github.com/dragen1860/MAML-Pytorch/issues/40
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = "https://github.com/dragen1860/MAML-Pytorch/issues/40"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    meta_optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    update_step = 1
    with watch(net, meta_optim):
        x_spt, y_spt = torch.randn(5, 4), torch.randint(0, 3, (5,))
        x_qry, y_qry = torch.randn(5, 4), torch.randint(0, 3, (5,))
        losses_q = [0 for _ in range(update_step + 1)]
        loss = F.cross_entropy(net(x_spt), y_spt)
        grad = torch.autograd.grad(loss, list(net.parameters()))
        fast_weights = [p - 0.4 * g for g, p in zip(grad, net.parameters())]
        with torch.no_grad():
            logits_q = F.linear(x_qry, *fast_weights)  # <- culprit
            loss_q = F.cross_entropy(logits_q, y_qry)
            losses_q[1] += loss_q
        for _k in range(1, update_step):
            pass  # skipped when update_step == 1: the query loss is never recomputed with grad
        loss_q = losses_q[-1] / 1
        meta_optim.zero_grad()
        try:
            loss_q.backward()
        except RuntimeError as err:
            return err
        meta_optim.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
