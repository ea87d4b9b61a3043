"""AccumulationDetector alone: no training loop, no watch(). Real backward passes fill real
``.grad`` tensors; the detector is told of them as the backward boundary would (the leaves, their
``.grad`` before, the user's line), and of steps, zeroing and ``.grad`` reads as the optimizer,
zero_grad and mode boundaries would. Findings are read from a real Emitter."""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from gradwatch._context import RunContext
from gradwatch.config import Config
from gradwatch.detectors.accumulation import (
    HINT_DISCARDED,
    HINT_STALE,
    HINT_STALE_CLOSURE,
    AccumulationDetector,
)
from gradwatch.events import EventKind, Location
from gradwatch.records.emit import Emitter
from helpers import line_of

K = EventKind
NAMES = ["0.weight", "0.bias"]


def here(depth: int = 1) -> tuple:
    """``where`` of a calling line: (code object, line number), as ``caller()`` gives it."""
    frame = sys._getframe(depth)
    return (frame.f_code, frame.f_lineno)


class Rig:
    """One detector with a real context and emitter, a named model and its optimizer."""

    def __init__(self) -> None:
        self.ctx = RunContext(Config.build(None, None, on_anomaly="log"))
        self.emit = Emitter(max_events=100, on_anomaly="log")
        self.failures: list[BaseException] = []
        self.det = AccumulationDetector(self.ctx, self.emit, self.failures.append)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 2))
        self.ctx.names.add_module(self.model)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.SGD(self.params, lr=0.1)
        for p in self.params:  # what the optimizer boundary says when it first sees `opt`
            self.det.optimized(p)
        self.refs = [weakref.ref(p) for p in self.params]
        self.x = torch.randn(4, 3)

    def backward(self, per_leaf: bool = False) -> tuple[tuple, list[torch.Tensor]]:
        """A real backward pass, reported from the caller's line; returns (where, leaves)."""
        before = [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]
        self.model(self.x).pow(2).sum().backward()
        where = here(2)
        return where, self.det.backward(self.refs, before, where, per_leaf=per_leaf)

    def step(self) -> None:
        """An optimizer step as the step boundary brackets it: the detector first, then torch."""
        self.det.stepped(self.params)
        self.opt.step()
        self.ctx.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> tuple:
        """``opt.zero_grad()`` as its boundary wraps it: the detector first, then torch. Returns
        the line the detector was called from (the first frame outside gradwatch)."""
        before = here()
        self.det.zero_grad(self.opt)
        self.opt.zero_grad(set_to_none=set_to_none)
        return (before[0], before[1] + 1)  # the detector's line

    def anomalies(self) -> list[tuple[str, str, int]]:
        return [(e.kind.value, e.tensor, e.location.lineno) for e in self.emit.anomalies]


def test_the_usual_loop_is_one_record_per_pass_and_never_a_finding() -> None:
    r = Rig()
    lines = []
    for _ in range(3):
        r.zero_grad()
        where, leaves = r.backward()
        lines.append(where[1])
        assert leaves == []  # not per leaf: nothing returned, one pending record
        r.step()
    assert r.emit.buffer.counts == {"grad_accumulated": 2 * 3}
    events = r.emit.events(100)
    assert [(e.kind, e.severity, e.op, e.tensor, e.step) for e in events] == [
        (K.GRAD_ACCUMULATED, "info", "backward", n, s) for s in range(3) for n in NAMES]
    assert [e.location.lineno for e in events] == [ln for ln in lines for _ in NAMES]
    assert events[0].location.filename == __file__
    assert events[1].message == "backward accumulated a gradient into `0.bias.grad`"
    assert list(r.emit.anomalies) == [] and r.failures == []
    assert not r.det.has_unconsumed()


