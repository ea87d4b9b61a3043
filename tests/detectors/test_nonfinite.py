"""NonfiniteDetector alone: no training loop, no watch(). Its inputs are the finiteness probes
(:func:`gradwatch._stats.probe`) of tensors before and after real writes, with the write's
record, and an optimizer step's norm vector (:func:`gradwatch._stats.update_norms`); it reads
them lazily, at a statistics step boundary or the end, and reports through a real Emitter."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from gradwatch._context import RunContext, version
from gradwatch._stats import probe, sample, update_norms
from gradwatch.config import Config
from gradwatch.detectors.nonfinite import HINT, NonfiniteDetector
from gradwatch.events import EventKind, Location
from gradwatch.records.emit import Emitter
from gradwatch.records.raw import Raw

K = EventKind


def here() -> tuple:
    frame = sys._getframe(1)
    return (frame.f_code, frame.f_lineno)


def parts(**options) -> tuple[RunContext, Emitter, NonfiniteDetector]:
    ctx = RunContext(Config.build(None, None, on_anomaly="log", **options))
    emit = Emitter(max_events=100, on_anomaly="log")
    return ctx, emit, NonfiniteDetector(ctx, emit)


def write(det: NonfiniteDetector, name: str | None, t: torch.Tensor, func, edit, where: tuple,
          step: int = 0) -> Raw:
    """Write ``edit(t)`` in place under no_grad and hand the detector what the mode would."""
    before = probe([t])
    vb = version(t)
    with torch.no_grad():
        edit(t)
    raw = Raw(K.INPLACE_NO_GRAD, func, name, tuple(t.shape), t.dtype, t.device, vb, version(t),
              "no_grad", None, where, step)
    det.wrote(before, probe([t]), [raw])
    return raw


def test_a_write_that_makes_a_finite_weight_nan_is_reported_at_its_line() -> None:
    ctx, emit, det = parts()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    ctx.names.add_module(model)
    w = model[0].weight
    v0 = w._version
    where = here()
    write(det, "0.weight", w, torch.Tensor.div_, lambda t: t.div_(torch.zeros(())), where)
    assert list(emit.anomalies) == []  # probes queued, not read yet (no sync per write)
    det.end_step(final=True)

    [ev] = emit.anomalies
    assert (ev.kind, ev.severity, ev.op, ev.tensor) == (K.NONFINITE_INTRODUCED, "error", "div_",
                                                        "0.weight")
    assert (ev.version_before, ev.version_after, ev.shape, ev.grad_mode) == (v0, v0 + 1, (2, 3),
                                                                            "no_grad")
    assert ev.location == Location(__file__, where[1], where[0].co_name, "where = here()")
    assert ev.message == "div_ wrote NaN/Inf into `0.weight`, which was finite before"
    assert ev.hint == HINT and ev.change is None
    assert emit.buffer.counts == {"nonfinite_introduced": 1}


def test_only_the_first_write_that_broke_each_tensor_is_reported() -> None:
    _ctx, emit, det = parts()
    a, b, c = torch.ones(4), torch.ones(4), torch.ones(3)
    d = torch.tensor([float("nan"), 1.0])
    first = here()
    write(det, "a", a, torch.Tensor.mul_, lambda t: t.mul_(float("inf")), first)
    write(det, "a", a, torch.Tensor.add_, lambda t: t.add_(1.0), here())  # inf stays: not new
    write(det, "b", b, torch.Tensor.add_, lambda t: t.add_(1.0), here())  # finite -> finite
    write(det, "d", d, torch.Tensor.mul_, lambda t: t.mul_(2.0), here())  # NaN before: not new
    write(det, "c", c, torch.Tensor.copy_,
          lambda t: t.copy_(torch.tensor([0.0, float("nan"), 1.0])), here())
    with torch.no_grad():
        a.copy_(torch.ones(4))  # repaired, then broken again by another line: already reported
    write(det, "a", a, torch.Tensor.sqrt_, lambda t: t.sub_(2).sqrt_(), here())
    det.end_step(final=True)

    assert [(e.tensor, e.op) for e in emit.anomalies] == [("a", "mul_"), ("c", "copy_")]
    assert emit.anomalies[0].location.lineno == first[1]
    assert emit.anomalies[1].tensor == "c" and emit.anomalies[1].shape == (3,)


def test_an_unnamed_tensor_is_reported_under_its_description_once() -> None:
    _ctx, emit, det = parts()
    t = torch.ones(2, 2, dtype=torch.float64)
    write(det, None, t, torch.Tensor.log_, lambda x: x.sub_(1).log_(), here())
    write(det, None, torch.ones(2, 2, dtype=torch.float64), torch.Tensor.log_,
          lambda x: x.sub_(1).log_(), here())  # same description: the same finding
    det.end_step(final=True)
    [ev] = emit.anomalies
    assert ev.tensor == "tensor float64[2,2]"
    assert ev.message == "log_ wrote NaN/Inf into `tensor float64[2,2]`, which was finite before"


def test_probes_are_read_only_at_statistics_steps_or_the_end() -> None:
    ctx, emit, det = parts(stats_every=5)
    t = torch.ones(3)
    write(det, "t", t, torch.Tensor.mul_, lambda x: x.mul_(float("nan")), here())
    ctx.steps = 3  # not a statistics step: the probes wait (no sync)
    det.end_step(final=False)
    assert list(emit.anomalies) == [] and len(det.queue.pending) == 1
    ctx.steps = 5
    det.end_step(final=False)
    assert [e.tensor for e in emit.anomalies] == ["t"] and det.queue.pending == []


def test_a_full_queue_is_read_at_once() -> None:
    ctx, emit, det = parts()
    ctx.steps = 1  # no statistics step comes
    limit = det.queue.limit
    t = torch.ones(1)
    for _ in range(limit - 1):
        write(det, "t", t, torch.Tensor.add_, lambda x: x.add_(0.0), here())
    assert list(emit.anomalies) == [] and len(det.queue.pending) == limit - 1
    write(det, "t", t, torch.Tensor.mul_, lambda x: x.mul_(float("inf")), here())
    assert [e.tensor for e in emit.anomalies] == ["t"] and det.queue.pending == []


def test_an_optimizer_step_that_makes_one_parameter_nan_names_it() -> None:
    """The step's vector holds norms of strided samples before/after and of each whole parameter
    after: a NaN outside the sampled elements is still caught (by the whole parameter)."""
    ctx, emit, det = parts()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 10), nn.Linear(10, 2))
    ctx.names.add_module(model)
    params = list(model.parameters())
    k = len(params)
    big = params[0]
    assert sample(big).numel() < big.numel()  # 1000 elements: a strided sample
    before = [sample(p) for p in params]
    versions = [p._version for p in params]
    with torch.no_grad():  # the "update": the NaN lands between the sampled elements
        for p in params:
            p.add_(0.01)
        big.view(-1)[1] = float("nan")
    after = [sample(p) for p in params]
    assert all(bool(torch.isfinite(s).all()) for s in after)
    vec = update_norms(before, after, params)
    assert vec.numel() == 4 * k
    where = here()
    det.stepped(vec, k, params, versions, where, 6)
    assert list(emit.anomalies) == []
    det.end_step(final=True)

    [ev] = emit.anomalies
    assert (ev.kind, ev.op, ev.tensor, ev.step) == (K.NONFINITE_INTRODUCED, "optimizer.step",
                                                    "0.weight", 6)
    assert (ev.version_before, ev.version_after) == (versions[0], versions[0] + 2)
    assert (ev.shape, ev.location.lineno) == ((10, 100), where[1])
    assert ev.message == "optimizer.step wrote NaN/Inf into `0.weight`, which was finite before"


@pytest.mark.parametrize(("op", "code", "starts"), [
    ("optimizer.step", "opt.step()", "lower the learning rate or clip"),
    ("div_", "p.div_(norm)", "guard the division"),
    ("sub_", "p -= lr * g / (v.sqrt() + eps)", "add eps inside the square root"),
    ("copy_", "p.copy_(x.log())", "clamp what this line takes the log of"),
    ("mul_", "p.mul_(scale)", "check what this line writes"),
])
def test_the_hint_follows_the_op_and_the_line(op: str, code: str, starts: str) -> None:
    from gradwatch.detectors.nonfinite import hint_for

    assert hint_for(op, code).startswith(starts)
