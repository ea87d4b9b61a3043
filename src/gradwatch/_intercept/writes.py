"""The mode's handlers for writes and cuts: in-place ops, ``out=``, ``nn.init``, embedding
renorm, ``.data = ...``, ``.detach()``/``.data`` reads and ops under no_grad.

Before a write: the saved-tensor check (raised before the write with ``on_anomaly="raise"``),
zeroing of a tracked ``.grad``, and the finiteness probes and samples of the tensors that are
about to change. After it: one ``inplace_no_grad`` record per tracked tensor, the probes queued.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .._context import RunContext, version
from .._failopen import FailOpen, Part
from .._location import _first_user, caller, is_internal, user_frame
from .._naming import storage_key
from .._stats import PassSamples, change, checkable
from ..detectors.accumulation import AccumulationDetector
from ..detectors.grad_flow import GradFlowDetector
from ..detectors.nonfinite import NonfiniteDetector
from ..detectors.saved_tensor import SavedTensorDetector
from ..errors import AnomalyError
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, op_str
from .gate import ModeGate
from .mode import WatchMode
from .ops import Action

__all__ = ["Writes"]

K = EventKind
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_inference_enabled = torch.is_inference_mode_enabled
_ZEROING = {torch.Tensor.zero_, torch._foreach_zero_}
_DisableTorchFunction = torch._C.DisableTorchFunction
_NONE: list = []  # (never appended to)


class _PendingWrite:
    """What a write's ``after`` needs from its ``before``."""

    __slots__ = ("at", "checks", "flags", "func", "grad_mode", "hits", "in_step", "samples",
                 "tracked", "where", "windowed")


def _held(acc: AccumulationDetector, t: torch.Tensor) -> bool:
    """Whether an optimizer holds ``t`` (its steps write it where the mode does not look)."""
    st = acc.windows.leaves.get(id(t))
    return st is not None and st.optimized and st.leaf() is t


def _whole_alias_of(names: Any, t: torch.Tensor, key: int | None) -> torch.Tensor | None:
    """The parameter (or leaf of the loop) that ``t`` shows whole, where ``t`` is another tensor
    on its storage (``p.data``): same memory, shape, strides and dtype; else None."""
    owner = names.owner_of_storage(key)
    if owner is None or owner is t:
        return None
    entry = names._params.get(id(owner))
    if entry is None or entry[1]() is not owner:
        return None
    if (owner.data_ptr() == t.data_ptr() and owner.dtype == t.dtype and owner.shape == t.shape
            and owner.stride() == t.stride()):
        return owner
    return None


def _grad_mode_now() -> str:
    return "inference_mode" if _inference_enabled() else "enabled" if _grad_enabled() else "no_grad"