def test_gradients_zeroed_before_any_step_used_them_are_discarded_at_the_zeroing_line() -> None:
    r = Rig()
    where, leaves = r.backward(per_leaf=True)
    assert leaves == r.params  # per leaf: the leaves the pass reached
    assert r.det.has_unconsumed()
    zeroed_at = r.zero_grad()

    assert r.emit.buffer.counts == {"grad_accumulated": 2, "accumulated_grad_discarded": 2}
    assert [(e.tensor, e.location.lineno) for e in r.emit.events(100)[:2]] == [
        (n, where[1]) for n in NAMES]
    evs = list(r.emit.anomalies)
    assert [(e.kind, e.severity, e.op, e.tensor) for e in evs] == [
        (K.ACCUMULATED_GRAD_DISCARDED, "warning", "zero_grad", f"{n}.grad") for n in NAMES]
    assert evs[0].location == Location(__file__, zeroed_at[1], "Rig.zero_grad",
                                       "self.det.zero_grad(self.opt)")
    assert evs[0].shape == (2, 3) and evs[1].shape == (2,)
    assert evs[0].message == ("`0.weight.grad` held 1 accumulated gradient(s) that no optimizer "
                              "step used; they are discarded here")
    assert evs[0].hint == HINT_DISCARDED
    # the windows are reset: zeroing again finds nothing
    r.backward()
    r.step()
    r.zero_grad()
    assert len(r.emit.anomalies) == 2


def test_a_window_read_by_user_code_or_holding_zeros_is_not_discarded() -> None:
    r = Rig()

    def __torch_function__(func, args, kwargs):  # the mode's frame between a read and the handler
        return r.det.on_grad_get(func, args, kwargs)

    r.backward()
    grad_get = torch.Tensor.grad.__get__
    for p in r.params:
        __torch_function__(grad_get, (p,), {})  # the user's `p.grad` read (a use: logged, say)
    r.zero_grad()
    assert list(r.emit.anomalies) == []
    # a window whose values are all zero loses nothing either
    r.backward()
    for p in r.params:
        p.grad.zero_()
    r.zero_grad()
    assert list(r.emit.anomalies) == []
    # dropping .grad one leaf at a time (p.grad = None) is a discard like zero_grad
    r.backward()
    w = r.params[0]
    r.det.on_grad_set(torch.Tensor.grad.__set__, (w, None), {})
    line = here()[1] - 1
    w.grad = None
    [ev] = r.emit.anomalies
    assert (ev.kind, ev.tensor, ev.op, ev.location.lineno) == (
        K.ACCUMULATED_GRAD_DISCARDED, "0.weight.grad", "grad = None", line)
    assert r.failures == []


def test_an_edit_between_two_backward_passes_is_a_stale_sum_reported_at_the_second_pass() -> None:
    r = Rig()
    r.backward(per_leaf=True)
    w = r.params[0]
    with torch.no_grad():
        w.mul_(0.5)
    edited_at = here()
    r.det.edited(w, edited_at)
    grad = w.grad
    where, leaves = r.backward(per_leaf=True)
    assert w.grad is grad and leaves == r.params  # torch summed into the same .grad

    assert r.anomalies() == [("stale_grad_accumulation", "0.weight", where[1])]
    [ev] = r.emit.anomalies
    assert (ev.severity, ev.op, ev.grad_mode, ev.shape) == ("warning", "backward", "enabled",
                                                            (2, 3))
    assert ev.message == (
        "`0.weight.grad` now sums gradients taken at different versions of `0.weight` (it changed "
        f"between two backward passes and .grad was not zeroed; it was last edited at "
        f"{__file__}:{edited_at[1]} (`edited_at = here()`))")
    assert ev.hint == HINT_STALE
    assert r.emit.buffer.counts == {"grad_accumulated": 4, "stale_grad_accumulation": 1}


def test_a_forgotten_zero_grad_is_reported_when_a_step_uses_the_mixed_sum() -> None:
    r = Rig()
    r.backward()
    r.step()
    where, _ = r.backward()  # no zero_grad: sums onto gradients taken before the step
    assert list(r.emit.anomalies) == []  # not yet: a zero_grad before the next step is fine
    r.ctx.steps = 7
    r.det.stepped(r.params)  # the next step consumes the mixed sums
    assert r.anomalies() == [("stale_grad_accumulation", n, where[1]) for n in NAMES]
    assert {e.step for e in r.emit.anomalies} == {7}
    assert "last edited" not in r.emit.anomalies[0].message
    r.det.stepped(r.params)  # reported once per window
    assert len(r.emit.anomalies) == 2


