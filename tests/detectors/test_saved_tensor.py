"""SavedTensorDetector alone: no training loop, no watch(). Its inputs are what the interception
layer would hand it (a write into a saved tensor, a logged write, an optimizer step, torch's own
version error); its output is what a real Emitter recorded and the note on torch's exception."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from gradwatch._context import RunContext
from gradwatch._intercept.installed import Installed
from gradwatch._naming import storage_key
from gradwatch.config import Config
from gradwatch.detectors.saved_tensor import HINT, HINT_STEP, SavedTensorDetector
from gradwatch.events import EventKind, Location
from gradwatch.records.emit import Emitter
from gradwatch.records.raw import Raw

K = EventKind


def here() -> tuple:
    """``where`` of the calling line, as ``caller()`` gives it: (code object, line number)."""
    frame = sys._getframe(1)
    return (frame.f_code, frame.f_lineno)


def at(where: tuple) -> str:
    return f"{__file__}:{where[1]}"


def parts(level: str = "full") -> tuple[RunContext, Emitter, SavedTensorDetector]:
    ctx = RunContext(Config.build(None, None, on_anomaly="log", level=level))
    emit = Emitter(max_events=100, on_anomaly="log")
    return ctx, emit, SavedTensorDetector(ctx, emit)


@pytest.fixture
def full() -> Iterator[tuple[RunContext, Emitter, SavedTensorDetector, list]]:
    """A full-level detector with its registry pushed as torch's saved-tensor hooks (undone
    afterwards); the list collects internal errors handed to ``on_error``."""
    ctx, emit, det = parts("full")
    installed = Installed()
    errors: list[BaseException] = []
    det.install(installed, errors.append)
    try:
        assert det.registry is not None
        yield ctx, emit, det, errors
    finally:
        installed.undo()
    assert det.registry is None  # the undo also forgets the registry
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def model_and_loss(ctx: RunContext) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    ctx.names.add_module(model)
    x = torch.randn(4, 3, requires_grad=True)  # so that backward needs the weight (saved)
    return model, model(x).pow(2).sum()


def test_a_write_into_a_saved_weight_is_reported_at_its_line_when_backward_uses_it(full):
    ctx, emit, det, errors = full
    model, loss = model_and_loss(ctx)
    w = model[0].weight
    key = storage_key(w)
    saved = det.pending(key)
    assert saved is not None and len(saved) == 1  # the saved weight.t() of the pending graph
    v0 = w._version
    assert det.pending(storage_key(model[0].bias)) is None  # the bias is not saved by addmm
    with torch.no_grad():
        w.mul_(0.5)
    where = here()
    det.mutated(torch.Tensor.mul_, w, saved, key, where, "no_grad", after=True)
    assert list(emit.anomalies) == []  # a suspect: the graph may never be backwarded
    assert det.pending(key) is None  # no longer intact: a second write is not a new finding

    # torch's version error (raised by the registry's unpack, as torch would) gets the note,
    # and the write is reported now, at its own line and step
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        loss.backward()
    exc = info.value
    assert det.annotate(exc) is True
    assert emit.buffer.counts == {"saved_tensor_mutated": 1}
    [ev] = emit.anomalies
    assert (ev.kind, ev.severity, ev.op, ev.tensor) == (K.SAVED_TENSOR_MUTATED, "error", "mul_",
                                                        "0.weight")
    assert (ev.version_before, ev.version_after) == (v0, v0 + 1)
    assert (ev.shape, ev.dtype, ev.device, ev.grad_mode, ev.step) == ((2, 3), "float32", "cpu",
                                                                     "no_grad", 0)
    assert ev.location == Location(__file__, where[1], where[0].co_name, "where = here()")
    assert where[0].co_name.startswith("test_a_write_into_a_saved_weight")
    assert f"saved it at version {v0}" in ev.message and "`0.weight`" in ev.message
    assert ev.hint == HINT
    [note] = exc.__notes__
    assert note.startswith("gradwatch: `0.weight` was modified in place by mul_ at ")
    assert f"{at(where)} (`where = here()`)" in note
    assert f"version {v0} → {v0 + 1}" in note and note.endswith(f"Fix: {HINT}.")
    assert len(emit.anomalies) == 1
    assert errors == []


def test_a_write_into_a_graph_that_is_never_backwarded_is_no_finding(full):
    """``y, _ = f(x)`` keeps ``_``'s graph alive; an optimizer step then changes what it saved.
    Certainty before severity: nothing is reported unless a backward uses that graph."""
    ctx, emit, det, errors = full
    model, loss = model_and_loss(ctx)
    w = model[0].weight
    key = storage_key(w)
    det.check_tensors("optimizer.step", [w], here())
    with torch.no_grad():
        w.sub_(0.1)
    del loss  # the graph dies unused
    det.end_step()
    det.after_backward()
    assert list(emit.anomalies) == [] and errors == []
    assert det.pending(key) is None


def test_a_write_through_data_is_reported_as_silent_corruption_torch_cannot_see(full):
    ctx, emit, det, errors = full
    model, loss = model_and_loss(ctx)
    w = model[0].weight
    key = storage_key(w)
    saved = det.pending(key)
    alias = w.data  # its own version counter: torch will not notice the write
    alias.add_(1.0)
    where = here()
    det.mutated(torch.Tensor.add_, alias, saved, key, where, "enabled", after=True)
    assert list(emit.anomalies) == []
    loss.backward()  # indeed no error: the new values are used silently
    det.after_backward()  # the backward boundary asks: which suspects did it use?
    [ev] = emit.anomalies
    assert (ev.kind, ev.tensor, ev.op, ev.grad_mode) == (K.SAVED_TENSOR_MUTATED, "0.weight",
                                                         "add_", "enabled")
    assert (ev.version_before, ev.version_after) == (None, None)
    assert "torch cannot detect this" in ev.message and "through an alias" in ev.message
    assert ev.location.lineno == where[1]
    assert errors == []


def test_library_code_about_to_write_a_saved_tensor_is_named_at_its_call(full):
    ctx, emit, det, _ = full
    model, loss = model_and_loss(ctx)
    w = model[0].weight
    v0 = w._version
    asked = []

    def where_now() -> tuple:  # the boundary's caller(), looked up only on a hit
        asked.append(1)
        return line

    line = here()
    det.check_tensors("clip_grad_norm_", [model[0].bias], where_now)  # not saved: nothing
    assert asked == [] and list(emit.anomalies) == []
    det.check_tensors("optimizer.step", [model[0].bias, w], where_now)
    assert asked == [1]
    with torch.no_grad():
        w.add_(1.0)  # the step's write
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    det.annotate(info.value)
    [ev] = emit.anomalies
    assert (ev.op, ev.tensor, ev.version_before, ev.version_after) == ("optimizer.step",
                                                                       "0.weight", v0, None)
    assert ev.location.lineno == line[1] and ev.grad_mode == "no_grad"


def test_a_logged_write_explains_torchs_own_version_error_without_the_registry() -> None:
    """light: no registry; torch raises by itself and the log of recent writes names the line."""
    ctx, emit, det = parts("light")
    model, loss = model_and_loss(ctx)
    w = model[0].weight
    v0 = w._version
    with torch.no_grad():
        w.sub_(0.1)
    where = here()
    det.wrote(Raw(K.INPLACE_NO_GRAD, torch.Tensor.sub_, "0.weight", (2, 3), w.dtype, w.device,
                  v0, v0 + 1, "no_grad", None, where, 0))
    # later writes are not the culprit: one of another size, one of the same size at another
    # version (the error says which version was expected)
    det.wrote(Raw(K.INPLACE_NO_GRAD, torch.Tensor.zero_, "other", (5,), w.dtype, w.device,
                  v0, v0 + 1, "no_grad", None, here(), 0))
    det.wrote(Raw(K.INPLACE_NO_GRAD, torch.Tensor.zero_, "buffer", (6,), w.dtype, w.device,
                  v0 + 4, v0 + 5, "no_grad", None, here(), 0))
    assert list(emit.anomalies) == []  # a write is remembered, not reported

    with pytest.raises(RuntimeError) as info:
        loss.backward()
    exc = info.value
    assert det.annotate(exc) is True
    [note] = exc.__notes__
    assert note.startswith("gradwatch: `0.weight` was modified in place by sub_ at "
                           f"{at(where)} (`where = here()`), version {v0} → {v0 + 1}")
    [ev] = emit.anomalies  # recorded from torch's error (no raise: torch's error is on its way)
    assert (ev.kind, ev.tensor, ev.op, ev.severity) == (K.SAVED_TENSOR_MUTATED, "0.weight",
                                                        "sub_", "error")
    assert (ev.version_before, ev.version_after, ev.location.lineno) == (v0, v0 + 1, where[1])
    assert "backward failed on it" in ev.message


def test_an_optimizer_step_explains_the_error_by_the_transposed_shape_first() -> None:
    """Two parameters of six elements, (2, 3) and (3, 2), both stepped: torch names the saved
    ``weight.t()`` of the second layer, [2, 3]; its own shape is (3, 2)."""
    ctx, emit, det = parts("light")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3))
    ctx.names.add_module(model)
    loss = model(torch.randn(4, 3, requires_grad=True)).pow(2).sum()
    params = [model[0].weight, model[1].weight]
    versions = [p._version for p in params]
    with torch.no_grad():
        for p in params:
            p.sub_(0.01)
    where = here()
    det.stepped(where, 3, params, versions)
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    message = str(info.value)
    assert "[torch.FloatTensor [2, 3]]" in message

    m = det.explain(message)
    assert (m.name, m.shape, m.op, m.step) == ("1.weight", (3, 2), "optimizer.step", 3)
    assert (m.version_before, m.version_after, m.where) == (versions[1], versions[1] + 1, where)
    assert det.annotate(info.value) is True
    assert info.value.__notes__ == [
        f"gradwatch: `1.weight` was modified in place by optimizer.step at {at(where)} "
        f"(`where = here()`), version {versions[1]} → {versions[1] + 1} after a pending graph "
        f"saved it for backward. Fix: {HINT_STEP}."]
    [ev] = emit.anomalies
    assert (ev.tensor, ev.op, ev.step, ev.location.lineno) == ("1.weight", "optimizer.step", 3,
                                                               where[1])


def test_an_unexplained_version_error_gets_a_note_that_says_so_per_level() -> None:
    for level, says in (("full", "before watch() started"), ("light", 'level="light" does not')):
        ctx, emit, det = parts(level)
        _model, loss = model_and_loss(ctx)
        out = loss.exp()  # saves its own output
        out.add_(1.0)  # grad on, autograd records it: torch's own check fires, the detector
        #                was told of no write
        with pytest.raises(RuntimeError) as info:
            out.backward()
        assert det.explain(str(info.value)) is None
        assert det.annotate(info.value) is True
        [note] = info.value.__notes__
        assert note.startswith("gradwatch: no in-place write to a tensor of this shape") and says in note
        assert list(emit.anomalies) == []  # nothing to blame, nothing recorded


def test_other_errors_are_left_alone() -> None:
    _ctx, emit, det = parts("full")
    exc = RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    assert det.annotate(exc) is False
    assert not hasattr(exc, "__notes__")
    assert det.explain("CUDA out of memory") is None
    assert list(emit.anomalies) == [] and emit.buffer.counts == {}
