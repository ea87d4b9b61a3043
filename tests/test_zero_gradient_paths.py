"""Issue 15, 1(c): a silent cut through a node whose gradient is zero everywhere (round, sign,
floor, ceil, trunc) made in user code: the parameters the loss reaches only through it get an
exactly zero gradient. Reported at the op's line (full level), once per finding; other paths
that carry the gradient, straight-through estimators and rounding outside the loss stay silent."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from helpers import line_of


def _findings(w: gradwatch.Watch) -> list[tuple[str, int, list[str]]]:
    return [(f["event"].kind.value, f["event"].location.lineno, sorted(f["tensors"]))
            for f in w.distinct_anomalies()]


def test_sign_in_the_loss_path_zeroes_the_gradient_of_the_layers_behind_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(3):
            x, y = torch.randn(8, 3), torch.randn(8, 1).sign()
            vote = torch.sign(model(x))  # <sign>
            loss = (vote - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
            opt.step()
    assert _findings(w) == [("grad_flow_cut", line_of("sign"),
                             ["0.bias", "0.weight", "2.bias", "2.weight"])]
    [f] = w.distinct_anomalies()
    assert f["event"].severity == "error" and f["event"].op == "sign"
    assert (f["first_step"], f["last_step"], f["count"]) == (0, 2, 12)


def test_floor_on_one_branch_while_another_carries_the_gradient_is_silent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(4):
            out = model(torch.randn(8, 3))
            loss = torch.floor(out * 3).mean() + out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.enable_grad():
                torch.ceil(model(torch.randn(2, 3)))  # never backwarded: no graph of a loss
    assert w.distinct_anomalies() == []


def test_round_of_a_detached_value_and_light_are_silent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for level in ("full", "light"):
        with gradwatch.watch(model, opt, on_anomaly="log", level=level) as w:
            for _ in range(2):
                out = model(torch.randn(8, 3))
                q = out + (torch.round(out) - out).detach()
                loss = q.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        assert w.distinct_anomalies() == [], level
