"""Issue 15, the window contract: gradients an optimizer holds keep summing and no step ever uses
them (a step condition that never fires). Certain only when the watch ends without any optimizer
step: reported then, at the backward line, also when the model and optimizer are gone by then
(``gradwatch run``: the script's function returned)."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from helpers import line_of


def _train(steps_when, n: int = 6, accum: int = 4) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(n):
        model(torch.randn(8, 3)).pow(2).mean().backward()  # <backward>
        if steps_when(i, accum):
            opt.step()
            opt.zero_grad()


def test_a_step_condition_that_never_fires_is_reported_when_the_watch_ends() -> None:
    with gradwatch.watch(on_anomaly="log") as w:
        _train(lambda i, accum: i % accum == accum)  # never true
    [f] = w.distinct_anomalies()
    ev = f["event"]
    assert (ev.kind.value, ev.severity, ev.location.lineno) == (
        "grad_never_applied", "warning", line_of("backward"))
    assert sorted(f["tensors"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "summed 6 backward passes" in ev.message and "SGD holds" in ev.message


def test_accumulation_that_steps_or_has_no_optimizer_is_silent() -> None:
    with gradwatch.watch(on_anomaly="log") as w:
        _train(lambda i, accum: (i + 1) % accum == 0)  # the usual accumulation
        _train(lambda i, accum: False, n=2)  # two passes: not three
    assert w.distinct_anomalies() == []
    x = torch.randn(8, 3, requires_grad=True)
    model = nn.Linear(3, 1)  # no optimizer: input saliency summed over batches
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(5):
            model(x).sum().backward()
    assert w.distinct_anomalies() == []


def test_a_full_batch_gradient_stepped_after_the_loop_is_silent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(5):
            model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    assert w.distinct_anomalies() == []
