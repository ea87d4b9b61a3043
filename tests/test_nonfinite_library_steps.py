"""A library optimizer's step is probed for NaN/Inf on statistics steps only. One that writes
NaN/Inf at a step in between is still found: at the next statistics step (finite after the last
check, non-finite before this one), or when the watch ends (also through an exception)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from helpers import line_of


def _loop(w_steps: int, nan_at: int, raise_after: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for i in range(w_steps):
        scale = float("nan") if i == nan_at else 1.0
        loss = m(torch.randn(3, 4)).sum() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()  # <step>
        if raise_after and i == nan_at:
            raise ValueError("the script fails on the NaN")
    return m


@pytest.mark.parametrize("steps", [12, 4])
def test_a_nan_written_between_statistics_steps_is_found(steps: int) -> None:
    with gradwatch.watch(on_anomaly="log", stats_every=5) as w:
        model = _loop(steps, nan_at=2)  # (alive when the watch ends: checked then)
    [f] = w.distinct_anomalies()
    ev = f["event"]
    assert (ev.kind.value, ev.severity, ev.location.lineno) == (
        "nonfinite_introduced", "error", line_of("step"))
    assert sorted(f["tensors"]) == ["bias", "weight"]
    assert "between 0 and" in ev.message
    assert not torch.isfinite(model.weight).all()


def test_a_nan_is_found_when_the_script_then_raises() -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    with pytest.raises(ValueError), gradwatch.watch(on_anomaly="log") as w:
        for i in range(6):
            loss = m(torch.randn(3, 4)).sum() * (float("nan") if i == 3 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == 3:
                raise ValueError("the script fails on the NaN")
    assert [f["event"].kind.value for f in w.distinct_anomalies()] == ["nonfinite_introduced"]


def test_finite_training_stays_silent() -> None:
    with gradwatch.watch(on_anomaly="log", stats_every=3) as w:
        _loop(10, nan_at=-1)
    assert w.distinct_anomalies() == []