def test_closure_calls_at_different_weights_summed_are_stale_when_the_step_reads_them() -> None:
    """LBFGS evaluates the closure several times per step; a closure that does not zero the
    gradients sums them across its iterates. The first call is the step's use (as the step
    boundary reports it), later ones ``closure_used``; the weights change between them."""
    r = Rig()
    r.backward()
    r.det.stepped(r.params, r.opt)  # the first closure call: the step is about to update
    with torch.no_grad():
        for p in r.params:
            p.add_(0.1)  # the line search moves the weights
    where, _ = r.backward()  # the second closure call, no zero_grad
    assert list(r.emit.anomalies) == []
    r.det.closure_used(r.opt)  # the step reads the mixed sum
    assert r.anomalies() == [("stale_grad_accumulation", n, where[1]) for n in NAMES]
    assert {e.hint for e in r.emit.anomalies} == {HINT_STALE_CLOSURE}
    r.det.closure_used(r.opt)  # reported once per window
    assert len(r.emit.anomalies) == 2


def test_closure_calls_that_zero_first_are_silent() -> None:
    r = Rig()
    for _ in range(3):
        r.zero_grad()
        r.backward()
        r.det.closure_used(r.opt)
        with torch.no_grad():
            for p in r.params:
                p.add_(0.1)
    assert list(r.emit.anomalies) == []


def test_a_mixed_sum_zeroed_before_a_step_uses_it_is_no_finding_when_its_pass_was_used() -> None:
    """A GAN's discriminator picks up the generator's pass onto its stepped gradients, then
    zeroes them before its own step; the generator's optimizer used that pass: correct."""
    r = Rig()
    r.backward()
    r.step()
    r.backward()
    windows = r.det.windows
    windows.mark_used(windows.pass_no)  # the generator's step used this pass on its own leaves
    r.zero_grad()
    r.backward()
    r.step()
    assert list(r.emit.anomalies) == []
    assert r.emit.buffer.counts == {"grad_accumulated": 6}


def test_a_mixed_sum_of_a_pass_no_step_used_is_a_stale_sum_thrown_away() -> None:
    """A step after every batch, zero_grad every other one (ECO-pytorch's iter_size bug): the
    second batch's gradients mix into the stepped window and are zeroed unused."""
    r = Rig()
    r.backward()
    r.step()
    where, _ = r.backward()
    r.zero_grad()
    assert r.anomalies() == [("stale_grad_accumulation", "0.weight", where[1]),
                             ("stale_grad_accumulation", "0.bias", where[1])]


def test_zeroing_on_the_line_that_read_the_gradient_is_not_a_use() -> None:
    """``p.grad.zero_()`` reads .grad on the zeroing line itself: still a discard there. The read
    arrives through the mode (``on_grad_get``), the zeroing as the write handler reports it."""
    r = Rig()
    r.backward(per_leaf=True)
    w, b = r.params
    grad_get = torch.Tensor.grad.__get__

    def __torch_function__(func, args, kwargs):  # the mode's frame between a read and the handler
        return r.det.on_grad_get(func, args, kwargs)

    def zeroing(p: torch.Tensor, where: tuple) -> None:
        st = r.det.owner_of_grad(p.grad)
        assert st is not None and st.leaf() is p
        r.det.zeroing(st, p.grad, where, torch.Tensor.zero_)

    __torch_function__(grad_get, (w,), {}) or zeroing(w, here())  # <w.grad.zero_()>
    [ev] = r.emit.anomalies
    assert (ev.kind, ev.tensor, ev.op) == (K.ACCUMULATED_GRAD_DISCARDED, "0.weight.grad", "zero_")
    assert ev.location.lineno == line_of("w.grad.zero_()")
    # a read on an earlier line is a use: the bias window read there is kept
    __torch_function__(grad_get, (b,), {})
    zeroing(b, here())
    assert len(r.emit.anomalies) == 1
    assert r.failures == []


