"""Fail-open: an internal error in any layer of gradwatch (function mode, hooks, detectors,
sinks) is caught, warned about once (naming the part that stopped), and the training run
completes bit-identical to an unwatched run. The user's own exceptions pass through unchanged."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._assembly import Runtime
from gradwatch._failopen import Part
from gradwatch._intercept.backward import Backward
from gradwatch._intercept.modules import Modules
from gradwatch._intercept.optimizer import Optimizers
from gradwatch._intercept.writes import Writes
from gradwatch._intercept.zero_grad import ZeroGrad
from gradwatch.detectors._saved_registry import SavedTensorRegistry
from gradwatch.detectors._windows import AccumulationTracker
from gradwatch.detectors.accumulation import AccumulationDetector
from gradwatch.sinks.jsonl import JsonlSink

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


class Injected(ZeroDivisionError):
    """The fault we inject (an unusual type, so it cannot be confused with anything real)."""


def _boom(*args, **kwargs):
    raise Injected("injected fault")


def _train(watched: bool, level: str = "full", log_dir: str | None = None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses: list[torch.Tensor] = []

    def body() -> None:
        for i in range(STEPS):
            x = torch.randn(5, 4, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad(set_to_none=i % 2 == 0)  # both reset paths
            loss.backward()
            opt.step()
            with torch.no_grad():
                model[0].weight.mul_(0.99)  # a user edit: exercises the mode's in-place path
            losses.append(loss.detach())

    w = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if watched:
            with gradwatch.watch(model, opt, level=level, log_dir=log_dir) as w:
                body()
        else:
            body()
    ours = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    return model, losses, ours, w


@pytest.fixture(scope="module")
def reference():
    model, losses, _, _ = _train(False)
    return [p.detach().clone() for p in model.parameters()], losses


def _assert_identical(reference, model, losses) -> None:
    ref_params, ref_losses = reference
    assert len(losses) == len(ref_losses) == STEPS
    for a, b in zip(ref_params, model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)


# Fault injection keyed by part: (part, owner, attribute the fault is injected into, levels where
# that part runs, needs log_dir). The warning names the part; a sink is named "sink <class>".
GUARDED = [
    (Part.MODE, Writes, "on_inplace", ("full", "light"), False),
    (Part.MODE, Writes, "_after_write", ("full", "light"), False),
    (Part.MODE, Writes, "_before_write", ("full", "light"), False),
    (Part.ACCUMULATION, AccumulationTracker, "accumulated", ("full", "light"), False),
    (Part.ACCUMULATION, AccumulationDetector, "zero_grad", ("full", "light"), False),
    (Part.SAVED_TENSORS, SavedTensorRegistry, "_pack", ("full",), False),
    (Part.BACKWARD, Backward, "_before", ("full", "light"), False),
    (Part.OPTIMIZER, Optimizers, "_after_update", ("full", "light"), False),
    (Part.FLUSH, Runtime, "_end_step", ("full", "light"), False),
    ("sink JsonlSink", JsonlSink, "write_records", ("full",), True),
    ("sink JsonlSink", JsonlSink, "step", ("full",), True),
    ("sink JsonlSink", JsonlSink, "flush", ("full",), True),
]


def _cases(table):
    return [
        pytest.param(owner, attr, getattr(part, "value", part), level, needs_dir,
                     id=f"{getattr(part, 'name', part)}-{owner.__name__}.{attr}-{level}")
        for part, owner, attr, levels, needs_dir in table
        for level in levels
    ]


def _check_fail_open(monkeypatch, tmp_path, reference, clean, owner, attr, part, level, needs_dir):
    monkeypatch.setattr(owner, attr, _boom)
    log_dir = str(tmp_path / "run") if needs_dir else None
    model, losses, ours, _ = _train(True, level=level, log_dir=log_dir)
    _assert_identical(reference, model, losses)
    assert len(ours) == 1, ours
    assert ours[0].startswith(f"gradwatch: internal error in {part} (Injected: injected fault)")
    assert "switched off" in ours[0]
    assert clean() == {}


@pytest.mark.parametrize(("owner", "attr", "part", "level", "needs_dir"), _cases(GUARDED))
def test_fault_in_layer_is_contained(monkeypatch, tmp_path, reference, clean, owner, attr, part,
                                     level, needs_dir) -> None:
    _check_fail_open(monkeypatch, tmp_path, reference, clean, owner, attr, part, level, needs_dir)


# The callables torch (or the mode) calls directly. A fault in them must not escape either: the
# boundaries (backward, optimizer step hooks, module discovery, zero_grad).
BOUNDARY = [
    (Part.ACCUMULATION, Backward, "_accumulated", ("full", "light"), False),
    (Part.OPTIMIZER, Optimizers, "on_step_pre", ("full", "light"), False),
    (Part.OPTIMIZER, Optimizers, "on_step_post", ("full", "light"), False),
    (Part.NAMING, Modules, "_on_call", ("full", "light"), False),
    (Part.BACKWARD, Backward, "_wrapper", ("full", "light"), False),
    (Part.ACCUMULATION, ZeroGrad, "_wrapper", ("full", "light"), False),
]


@pytest.mark.parametrize(("owner", "attr", "part", "level", "needs_dir"), _cases(BOUNDARY))
def test_fault_at_hook_boundary_is_contained(monkeypatch, tmp_path, reference, clean, owner, attr,
                                             part, level, needs_dir) -> None:
    _check_fail_open(monkeypatch, tmp_path, reference, clean, owner, attr, part, level, needs_dir)


def test_fault_in_unpack_keeps_torchs_version_check(monkeypatch, clean) -> None:
    """torch calls the registry's unpack itself: a fault while it words a real version error is
    reported once, and backward still fails as torch would (never with a silently wrong grad)."""
    from gradwatch.detectors import _saved_registry

    monkeypatch.setattr(_saved_registry, "_version_error", _boom)
    w_ = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(on_anomaly="log"):
            h = w_ * 2
            out = h.exp()  # saves its output
            with torch.no_grad():
                out.add_(1)
            with pytest.raises(RuntimeError, match=r"modified by an inplace operation: is at "
                                                   r"version 1; expected version 0 instead"):
                out.sum().backward()
            (w_ * 3).exp().sum().backward()  # saved tensors pass through from here on
    ours = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert [m[:61] for m in ours] == [
        "gradwatch: internal error in saved tensors (Injected: injecte"]
    assert torch.equal(w_.grad, 3 * torch.exp(torch.full((3,), 3.0)))
    assert clean() == {}


@pytest.mark.parametrize("level", ["full", "light"])
def test_sink_anomaly_fault_keeps_anomaly_in_memory(monkeypatch, tmp_path, clean, level) -> None:
    """A sink failing on anomaly() is switched off; the anomaly itself is still recorded."""
    monkeypatch.setattr(JsonlSink, "anomaly", _boom)
    p = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(log_dir=str(tmp_path), level=level) as w:
            with torch.no_grad():
                p.div_(0)
            (p * 2).sum().backward()
    ours = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert [a.kind for a in w.anomalies] == ["nonfinite_introduced"]
    internal = [m for m in ours if "internal error" in m]
    assert internal == [
        "gradwatch: internal error in sink JsonlSink (Injected: injected fault); sink JsonlSink is "
        "switched off for the rest of this run, training continues unchanged"
    ]
    assert clean() == {}


@pytest.mark.parametrize("level", ["full", "light"])
def test_failed_optimizer_layer_causes_no_false_anomalies(monkeypatch, reference, level) -> None:
    """A failed optimizer-hook part leaves the accumulation detector off too (it cannot know
    when gradients are consumed): no false accumulated_grad_discarded at every zero_grad."""
    monkeypatch.setattr(Optimizers, "_about_to_update", _boom)
    model, losses, ours, w = _train(True, level=level)
    _assert_identical(reference, model, losses)
    assert w.anomalies == []
    assert len(ours) == 1 and "internal error in optimizer hooks" in ours[0]


@pytest.mark.parametrize("attr", ["on_inplace", "_after_write"])
def test_fault_while_leaving_no_grad_keeps_grad_mode(monkeypatch, clean, attr) -> None:
    """light: the mode is pushed/popped around no_grad; a fault in its handlers must not escape
    from no_grad.__exit__ and leave grad mode disabled."""
    monkeypatch.setattr(Writes, attr, _boom)
    p = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(level="light"):
            with torch.no_grad():
                p.mul_(2)
            assert torch.is_grad_enabled()
            with torch.no_grad():
                p.mul_(2)
    assert torch.is_grad_enabled()
    assert torch.equal(p.detach(), torch.full((3,), 4.0))
    assert [str(c.message)[:39] for c in caught] == ["gradwatch: internal error in mode (Inje"]
    assert clean() == {}


# ----------------------------------------------------------------------------- public entry point
@pytest.mark.parametrize("first", ["gradwatch.api", "gradwatch.session", "gradwatch.lightning"])
def test_watch_stays_callable_after_submodule_import(first: str) -> None:
    import subprocess
    import sys

    code = (f"import importlib, gradwatch; importlib.import_module({first!r}); "
            "print(callable(gradwatch.watch))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


# ----------------------------------------------------------------------------- user exceptions
class UserError(Exception):
    pass


def _raise_in_forward(model, opt):
    def hook(module, args):
        raise UserError("from a forward pre-hook")

    model[0].register_forward_pre_hook(hook)
    model(torch.randn(2, 4))


def _raise_in_closure(model, opt):
    def closure():
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        raise UserError("from the closure")

    opt.step(closure)


class _BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, g):
        raise UserError("from a custom backward")


def _raise_in_backward(model, opt):
    _BadBackward.apply(model(torch.randn(2, 4))).sum().backward()


def _raise_under_no_grad(model, opt):
    with torch.no_grad():
        model[0].weight.mul_(0.5)
        raise UserError("under no_grad")


def _raise_in_grad_hook(model, opt):
    model[0].weight.register_hook(lambda g: (_ for _ in ()).throw(UserError("from a grad hook")))
    model(torch.randn(2, 4)).sum().backward()


def _torch_shape_error(model, opt):
    model(torch.randn(2, 5))


@pytest.mark.parametrize("level", ["full", "light"])
@pytest.mark.parametrize(
    "fn",
    [_raise_in_forward, _raise_in_closure, _raise_in_backward, _raise_under_no_grad,
     _raise_in_grad_hook, _torch_shape_error],
)
def test_user_exception_passes_through_unchanged(fn, level, clean) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected_type = RuntimeError if fn is _torch_shape_error else UserError
    # the message torch gives without gradwatch
    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(expected_type) as ref:
        fn(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1))
    with pytest.raises(expected_type) as got, gradwatch.watch(model, opt, level=level):
        fn(model, opt)
    assert type(got.value) is type(ref.value)
    assert str(got.value) == str(ref.value)
    for note in getattr(got.value, "__notes__", []):
        assert note.startswith("gradwatch:")
    assert clean() == {}


def test_jsonl_written_before_a_user_crash(tmp_path: Path, clean) -> None:
    """Flushes on an exception: the anomaly seen before the crash is on disk."""
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(UserError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.watch(log_dir=str(tmp_path)):
            (p * 2).sum().backward()
            with torch.no_grad():
                p.div_(0)
            (p * 2).sum().backward()
            raise UserError("crash")
    lines = (tmp_path / "gradwatch.jsonl").read_text().splitlines()
    assert any('"nonfinite_introduced"' in line for line in lines)
    assert clean() == {}
