"""Hand-written updates (a parameter no optimizer holds) are probed for NaN/Inf once per window
of writes from one line, not per write (issue 18): the line and op of the write that broke a
tensor stay exact, a NaN written at a non-statistics pass is still found, and a loop's steady
state probes nothing per write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch.detectors.nonfinite as nonfinite_module
from helpers import anomalies, line_of

LEVELS = ["full", "light"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _found(w: gradwatch.Watch) -> list[tuple[str, str, str, int]]:
    return sorted((a.kind.value, a.tensor, a.op, a.location.lineno) for a in w.anomalies)


@pytest.mark.parametrize("level", LEVELS)
def test_a_nan_from_the_update_line_at_a_non_statistics_pass_is_found_there(level: str) -> None:
    model = _mlp()
    x = torch.randn(16, 4)
    with gradwatch.watch(model, on_anomaly="log", level=level) as w:
        for i in range(25):
            model(x).pow(2).mean().backward()
            lr = float("inf") if i == 13 else 0.01  # pass 14: no statistics pass
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad  # <update>
                    p.grad = None
            if i >= 13:
                break
    line = line_of("update")
    assert _found(w) == [("nonfinite_introduced", n, "sub_", line)
                         for n in ("0.bias", "0.weight", "2.bias", "2.weight")]
    assert all(e.step == 0 and e.version_after > e.version_before for e in w.anomalies)


@pytest.mark.parametrize("level", LEVELS)
def test_the_line_that_broke_the_tensor_is_named_not_an_earlier_one(level: str) -> None:
    """Two lines write the same parameter in every pass: each write keeps its own before and
    after (a second line closes the first line's window)."""
    model = _mlp()
    x = torch.randn(16, 4)
    with gradwatch.watch(model, on_anomaly="log", level=level) as w:
        for i in range(6):  # (the last pass breaks 0.weight: no later pass spreads the NaN)
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.01)  # <sgd>
                    p.grad = None
                w0 = model[0].weight
                w0.mul_(0.0 if i == 5 else 1.0)  # <decay>
                w0.div_(w0.norm())  # <normalise>
    assert anomalies(w) == [("nonfinite_introduced", "0.weight", line_of("normalise"))]
    assert w.anomalies[0].op == "div_"


@pytest.mark.parametrize("level", LEVELS)
def test_a_nan_already_there_is_not_reported_again(level: str) -> None:
    model = _mlp()
    x = torch.randn(16, 4)
    with torch.no_grad():
        model[2].bias[0] = float("nan")  # before the watch: not introduced by the loop
    with gradwatch.watch(model, on_anomaly="log", level=level) as w:
        for _ in range(12):
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    # the NaN spreads through the loss to every gradient, then into every parameter by the
    # update: all of them but 2.bias were finite before
    assert {a.tensor for a in w.anomalies} == {"0.weight", "0.bias", "2.weight"}


@pytest.mark.parametrize("level", LEVELS)
def test_a_freed_parameter_with_an_open_window_is_dropped_quietly(level: str) -> None:
    x = torch.randn(16, 4)
    with gradwatch.watch(on_anomaly="log", level=level) as w:
        for _ in range(3):
            model = _mlp()
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
            del model, p
    assert w.anomalies == []


def test_steady_state_writes_probe_once_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written loop's writes probe nothing each: one fused probe per window (every
    ``stats_every`` passes) for all parameters."""
    calls: list[int] = []
    real = nonfinite_module.probe

    def counting(tensors):
        calls.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(nonfinite_module, "probe", counting)
    model = _mlp()
    x = torch.randn(16, 4)
    with gradwatch.watch(model, on_anomaly="log", level="light", stats_every=10) as w:
        for i in range(41):
            if i == 10:
                calls.clear()  # past the first windows
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
        during = list(calls)
    assert w.anomalies == []
    assert during == [4, 4, 4]  # 30 passes, 120 writes: three fused probes of the 4 parameters


def test_a_data_alias_update_is_windowed_as_its_parameter() -> None:
    """``p.data.add_`` (pytorch/examples' regression, full): each ``.data`` is a new tensor with
    a version counter of its own; its write is probed as the parameter it shows whole, in the
    parameter's window, and a NaN it writes is still named at its line."""
    model = _mlp()
    x = torch.randn(16, 4)
    with gradwatch.watch(model, on_anomaly="log", level="full") as w:
        for i in range(14):
            model.zero_grad()
            model(x).pow(2).mean().backward()
            lr = float("nan") if i == 13 else 0.01
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)  # <data_update>
    line = line_of("data_update")
    assert _found(w) == [("nonfinite_introduced", n, "add_", line)
                         for n in ("0.bias", "0.weight", "2.bias", "2.weight")]