def _read(r: Rig, p: torch.Tensor) -> None:
    """``p.grad`` read by the calling line, as the mode reports it."""
    r.det._grad_read(p, sys._getframe(1))


def test_reads_of_one_window_around_another_pass_then_replaced_are_mixed_reads() -> None:
    """Per-loss gradients without a reset between the losses: the second read sees both."""
    r = Rig()
    w, _b = r.params
    r.backward()
    _read(r, w)  # <first read>
    r.backward()
    _read(r, w)  # <second read>
    assert list(r.emit.anomalies) == []  # not yet: a step may use the sum (logging reads)
    r.det.on_grad_set(None, (w, torch.zeros_like(w)), {})  # p.grad = merged
    [ev] = r.emit.anomalies
    assert (ev.kind, ev.severity, ev.tensor) == (K.GRAD_READ_MID_WINDOW, "warning", "0.weight.grad")
    assert ev.location.lineno == line_of("second read")
    assert f":{line_of('first read')}" in ev.message


def test_reads_between_passes_of_a_window_a_step_then_uses_are_silent() -> None:
    """Accumulation that logs the running sum after each micro-batch: correct."""
    r = Rig()
    w, _ = r.params
    for _ in range(2):
        r.backward()
        _read(r, w)
        r.backward()
        _read(r, w)
        r.step()
        r.zero_grad()
    assert list(r.emit.anomalies) == []


class _KeepsGrad(torch.optim.SGD):
    """Keeps ``state["previous_grad"] = p.grad`` by reference at every step (DiffGrad's bug)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["previous_grad"] = p.grad  # <kept>
        return super().step(closure)


class _BufferOnce(torch.optim.SGD):
    """Keeps the .grad tensor as a buffer, stored once when the state is created (on purpose)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["grad_buf"] = p.grad
        return super().step(closure)


def test_an_optimizer_state_entry_that_is_the_grad_itself_is_reported_once() -> None:
    r = Rig()
    r.opt = _KeepsGrad(r.params, lr=0.1)
    r.backward()
    r.step()
    r.zero_grad(set_to_none=False)
    r.backward()
    r.det.check_state(r.opt, r.params, here())
    [ev] = [e for e in r.emit.anomalies if e.kind == K.GRAD_READ_MID_WINDOW]
    assert ev.tensor == "0.weight.grad"
    assert "state['previous_grad']" in ev.message
    assert ev.location.lineno == line_of("kept")
    r.det.check_state(r.opt, r.params, here())
    assert len(r.emit.anomalies) == 1


def test_a_grad_buffer_kept_on_purpose_and_empty_or_sparse_grads_are_silent() -> None:
    r = Rig()
    r.opt = _BufferOnce(r.params, lr=0.1)
    r.backward()
    r.step()
    r.zero_grad(set_to_none=False)
    r.backward()
    r.det.check_state(r.opt, r.params, here())
    empty = nn.Parameter(torch.zeros(0, 3))
    empty.grad = torch.zeros(0, 3)
    opt = torch.optim.SGD([empty], lr=0.1, momentum=0.9)
    opt.state[empty]["momentum_buffer"] = torch.zeros(0, 3)  # data_ptr 0 like the grad's
    r.det.check_state(opt, [empty], here())
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    sparse = torch.optim.SparseAdam(list(emb.parameters()))
    sparse.step()
    r.det.check_state(sparse, list(emb.parameters()), here())
    assert list(r.emit.anomalies) == [] and r.failures == []


def test_an_optimizer_state_entry_kept_from_a_grad_since_replaced_is_silent() -> None:
    r = Rig()
    w, _ = r.params
    r.backward()
    r.step()
    r.opt.state[w]["previous_grad"] = w.grad
    r.zero_grad(set_to_none=True)
    r.backward()
    r.det.check_state(r.opt, r.params, here())
    assert list(r.emit.anomalies) == []
