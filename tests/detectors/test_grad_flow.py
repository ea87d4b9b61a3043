"""GradFlowDetector alone: no training loop, no watch(). It is told of ops under no_grad, of
``.detach()``/``.data`` reads and of no_grad blocks as the mode would tell it (from the user's
line), and of torch's real "does not require grad" error as the backward boundary would."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from torch import nn

from gradwatch._context import RunContext
from gradwatch.config import Config
from gradwatch.detectors.grad_flow import HINT_REBIND, HINT_ROOT, GradFlowDetector
from gradwatch.events import EventKind, Location
from gradwatch.records.emit import Emitter
from helpers import line_of

K = EventKind


def parts(trained: set[int] | None = None) -> tuple[RunContext, Emitter, GradFlowDetector]:
    """A detector whose ``is_trained`` answers from ``trained`` (ids of leaves)."""
    ctx = RunContext(Config.build(None, None, on_anomaly="log"))
    emit = Emitter(max_events=100, on_anomaly="log")
    trained = set() if trained is None else trained
    return ctx, emit, GradFlowDetector(ctx, emit, lambda p: id(p) in trained)


def named(ctx: RunContext) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    ctx.names.add_module(model)
    return model


def test_a_trained_weight_rebound_under_no_grad_is_reported_at_the_cutting_line() -> None:
    trained: set[int] = set()
    ctx, emit, det = parts(trained)
    model = named(ctx)
    w = model[0].weight
    trained.add(id(w))  # a backward pass reached it
    w.grad = torch.ones_like(w)
    with torch.no_grad():
        new = w - 0.1 * w.grad
    det.no_grad_op(torch.Tensor.sub, w, new)  # <cut>
    assert det.watching
    det.end_step()
    assert list(emit.anomalies) == []  # the weight still lives: nothing replaced yet
    ctx.steps = 4
    model[0].weight = nn.Parameter(torch.zeros(2, 3))  # the old weight dies...
    del w
    gc.collect()
    det.end_step()  # ...while the cut result `new` lives on

    [ev] = emit.anomalies
    assert (ev.kind, ev.severity, ev.op, ev.tensor, ev.step) == (K.GRAD_FLOW_CUT, "error", "sub",
                                                                 "0.weight", 4)
    assert (ev.shape, ev.dtype, ev.grad_mode) == ((2, 3), "float32", "no_grad")
    assert ev.location == Location(__file__, line_of("cut"), sys._getframe().f_code.co_name,
                                   "det.no_grad_op(torch.Tensor.sub, w, new)  # <cut>")
    assert ev.message.startswith("`0.weight` was trained but has been replaced by a tensor "
                                 "computed from it under no_grad (sub)")
    assert ev.hint == HINT_REBIND
    det.end_step()  # reported once
    assert len(emit.anomalies) == 1
    assert new.requires_grad is False


def test_a_replaced_tensor_that_was_never_trained_or_whose_copy_died_is_no_finding() -> None:
    ctx, emit, det = parts()
    model = named(ctx)
    w = model[0].weight
    with torch.no_grad():
        frozen = w * 1.0  # untrained: a frozen weight may be rebound freely
    det.no_grad_op(torch.Tensor.mul, w, frozen)
    del model, w
    gc.collect()
    det.end_step()
    assert list(emit.anomalies) == []

    # trained (learned later through `trained`), but the cut result died before the weight
    model = named(ctx)
    w = model[0].weight
    with torch.no_grad():
        tmp = w + 1.0
    det.no_grad_op(torch.Tensor.add, w, tmp)
    det.trained([w])
    del tmp
    del model, w
    gc.collect()
    det.end_step()
    assert list(emit.anomalies) == []
    # results of another shape are no replacement at all
    model = named(ctx)
    w = model[0].weight
    det.trained([w])
    with torch.no_grad():
        total = w.sum()
    det.no_grad_op(torch.sum, w, total)
    assert not det.watching
    assert frozen is not None


def test_trained_learned_after_the_cut_still_reports_the_replacement() -> None:
    ctx, emit, det = parts()
    model = named(ctx)
    w = model[0].weight
    with torch.no_grad():
        new = w.mul(0.9)
    det.no_grad_op(torch.Tensor.mul, w, new)  # <late>
    det.trained([w])  # the backward after the cut reached w
    model[0].weight = nn.Parameter(new.clone())
    del w
    gc.collect()
    det.end_step()
    [ev] = emit.anomalies
    assert (ev.op, ev.tensor, ev.location.lineno) == ("mul", "0.weight", line_of("late"))


def test_torchs_does_not_require_grad_error_gets_a_note_naming_the_detach() -> None:
    ctx, emit, det = parts()
    model = named(ctx)
    w = model[0].weight
    d = w.detach()
    det.detached(torch.Tensor.detach, w, d, sys._getframe())  # <detach>
    loss = (d * 2).sum()
    with pytest.raises(RuntimeError, match="does not require grad") as info:
        loss.backward()
    exc = info.value
    assert det.annotate(exc, (loss,)) is True
    at = f"{__file__}:{line_of('detach')}"
    assert exc.__notes__ == [
        f"gradwatch: the gradient was cut here: detach at {at} (`det.detached(torch.Tensor.detach, "
        f"w, d, sys._getframe())  # <detach>`) made a tensor without grad from `0.weight`. "
        f"Fix: {HINT_ROOT}."]
    [ev] = emit.anomalies
    assert (ev.kind, ev.severity, ev.op, ev.tensor, ev.shape) == (K.GRAD_FLOW_CUT, "error",
                                                                  "detach", "0.weight", (2, 3))
    assert ev.location.lineno == line_of("detach")
    assert ev.message.endswith("; backward was then called on a result without grad")
    assert ev.hint == HINT_ROOT


def test_the_cut_whose_result_is_the_backward_root_is_named_over_a_later_one() -> None:
    ctx, emit, det = parts()
    model = named(ctx)
    w = model[0].weight
    a = w.data
    det.detached(torch.Tensor.data.__get__, w, a, sys._getframe())  # <first>
    b = w.detach()
    det.detached(torch.Tensor.detach, w, b, sys._getframe())  # <second>
    with pytest.raises(RuntimeError) as info:
        torch.autograd.backward(a, torch.ones_like(a))
    assert det.annotate(info.value, (a,)) is True
    [ev] = emit.anomalies
    assert (ev.op, ev.location.lineno) == (".data", line_of("first"))
    assert f":{line_of('first')} " in info.value.__notes__[0]
    # no user frame, or a frame of torch's own code: no cut recorded
    det.detached(torch.Tensor.detach, w, w.detach(), None)
    det.detached(torch.Tensor.detach, w, w.detach(), _torch_frame())
    assert len(det.cuts.ring) == 2


def _torch_frame():
    """A frame of torch's own code (a stand-in for a detach made inside torch)."""
    frames = []
    torch.nn.Module.apply(nn.Identity(), lambda m: frames.append(sys._getframe(1)))
    assert "torch" in frames[0].f_code.co_filename
    return frames[0]


