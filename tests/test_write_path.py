"""The hand-written update's write path (issue 18): its steady state takes a short path that
records exactly what the general path records; a statistics pass's changes are computed
together at the flush, equal to the per-write formula; gradwatch's own NaN probes build no
graph (a probe made with grad on saved the parameter and held it)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._intercept.writes import Writes
from gradwatch._stats import ChangePair, change_table
from helpers import line_of

LEVELS = ["full", "light"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _nograd_loop(model: nn.Module, steps: int) -> None:
    x = torch.randn(16, 4)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad  # <nograd>
                p.grad = None


def _data_loop(model: nn.Module, steps: int) -> None:
    x = torch.randn(16, 4)
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        model.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.01)  # <data>


def _fields(w: gradwatch.Watch) -> list[tuple]:
    return [(e.kind.value, e.step, e.op, e.tensor, e.shape, e.dtype, e.device, e.version_before,
             e.version_after, e.grad_mode, e.location.lineno if e.location else None,
             None if e.change is None else (e.change.l2, e.change.rel, e.change.max_abs,
                                            e.change.nonfinite))
            for e in w.events]


@pytest.mark.parametrize(("loop", "level"), [(_nograd_loop, "full"), (_nograd_loop, "light"),
                                           (_data_loop, "full")])  # (light: no .data writes)
def test_the_short_path_records_what_the_general_path_records(level: str, loop, monkeypatch
                                                               ) -> None:
    def run() -> tuple[list[tuple], list]:
        model = _mlp()
        with gradwatch.watch(model, level=level, on_anomaly="log") as w:
            loop(model, 23)
        return _fields(w), w.anomalies

    short, short_anomalies = run()
    taken = []
    original = Writes._window_goes_on

    def general_only(self, func, t, frame):
        taken.append(original(self, func, t, frame) is not None)
        return None

    monkeypatch.setattr(Writes, "_window_goes_on", general_only)
    general, general_anomalies = run()
    assert short == general
    assert short_anomalies == general_anomalies == []
    # 23 passes × 4 parameters; the short path serves every write but those of pass 1 (they
    # open the windows) and of the statistics passes 10 and 20 (sampled; they open new ones)
    assert len(taken) == 92 and sum(taken) == 80
    writes = [f for f in short if f[0] == "inplace_no_grad"]
    assert len(writes) == 92
    line = line_of("nograd" if loop is _nograd_loop else "data")
    assert {f[10] for f in writes} == {line}
    with_change = [f for f in writes if f[11] is not None]
    assert len(with_change) == 8  # the statistics passes' writes (passes 10 and 20)


def _pairs() -> list[ChangePair]:
    torch.manual_seed(1)
    out = []
    for n in (8, 5, 1):
        before = torch.randn(n)
        out.append(ChangePair(before, before + torch.randn(n)))
    out.append(ChangePair(torch.zeros(3), torch.tensor([1.0, float("nan"), 2.0])))
    out.append(ChangePair(torch.ones(2), torch.tensor([1.0, float("inf")])))
    return out


def _expected(p: ChangePair) -> list[float]:
    before, after = p.before.double(), p.after.double()
    delta = after - before
    l2 = delta.norm().item()
    return [l2, l2 / max(before.norm().item(), 1e-12), delta.abs().max().item(),
            0.0 if torch.isfinite(after).all() else 1.0]


def _close(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-5, abs=1e-6)
               for x, y in zip(a, b, strict=True))


def test_the_table_of_changes_equals_the_per_write_formula() -> None:
    pairs = _pairs()
    table = change_table(pairs)
    assert table.shape == (len(pairs), 4) and table.dtype == torch.float32
    for row, p in zip(table.tolist(), pairs):
        assert _close(row, _expected(p)), (row, _expected(p))
    assert [row[3] for row in table.tolist()] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_mixed_dtypes_are_computed_one_by_one_with_the_same_values() -> None:
    pairs = _pairs()
    mixed = [ChangePair(p.before.double(), p.after.double()) if i % 2 else p
             for i, p in enumerate(pairs)]
    mixed.append(ChangePair(torch.tensor([1 + 1j]), torch.tensor([2 + 1j])))
    table = change_table(mixed)
    assert table.shape == (len(mixed), 4)
    for row, p in zip(table.tolist()[:-1], pairs):
        assert _close(row, _expected(p))
    assert _close(table.tolist()[-1], [1.0, 1.0 / math.sqrt(2), 1.0, 0.0])


@pytest.mark.parametrize("level", LEVELS)
def test_a_statistics_pass_reports_each_writes_own_change(level: str) -> None:
    a = torch.ones(4, requires_grad=True)
    b = torch.full((3,), 2.0, requires_grad=True)
    with gradwatch.watch(level=level, on_anomaly="log") as w, torch.no_grad():
        a += 1.0
        b *= 3.0
        a -= 4.0
    changes = [(e.shape, e.change.l2, e.change.rel, e.change.max_abs)
               for e in w.events if e.kind == "inplace_no_grad"]
    assert [c[0] for c in changes] == [(4,), (3,), (4,)]
    assert changes[0][1:] == pytest.approx((2.0, 1.0, 1.0))
    assert changes[1][1:] == pytest.approx((4.0 * math.sqrt(3), 2.0, 4.0))
    assert changes[2][1:] == pytest.approx((8.0, 2.0, 4.0))


@pytest.mark.parametrize("loop", [_nograd_loop, _data_loop])
def test_nan_probes_build_no_graph_and_hold_no_parameter(loop) -> None:
    """Windows close (and their probes run) with grad on: at the end of the watch and, in the
    ``.data`` loop, at every write. The model is freed inside the watch."""
    model = _mlp()
    ref = weakref.ref(model[0].weight)
    with gradwatch.watch(level="full", on_anomaly="log") as w:
        loop(model, 12)
        saved = w._runtime.saved.registry
        assert not any(saved.pending(p.untyped_storage().data_ptr())
                       for p in model.parameters())
        del model
        gc.collect()
        assert ref() is None
    assert w.anomalies == []


def _update(w: torch.Tensor) -> None:
    with torch.no_grad():
        w -= 0.1 * w.grad  # <update>


def test_light_names_a_short_path_write_in_torchs_version_error() -> None:
    """At light, torch's own version error is explained from the log of recent writes; a
    write the short path recorded (a tuple on its window's first record) is named like any."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False)
    w = model.weight
    with gradwatch.watch(model, level="light", on_anomaly="log") as watch:
        for _ in range(5):
            (w * w).sum().backward()
            _update(w)
            w.grad = None
        (w * w).sum().backward()
        loss = (w * w).sum()  # (mul saves w)
        _update(w)  # the bug: the weight changes between the forward and its backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss.backward()
        assert type(watch._runtime.saved.log[-1]) is tuple  # (the short path's record)
    (note,) = info.value.__notes__
    assert f"test_write_path.py:{line_of('update')} (`w -= 0.1 * w.grad" in note
    assert "`weight` was modified in place by sub_" in note and "version 6 → 7" in note
