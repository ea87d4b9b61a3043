"""A loss re-made from Python values through a list (REINFORCE with ``log_prob(...).item()``
collected, then ``torch.tensor(values, requires_grad=True).sum()``): its graph reaches only the
re-made leaf, no parameter; reported at the cut once an optimizer has stepped. Look-alikes: a
tensor of inputs made with requires_grad that the model also reads, and a loop that uses torch
only to differentiate numpy values (no optimizer)."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from helpers import line_of


def test_a_loss_rebuilt_from_item_values_is_a_cut_at_the_item_line() -> None:
    torch.manual_seed(0)
    policy = nn.Linear(4, 2)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    with gradwatch.watch(policy, opt, on_anomaly="log") as w:
        for _ in range(3):
            saved = []
            for _t in range(4):
                m = torch.distributions.Categorical(logits=policy(torch.randn(4)))
                saved.append(m.log_prob(m.sample()).item())  # <item>
            returns = torch.randn(4).tolist()
            loss = torch.tensor([-lp * r for lp, r in zip(saved, returns)],
                                requires_grad=True).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    [f] = w.distinct_anomalies()
    ev = f["event"]
    assert (ev.kind.value, ev.severity, ev.op, ev.location.lineno) == (
        "grad_flow_cut", "error", "item", line_of("item"))
    assert (f["first_step"], f["last_step"], f["count"]) == (1, 2, 2)


def test_remade_leaves_that_the_model_reads_or_numpy_driven_loops_are_silent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    values = [[0.1, 0.2, 0.3]] * 4
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(3):
            out = model(torch.randn(4, 3))
            print(out.mean().item())
            x = torch.tensor(values, requires_grad=True)  # input gradients (saliency)
            loss = model(x).sum() + out.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.distinct_anomalies() == []
    z_values = [0.5, -0.3]
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(4):
            z = torch.tensor(z_values, requires_grad=True)
            loss = (z ** 2).sum()
            print(loss.item())
            loss.backward()
            z_values = (z - 0.1 * z.grad).tolist()
    assert w.distinct_anomalies() == []
