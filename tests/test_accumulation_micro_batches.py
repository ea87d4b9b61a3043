"""Gradient accumulation (nanoGPT's loop: several backward passes, one step): after the first
micro-batch every further pass that sums into exactly the same gradients is taken in by the
pending pass (``AccumulationTracker.absorb``), without per-leaf bookkeeping. Whatever reads the
windows afterwards must see what the per-leaf path would have left: these tests run each loop
both ways and compare every anomaly, and check the findings themselves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.detectors._windows import AccumulationTracker

MICRO = 4


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.randn(16, 6), \
        torch.randint(0, 3, (16,))


def _micro_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        loss = F.cross_entropy(model(xb), yb) / MICRO
        loss.backward()  # the backward line


def _clean(model, opt, x, y, w) -> None:
    for _ in range(4):
        _micro_batches(model, x, y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _zeroed_before_step(model, opt, x, y, w) -> None:
    _clean(model, opt, x, y, w)
    _micro_batches(model, x, y)
    opt.zero_grad()  # the bug: the accumulated window is dropped before any step used it
    opt.step()


def _never_zeroed(model, opt, x, y, w) -> None:
    for _ in range(3):  # the bug: no zero_grad, each step's window keeps the last one's sum
        _micro_batches(model, x, y)
        opt.step()


def _edited_mid_window(model, opt, x, y, w) -> None:
    _clean(model, opt, x, y, w)
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        (F.cross_entropy(model(xb), yb) / MICRO).backward()
        model[0].weight.data.mul_(0.99)  # the bug: the weights change inside the window
    opt.step()
    opt.zero_grad()


def _read_mid_window(model, opt, x, y, w) -> None:
    _clean(model, opt, x, y, w)
    norms = []
    for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
        (F.cross_entropy(model(xb), yb) / MICRO).backward()
        norms.append(float(model[2].weight.grad.norm()))  # logging: a read per micro-batch
    opt.step()
    opt.zero_grad()


LOOPS = [_clean, _zeroed_before_step, _never_zeroed, _edited_mid_window, _read_mid_window]


def _run(loop, level: str, absorb: bool) -> tuple[list, dict, list]:
    model, opt, x, y = _setup()
    original = AccumulationTracker.absorb
    if not absorb:
        AccumulationTracker.absorb = lambda self, *a: None  # type: ignore[method-assign]
    try:
        with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
            loop(model, opt, x, y, w)
    finally:
        AccumulationTracker.absorb = original  # type: ignore[method-assign]
    anomalies = [(e.kind.value, e.tensor, e.step, e.location.lineno if e.location else None,
                  e.message) for e in w.anomalies]
    findings = [(f["event"].kind.value, f["count"], f["tensors"]) for f in w.distinct_anomalies()]
    return anomalies, dict(w.counts), findings


def test_each_loop_reports_the_same_with_and_without_the_absorbing_pass() -> None:
    for loop in LOOPS:
        for level in ("full", "light"):
            assert _run(loop, level, True) == _run(loop, level, False), (loop.__name__, level)


def test_a_clean_accumulation_loop_is_absorbed_and_silent() -> None:
    model, opt, x, y = _setup()
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        _clean(model, opt, x, y, w)
        _micro_batches(model, x, y)
        pending = w._runtime.acc.windows.pending
        assert pending is not None and pending.accum == MICRO  # one pending record, 4 sums
        opt.step()
    assert w.distinct_anomalies() == []
    assert w.counts["grad_accumulated"] == 5 * MICRO * 4  # every micro-batch, every leaf


def test_an_accumulated_window_zeroed_before_the_step_names_its_sum() -> None:
    anomalies, _, findings = _run(_zeroed_before_step, "light", True)
    assert [f[:2] for f in findings] == [("accumulated_grad_discarded", 4)]
    assert findings[0][2] == ["0.weight.grad", "0.bias.grad", "2.weight.grad", "2.bias.grad"]
    assert all(f"held {MICRO} accumulated gradient(s)" in a[4] for a in anomalies)


def test_a_forgotten_zero_grad_in_an_accumulation_loop_is_a_stale_sum() -> None:
    _, _, findings = _run(_never_zeroed, "light", True)
    assert [f[0] for f in findings] == ["stale_grad_accumulation"]
    assert findings[0][2] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_weight_edited_inside_the_window_is_a_stale_sum() -> None:
    _, _, findings = _run(_edited_mid_window, "full", True)
    assert [(f[0], f[2]) for f in findings] == [("stale_grad_accumulation", ["0.weight"])]