def test_a_loss_computed_in_a_no_grad_block_is_explained_by_that_block() -> None:
    ctx, emit, det = parts()
    model = named(ctx)
    det.no_grad_entered(sys._getframe())  # <block>
    with torch.no_grad():
        loss = model(torch.ones(1, 3)).sum()  # a 0-d result: no same-shaped cut
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    assert det.annotate(info.value, (loss,)) is True
    [note] = info.value.__notes__
    assert note.startswith("gradwatch: the loss does not require grad; the last no_grad block was "
                           f"entered at {__file__}:{line_of('block')} (`det.no_grad_entered(")
    [ev] = emit.anomalies
    assert (ev.kind, ev.op, ev.tensor, ev.location.lineno) == (
        K.GRAD_FLOW_CUT, "no_grad", "tensor float32[]", line_of("block"))
    assert ev.message == "backward was called on a tensor computed without grad"


def test_other_errors_and_unexplained_ones_get_no_note() -> None:
    _ctx, emit, det = parts()
    exc = RuntimeError("one of the variables needed for gradient computation has been modified")
    assert det.annotate(exc, ()) is False
    assert not hasattr(exc, "__notes__")
    # the right error, but no cut and no no_grad block seen: nothing to say
    loss = torch.ones(2).sum()
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    assert det.annotate(info.value, (loss,)) is True
    assert not hasattr(info.value, "__notes__")
    assert list(emit.anomalies) == [] and emit.buffer.counts == {}