class Writes:
    """The write and cut handlers of the mode (``Part.MODE``: ``off`` once it failed)."""

    def __init__(self, ctx: RunContext, gate: ModeGate, emit: Emitter, fail: FailOpen,
                 saved: SavedTensorDetector, acc: AccumulationDetector,
                 grad_flow: GradFlowDetector, nonfinite: NonfiniteDetector) -> None:
        self.ctx = ctx
        self.gate = gate
        self.emit = emit
        self.fail = fail
        self.saved = saved
        self.acc = acc
        self.grad_flow = grad_flow
        self.nonfinite = nonfinite
        cfg = ctx.config
        self.check_nonfinite = cfg.check_nonfinite
        self.change_stats = cfg.change_stats
        self.samples = PassSamples()  # which writes of a statistics pass are measured
        self.off = False

    def install(self, mode: WatchMode) -> None:
        """Fill the mode's handler table (indexed by the memoised action)."""
        h = mode.handlers
        h[Action.INPLACE] = self.on_inplace
        h[Action.FOREACH] = self.on_foreach
        h[Action.KWARG_WRITE] = self.on_kwarg_write
        h[Action.INIT] = self.on_init
        h[Action.EMBEDDING] = self.on_embedding
        h[Action.DATA_SET] = self.on_data_set
        h[Action.DETACH] = self.on_detach
        h[Action.NO_GRAD_OP] = self.on_no_grad_op
        h[Action.CUT] = self.on_cut
        h[Action.SCALAR] = self.on_scalar
        h[Action.ZERO_GRAD] = self.on_zero_grad
        h[Action.GRAD_GET] = self.acc.on_grad_get
        h[Action.GRAD_SET] = self.acc.on_grad_set
        mode.on_fail = self._mode_failed

    def _mode_failed(self, exc: BaseException) -> None:
        self.fail.fail(Part.MODE, exc)

    # -- handlers: the tensors an op is about to write ----------------------------------------
    def on_inplace(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off or not args:
            return None
        return self._before(func, (args[0],), None, sys._getframe(2))

    def on_foreach(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off:
            return None
        seq = args[0] if args else kwargs.get("self")
        if not isinstance(seq, (list, tuple)):
            return None
        return self._before(func, tuple(seq), None, sys._getframe(2))

    def on_kwarg_write(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off:
            return None
        if kwargs.get("inplace") is True:
            targets = (args[0] if args else None,)
        else:
            out = kwargs.get("out")
            targets = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return self._before(func, targets, None, sys._getframe(2))

    def on_init(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off:
            return None
        target = kwargs.get("tensor", args[0] if args else None)
        if isinstance(target, _Tensor) and version(target) == 0:
            return None  # a new tensor's first values (a module being built): no edit
        return self._before(func, (target,), "no_grad", sys._getframe(2))

    def on_embedding(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off or kwargs.get("max_norm") is None or len(args) < 2:
            return None
        return self._before(torch.embedding_renorm_, (args[1],), "no_grad", sys._getframe(2))

    def _before(self, func: Any, targets: tuple, grad_mode: str | None, frame: Any) -> Any:
        if len(targets) == 1:  # hot: one target (an in-place op)
            t = targets[0]
            if not isinstance(t, _Tensor):
                return None
            if grad_mode is None:
                state = self._window_goes_on(func, t, frame)
                if state is not None:
                    return (self._after_window_write, state)
        else:
            targets = tuple(t for t in targets if isinstance(t, _Tensor))
            if not targets:
                return None
        pending = self._before_write(func, targets, grad_mode, frame)
        return None if pending is None else (self._after_write, pending)

    def _window_goes_on(self, func: Any, t: torch.Tensor, frame: Any) -> tuple | None:
        """The hand-written update's steady state, without the general path's questions: a
        named parameter no optimizer holds (or a ``.data`` alias that shows it whole), written
        by the same user line and op as its open NaN window's (see ``_checks``), not the line's
        first write into it in a statistics pass (that one is measured), nothing saved on it,
        not a gradient. The window goes on; the write is
        recorded as a tuple on the window's first record, which unfolds into exactly the record
        the general path makes (``WriteRun``). None: ask the general path."""
        nonfinite, ctx = self.nonfinite, self.ctx
        opened = nonfinite.open
        if not opened or nonfinite.off or self.gate.step_depth:
            return None
        names = ctx.names
        key = None
        if t.requires_grad:  # the parameter itself, under no_grad
            if _grad_enabled():
                return None
            entry = names._params.get(id(t))
            if entry is None or entry[1]() is not t:
                return None
            owner = t
        else:  # p.data.add_(...): an alias with a version counter of its own
            key = storage_key(t)
            owner = _whole_alias_of(names, t, key)
            if owner is None or (_grad_enabled() and not owner.requires_grad):
                return None
        window = opened.get(id(owner))
        every = ctx.stats_every
        passes = ctx.passes
        if (window is None or window[0]() is not owner or window[1] != version(owner)
                or window[5] >= every or passes // every != nonfinite.open_epoch):
            return None
        f = _first_user(frame)
        if f is not frame:
            return None
        where = (f.f_code, f.f_lineno)
        site = window[4]
        if site[0] is not func or site[1] != where:
            return None
        if self.change_stats and passes % every == 0 and not self.samples.taken(
                passes, storage_key(t) if key is None else key, where):
            return None  # (a statistics pass: this line's first write into t is measured)
        w = self.acc.windows
        if w.pending is not None or id(t) in w.grad_owner:
            return None
        saved = self.saved
        if saved.registry is not None and saved.pending(
                storage_key(t) if key is None else key) is not None:
            return None
        return (t, owner, key, where, version(t), window)

    def _after_window_write(self, state: tuple, out: Any) -> None:
        t, owner, key, where, vb, window = state
        # hot: the record is a tuple on the window's first record (same tensor, op and line),
        # unfolded into the general path's record when records are read (see WriteRun)
        entry = (window[3], vb, version(t), _grad_mode_now(), self.ctx.step())
        self.emit.record_write(entry)
        self.acc.edited(t, where, key)
        self.saved.wrote(entry)
        window[1] = version(owner)
        window[5] += 1

    def _before_write(self, func: Any, targets: tuple, grad_mode: str | None,
                      frame: Any) -> _PendingWrite | None:
        grad_on = _grad_enabled() if grad_mode is None else grad_mode == "enabled"
        if grad_mode is None:
            grad_mode = "inference_mode" if _inference_enabled() else "enabled" if grad_on else "no_grad"
        saved = self.saved if self.saved.registry else None
        in_step = self.gate.step_depth > 0
        names = self.ctx.names
        tracked: list[list[Any]] = []
        hits: list[tuple[Any, Any]] = []
        where = None
        for t in targets:
            try:
                key = None
                if saved is not None:
                    key = storage_key(t)
                    s = saved.pending(key)
                    if s is not None:
                        if where is None:
                            where = caller()
                        hits.append((t, s))
                requires = t.requires_grad
                if grad_on and requires:
                    continue  # autograd records this one
                st = self.acc.owner_of_grad(t)
                if not requires and st is None:
                    if key is None:
                        key = storage_key(t)
                    if func in _ZEROING:  # a .grad zeroed through an alias (p.grad.data.zero_())
                        st = self.acc.owner_of_grad_storage(key)
                if not requires and st is None and not in_step and (
                        not names.has_storage(key)
                        or (grad_on and not names.storage_requires_grad(key))):
                    # with grad on, only an alias of a tensor that requires grad (.data,
                    # .detach()) writes behind autograd's back; a buffer update in forward
                    # (BatchNorm's num_batches_tracked) is no edit under no_grad
                    continue
                if st is not None and func in _ZEROING:
                    if where is None:
                        where = caller()
                    self.acc.zeroing(st, t, where, func)
                tracked.append([t, key, version(t), st])
            except AnomalyError:
                raise
            except Exception:  # an odd tensor (nested, fake, ...): skip it, keep watching
                continue
        if not tracked and not hits:
            return None
        p = _PendingWrite()
        p.func, p.tracked, p.hits, p.grad_mode, p.in_step = func, tracked, hits, grad_mode, in_step
        user = in_step
        if where is None:
            if frame is not None:  # the frame that called the op (the mode's caller)
                f = _first_user(frame)
                where = None if f is None else (f.f_code, f.f_lineno)
                user = user or f is frame
            else:
                where = caller()
        elif frame is not None and not user:
            user = not is_internal(frame.f_code)
        p.where = where
        # Values are checked only for writes made by user code (your loop, your optimizer): torch's
        # own utilities (clip_grad_norm_, zero_grad, ...) do not create NaN from finite values.
        # (The mode runs its handlers with torch functions disabled: no user mode sees our ops.)
        p.checks, p.flags, p.samples = _NONE, _NONE, None
        if tracked:
            nonfinite = self.nonfinite
            if user:
                if self.check_nonfinite and not nonfinite.off:
                    self._checks(p, tracked, (func, where))
                ctx = self.ctx
                if self.change_stats and not in_step and ctx.passes % ctx.stats_every == 0:
                    p.samples = [self.samples.take(ctx.passes, e[0], e[1] if e[1] is not None
                                                   else storage_key(e[0]), where) for e in tracked]
            elif nonfinite.open:  # torch's own write: a window open on its tensor closes first
                nonfinite.touched([e[0] for e in tracked])
        return p

    def _checks(self, p: _PendingWrite, tracked: list[list[Any]], site: Any) -> None:
        """The finiteness probes before a write: which tracked tensors are probed (``p.at``:
        their places in ``tracked``), as what (``p.checks``: a ``.data`` alias that shows a
        whole parameter is probed as that parameter), and whether each is windowed: a parameter
        no optimizer holds is written by watched code only (a hand-written update), so its
        probes are amortised over a window (see :mod:`..detectors.nonfinite`)."""
        names = self.ctx.names
        params, acc = names._params, self.acc
        checks, at, windowed = [], [], []
        for i, e in enumerate(tracked):
            t = e[0]
            if not checkable(t):
                continue
            entry = params.get(id(t))
            if entry is not None and entry[1]() is t:
                win = not _held(acc, t)
            else:
                win = False
                if e[3] is None and not t.requires_grad:  # (p.data: its own version counter)
                    owner = _whole_alias_of(names, t, e[1])
                    if owner is not None and not _held(acc, owner):
                        t, win = owner, True
            checks.append(t)
            at.append(i)
            windowed.append(win)
        if checks:
            p.checks, p.at, p.windowed = checks, at, windowed
            p.flags = self.nonfinite.before(checks, site, windowed)

    def _after_write(self, p: _PendingWrite, out: Any) -> None:
        ctx = self.ctx
        step = ctx.step()
        func, where = p.func, p.where
        for t, s in p.hits:
            self.saved.mutated(func, t, s, storage_key(t), where, p.grad_mode, after=True)
        tracked = p.tracked
        if not tracked:
            return
        names = ctx.names
        params = names._params
        emit, acc, saved = self.emit, self.acc, self.saved
        grad_mode, in_step, samples = p.grad_mode, p.in_step, p.samples
        checks = p.checks
        raws: list[Raw] = []
        for i, (t, key, vb, st) in enumerate(tracked):
            if st is not None:
                leaf = st.leaf()
                pname = names.param_name(leaf) if leaf is not None else None
                name = f"{pname}.grad" if pname else None
            else:
                entry = params.get(id(t))
                name = entry[0] if entry is not None and entry[1]() is t else names.lookup(t, key)
            delta = change(samples[i], t) if samples is not None else None
            raw = Raw(K.INPLACE_NO_GRAD, func, name, tuple(t.shape), t.dtype, t.device, vb,
                      version(t), grad_mode, delta, where, step)
            if not in_step:
                emit.record(raw)
                acc.edited(t, where, key)  # what a later stale accumulation points to
            saved.wrote(raw)
            if checks:
                raws.append(raw)
        if checks:
            if len(checks) != len(tracked):  # (some tracked tensor could not be probed)
                raws = [raws[i] for i in p.at]
            self.nonfinite.after(checks, p.flags, raws, (func, where), p.windowed)

    # -- .data = value ------------------------------------------------------------------------
    def on_data_set(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off or not args:
            return None
        t, value = args[0], args[1] if len(args) > 1 else None
        if not isinstance(t, _Tensor) or _same_data(t, value):
            return None  # (``module.to()`` to the device it is on sets each .data to itself)
        name = self.ctx.names.param_name(t)
        if name is None and not t.requires_grad:
            return None
        return (self._after_data_set, (t, name, version(t), caller()))

    def _after_data_set(self, state: tuple, out: Any) -> None:
        t, name, vb, where = state
        if self.gate.step_depth:
            return
        self.emit.record(Raw(K.INPLACE_NO_GRAD, "data.__set__", name, tuple(t.shape), t.dtype,
                             t.device, vb, version(t), _grad_mode_now(), None, where,
                             self.ctx.step()))
        if name is not None:
            self.ctx.names._add(name, t, param=True)

    # -- cuts ---------------------------------------------------------------------------------
    def on_detach(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off or self.grad_flow.off or not args:
            return None
        first = args[0]
        if isinstance(first, _Tensor) and first.requires_grad:
            return (self._after_detach, (func, first, sys._getframe(2)))
        return None

    def _after_detach(self, state: tuple, out: Any) -> None:
        func, source, frame = state
        self.fail.guard(Part.GRAD_FLOW, self.grad_flow.detached, func, source, out, frame)

    def on_no_grad_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.off or self.grad_flow.off:
            return None
        gf = self.grad_flow
        source = gf.no_grad_source(args)
        if source is None:
            return None
        if gf.region_open:  # an op of a user no_grad block that reads a tensor requiring grad
            frame = user_frame(1)
            if frame is not None:
                gf.noted(1, f"{op_str(func)} under no_grad", frame)
        return (self._after_no_grad_op, (func, source))

    def on_cut(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """argmax, comparisons, integer casts, ``torch.tensor(t)``: no grad flows through."""
        if self.off or self.grad_flow.off:
            return None
        if not _grad_enabled():
            return self.on_no_grad_op(func, args, kwargs)
        self._cut(2, func, args, kwargs)
        if kwargs.get("requires_grad") is True and self.grad_flow.window:
            # a leaf re-made from values (torch.tensor(saved_log_probs, requires_grad=True))
            return (self._after_remade, None)
        return None

    def _after_remade(self, _state: Any, out: Any) -> None:
        self.fail.guard(Part.GRAD_FLOW, self.grad_flow.remade_leaf, out)

    def on_scalar(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``.item()``, ``.tolist()``, ``.numpy()``, ``float(t)``: a Python value, no history."""
        if self.off or self.grad_flow.off:
            return None
        self._cut(3, func, args, kwargs)
        return None

    def on_zero_grad(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``round``/``sign``/``floor``/``ceil``/``trunc``: a node whose gradient is zero."""
        if self.off or self.grad_flow.off:
            return None
        if not _grad_enabled():
            return self.on_no_grad_op(func, args, kwargs)
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, _Tensor) and first.requires_grad:
            frame = sys._getframe(2)  # on_zero_grad <- __torch_function__ <- the caller
            if not is_internal(frame.f_code):
                return (self._after_zero_grad, (func, (frame.f_code, frame.f_lineno)))
        return None

    def _after_zero_grad(self, state: tuple, out: Any) -> None:
        self.fail.guard(Part.GRAD_FLOW, self.grad_flow.zero_gradient_op, *state, out)

    def _cut(self, rank: int, func: Any, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("data")
        if isinstance(first, (list, tuple)) and first:  # torch.tensor([loss_a, loss_b])
            first = first[0]
        if isinstance(first, _Tensor) and first.requires_grad:
            frame = sys._getframe(3)  # _cut <- on_cut <- __torch_function__ <- the caller
            if not is_internal(frame.f_code):  # (torch's own uses are no cut of the user's)
                self.grad_flow.noted(rank, func, frame)

    def _after_no_grad_op(self, state: tuple, out: Any) -> None:
        func, source = state
        if isinstance(out, _Tensor) and not out.requires_grad:
            self.fail.guard(Part.GRAD_FLOW, self.grad_flow.no_grad_op, func, source, out)


def _same_data(t: torch.Tensor, value: Any) -> bool:
    """Whether ``t.data = value`` changes nothing (the same memory, seen the same way)."""
    if value is t:
        return True
    try:
        return (isinstance(value, _Tensor) and value.data_ptr() == t.data_ptr()
                and value.device == t.device and value.dtype == t.dtype
                and value.shape == t.shape and value.stride() == t.stride())
    except Exception:  # no storage (meta, sparse, nested...): a change
        return False
