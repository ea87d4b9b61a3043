"""``stale_grad_accumulation`` and ``accumulated_grad_discarded``: the gradient-window contract.

The window state machine lives in :mod:`._windows`; this detector feeds it from the boundaries
(``.grad`` reads and writes, backward passes, zeroing, optimizer steps) and reports what it finds.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from .._location import caller, is_internal, location_of
from .._naming import describe, storage_key
from ..errors import AnomalyError
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import LeafBatch, Raw, op_str
from ._held_discards import HeldDiscards
from ._optimizer_state import StateAliasCheck, optimizers_holding
from ._windows import AccumulationTracker, LeafState, PassEntry, changed_grads, finite_nonzero

__all__ = ["HINT_APPLIED_TWICE", "HINT_DISCARDED", "HINT_NEVER_APPLIED", "HINT_READ_MID_WINDOW",
           "HINT_STALE", "HINT_STALE_CLOSURE", "AccumulationDetector"]

K = EventKind
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled

HINT_STALE = (
    "call optimizer.zero_grad() (or set .grad to None) after each step and after editing the "
    "weights, before the next backward; accumulate only at one parameter version"
)
HINT_NEVER_APPLIED = (
    "give this parameter to an optimizer (build the optimizer after replacing or moving layers, "
    "and include every module that should train), or freeze it with requires_grad_(False)"
)
HINT_NEVER_STEPPED = (
    "check the condition around optimizer.step(): with accumulation, step when "
    "(i + 1) % accumulation_steps == 0 and after the last batch (a modulus never reached, "
    "`% 1`, or fewer batches than accumulation steps never steps)"
)
HINT_APPLIED_TWICE = (
    "give each parameter to one optimizer only (e.g. exclude the shared module from the second "
    "optimizer's parameters), or zero the gradients between the two steps"
)
HINT_STALE_CLOSURE = (
    "zero the gradients inside the closure (call optimizer.zero_grad() before its backward): "
    "the optimizer evaluates the closure several times per step, at different weights"
)
HINT_READ_MID_WINDOW = (
    "zero the gradients (optimizer.zero_grad()) before each loss whose gradient you read on its "
    "own, or take each loss's gradient with torch.autograd.grad(loss, params, retain_graph=True)"
)
HINT_DISCARDED = (
    "step the optimizer before zeroing (zero_grad() belongs after step(), once per accumulation "
    "window), or do not compute gradients you throw away"
)


class AccumulationDetector:
    """Owns the windows of every tracked leaf's ``.grad`` and the reports about them."""

    def __init__(self, ctx: RunContext, emit: Emitter, fail: Callable[[BaseException], None]) -> None:
        self.ctx = ctx
        self.emit = emit
        self.windows = AccumulationTracker()
        self._fail = fail
        self._grad_storage: tuple[int, dict[int | None, LeafState]] | None = None
        self._state_alias = StateAliasCheck(ctx, emit, self._name)
        self._holders: dict[int, tuple[str, weakref.ref]] | None = None
        self.held = HeldDiscards()  # discards that the next step decides (_held_discards)
        self._norm_pass = -1  # the pass whose gradients' norm a clipping function returned
        self.off = False

    # -- per .grad read (hot: every p.grad read while the mode is on, mostly torch's own) ------
    def on_grad_get(self, func: Any, args: tuple, kwargs: dict) -> None:
        """The mode's handler for ``p.grad`` reads: a read by user code of a window nobody read
        yet makes it "used" (a discarded window that was read is no finding)."""
        if not args or self.off:
            return None
        w = self.windows
        key = id(args[0])
        pending = w.pending
        if pending is not None and key in pending.ids:
            unread = True  # accumulated into by the pass not applied yet, never read since
        else:
            st = w.leaves.get(key)
            unread = st is not None and st.accum and (not st.read or st.mid)
        if unread:
            frame = sys._getframe(2)  # on_grad_get <- __torch_function__ <- the reader
            if not is_internal(frame.f_code):  # torch reading it (clip, step) is no use
                try:
                    self._grad_read(args[0], frame)
                except AnomalyError:
                    raise
                except Exception as exc:
                    self._fail(exc)
        return None

    def _grad_read(self, p: Any, frame: Any) -> None:
        if not isinstance(p, _Tensor):
            return
        st = self.windows.get(p)
        if st is None or st.accum == 0 or (st.read and not st.mid):
            return
        self.windows.grad_read(p, (frame.f_code, frame.f_lineno), st)

    def on_grad_set(self, func: Any, args: tuple, kwargs: dict) -> None:
        """The mode's handler for ``p.grad = value``: dropping an unused window discards it."""
        if self.off or len(args) < 2:
            return None
        p, value = args[0], args[1]
        try:
            if not isinstance(p, _Tensor):
                return None
            st = self.windows.get(p)
            if st is None:
                return None
            old = p.grad
            if old is None or value is old:
                return None
            # hot: the user's line only where a finding may name it (optimized leaf, mixed read)
            if value is None:
                where = caller() if st.optimized and id(p) in self.windows.unconsumed else None
                self.zeroing(st, old, where, "grad = None")
            else:  # a gradient set on purpose (clamped, averaged, projected): no discard
                self.replaced(st, caller() if st.optimized or st.mid == 2 else None)
        except AnomalyError:
            raise
        except Exception as exc:
            self._fail(exc)
        return None

    # -- queries for the boundaries -----------------------------------------------------------
    def owner_of_grad(self, t: torch.Tensor) -> LeafState | None:
        """The window whose ``.grad`` is ``t``, if tracked."""
        return self.windows.owner_of_grad(t)

    def owner_of_grad_storage(self, key: int | None) -> LeafState | None:
        """The window whose ``.grad`` lives on storage ``key`` (``p.grad.data.zero_()`` zeroes
        it through an alias). A map built at most once per backward pass (rare writes only)."""
        if key is None:
            return None
        w = self.windows
        cached = self._grad_storage
        if cached is None or cached[0] != w.pass_no:
            w.sync()
            by_key = {}
            for st in w.leaves.values():
                leaf = st.leaf()
                g = leaf.grad if leaf is not None else None
                if g is not None:
                    by_key[storage_key(g)] = st
            cached = self._grad_storage = (w.pass_no, by_key)
        return cached[1].get(key)

    def has_unconsumed(self) -> bool:
        return self.windows.has_unconsumed()

    def is_trained(self, p: torch.Tensor) -> bool:
        """Whether a backward pass reached ``p`` or an optimizer holds it."""
        if id(p) in self.windows.reached:
            return True
        st = self.windows.get(p)
        return st is not None and st.optimized

    def optimized(self, p: torch.Tensor) -> None:
        """An optimizer holds ``p``."""
        self.windows.state(p).optimized = True

    def edited(self, t: torch.Tensor, where: Any, key: int | None = None) -> None:
        """``t`` (on storage ``key``) was edited in place under no_grad at ``where``: a later
        stale sum points there. An edit through an alias with its own version counter
        (``p.data.add_``: hand-written SGD) changes the leaf without bumping its version: it
        counts as an update of the leaf, so gradients summed across it are stale."""
        st = self.windows.get(t)
        if st is None and key is not None:
            owner = self.ctx.names.owner_of_storage(key)
            if owner is not None and owner is not t:
                st = self.windows.get(owner)
                if st is not None:
                    st.steps += 1  # (the window's token: versions and updates no version shows)
        if st is not None:
            st.last_edit = where

    # -- zeroing ------------------------------------------------------------------------------
    def zeroing(self, st: LeafState, grad: torch.Tensor, where: Any, op: Any) -> None:
        """The window ``st`` (holding ``grad``) is zeroed or dropped at ``where``. A window that
        mixes versions, summed by a pass no step used at all, is a stale sum thrown away: what
        that pass computed is lost (a step after every batch, a zero_grad every other one)."""
        w = self.windows
        mixed = (st.stale_where if st.stale_where is not None and not st.reset
                 and st.pass_no not in w.used else None)
        candidate = w.resetting(st, where)
        light = not self.ctx.full  # (sees no read with grad on: see _held_discards)
        if self.off or ((mixed is not None or candidate) and light
                        and self.held.for_input((w.pass_no, where))):
            return
        if mixed is not None:
            self.stale(st, mixed, st.leaf())
        if not candidate:
            return
        if not finite_nonzero(grad):
            return
        leaf = st.leaf()
        name = self._name(leaf)
        raw = Raw(
            K.ACCUMULATED_GRAD_DISCARDED, op_str(op),
            f"{name}.grad", tuple(grad.shape), grad.dtype, grad.device, None, None,
            "no_grad" if not _grad_enabled() else "enabled", None, where, self.ctx.step(),
            f"`{name}.grad` held {st.accum} accumulated gradient(s) that no optimizer step used; "
            "they are discarded here",
            HINT_DISCARDED,
        )
        clipped = w.pass_no if self._norm_pass == w.pass_no == st.pass_no else 0
        held = (light or clipped) and leaf is not None
        for due in (self.held.hold(leaf, grad, raw, clipped) if held else (raw,)):
            self.emit.anomaly(due)

    def norm_read(self) -> None:
        """A clipping function returned the norm of the last pass's gradients."""
        self._norm_pass = self.windows.pass_no

    def replaced(self, st: LeafState, where: Any) -> None:
        """``p.grad = value``: the user sets the gradient (clamped, averaged, projected). No
        discard; but after per-loss reads of a window that mixed two losses (read after one
        backward line, another backward line summed in, read again on another line), a value
        built from those reads and not from the sum itself is a mixed read."""
        w = self.windows
        mid = (st.read_where, st.mid_where) if (
            st.mid == 2 and not st.consumed and st.mid_where != where) else None
        w.resetting(st, where)
        if mid is not None and not self.off:
            self._read_mid_window(st, *mid)

    def zero_grad(self, owner: Any) -> None:
        """``owner.zero_grad()`` (an optimizer or a module) is about to reset its leaves."""
        if isinstance(owner, torch.optim.Optimizer):
            params = [p for g in owner.param_groups for p in g["params"]]
        elif isinstance(owner, torch.nn.Module):
            params = list(owner.parameters())
        else:
            return
        w = self.windows
        w.sync()
        leaves = w.leaves
        if not w.unconsumed and not w.mixed:  # the usual case after a step: mark the resets
            for p in params:
                st = leaves.get(id(p))
                if st is not None:
                    st.reset = True
            return
        where = None
        for p in params:
            st = leaves.get(id(p))
            if st is None or st.leaf() is not p or p.grad is None:
                continue
            if where is None:
                where = caller()
            self.zeroing(st, p.grad, where, "zero_grad")

    # -- backward -----------------------------------------------------------------------------
    def backward(self, refs: list[Any], before: list[Any], where: Any, *, per_leaf: bool
                 ) -> list[torch.Tensor]:
        """After a backward pass at ``where``: the tracked leaves (``refs``, whose ``.grad`` was
        ``before``) whose ``.grad`` it changed were accumulated into. ``per_leaf``: return them
        (else the usual loop is kept as one pending record and nothing is returned)."""
        if self.held:
            self.held.passed()
        step = self.ctx.step()
        names = self.ctx.names
        self.windows.begin_pass()
        if not per_leaf and not any(before):
            # The usual loop: no tracked leaf had a .grad; one record for the whole pass.
            entries: list[PassEntry] | None
            try:
                entries = [(ref, id(p), id(g), g._version, p._version) for ref in refs
                           if (p := ref()) is not None and (g := p.grad) is not None]
            except RuntimeError:  # a tensor without a version counter: leaf by leaf below
                entries = None
            if entries is not None:
                if entries:
                    self.windows.fresh_pass(entries, where)
                    self.emit.record_batch(LeafBatch(K.GRAD_ACCUMULATED, "backward",
                                                     [e[0] for e in entries], None, where, step,
                                                     names))
                return []
        if not per_leaf and self.windows.pending is not None:  # hot: accumulation micro-batch
            absorbed = self.windows.absorb(refs, before, where)  # (the pending pass takes it in)
            if absorbed is not None:
                self.emit.record_batch(LeafBatch(K.GRAD_ACCUMULATED, "backward", absorbed, None,
                                                 where, step, names))
                return []
        reached, fresh, added = [], [], []  # fresh: no .grad before; added: summed into one
        for ref, p, g, prev in changed_grads(refs, before):
            (fresh if prev is None else added).append((p, g))
            reached.append(ref)
        if not reached:
            return []
        w = self.windows
        if fresh:
            w.fresh(fresh, where)
        stale = []
        for p, g in added:
            finding = w.accumulated(p, g, False, where)
            if finding is not None:  # reported at once: an in-place edit changed the leaf
                stale.append((finding, p))
        self.emit.record_batch(LeafBatch(K.GRAD_ACCUMULATED, "backward", reached, None, where,
                                         step, names))
        for st, p in stale:
            self.stale(st, where, p, edited=True)
        if w.unstepped:
            self._unstepped()
        if w.never:
            never, w.never = w.never, []
            for st in never:
                self._never_applied(st, where)
        return [p for p, _ in fresh + added]

    def backward_failed(self) -> None:
        """The last pass raised (torch's error is on its way): what it left is no batch's
        gradient thrown away later (the user zeroes it after catching the error)."""
        self.windows.mark_used(self.windows.pass_no)

    # -- optimizer steps ----------------------------------------------------------------------
    def stepped(self, params: list[torch.Tensor], opt: Any = None, where: Any = None,
                owner: int | None = None) -> None:
        """An optimizer step (``opt``, called at ``where``) is about to use these leaves'
        ``.grad``: report the stale sums it consumes, and the windows another optimizer's step
        used already. ``owner``: id of the optimizer whose running step this one is part of
        (SAM's base optimizer steps inside SAM's step: one use, not two)."""
        w = self.windows
        if owner is None and opt is not None:
            owner = id(opt)
        if self.held:  # (all of the optimizer's leaves: one whose .grad is None confirms)
            held = params if opt is None else [p for g in opt.param_groups for p in g["params"]]
            for raw in self.held.decide(held, self._pass_of):
                self.emit.anomaly(raw)
        for st in w.stepped(params, owner):
            stale_where = st.stale_where
            st.stale_where = None
            self.stale(st, stale_where, st.leaf())
        if w.twice:
            twice, w.twice = w.twice, []
            for st in twice:
                self._applied_twice(st, where, opt)

    def _pass_of(self, p: torch.Tensor) -> int:
        st = self.windows.get(p)
        return 0 if st is None else st.pass_no

    def _unstepped(self) -> None:
        """Windows summed three passes and no optimizer has stepped yet: note which optimizer
        holds each leaf (one scan of the garbage collector's objects per watch, rare paths only:
        the leaves and optimizers may be gone when the watch ends)."""
        w = self.windows
        states, w.unstepped = w.unstepped, []
        if w.all_steps:
            return
        if self._holders is None:
            self._holders = optimizers_holding()
        for st in states:
            p = st.leaf()
            opt = self._holders.get(id(p)) if p is not None else None
            if opt is not None and opt[1]() is p:
                st.holder = (opt[0], self._name(p), tuple(p.shape), p.dtype, p.device)

    def closing(self) -> None:
        """The watch ends: light's held discards are due. If no optimizer ever stepped, windows
        that summed three or more passes, never read, of parameters an optimizer holds, were
        computed for nothing (a step condition that never fires: ``i % n == n``, ``% 1``, fewer
        batches than the accumulation steps)."""
        w = self.windows
        if self.off:
            return
        for raw in self.held.confirm_all():
            self.emit.anomaly(raw)
        if w.all_steps:
            return
        w.sync()
        for st in w.leaves.values():
            if (st.holder is None or st.accum < 3 or st.consumed or st.read or st.reset
                    or st.never_applied):
                continue
            st.never_applied = True
            opt, name, shape, dtype, device = st.holder
            self.emit.anomaly(Raw(
                K.GRAD_NEVER_APPLIED, "backward", name, shape, dtype, device, None, None,
                "enabled", None, st.where, self.ctx.step(),
                f"`{name}.grad` summed {st.accum} backward passes that no optimizer step used: "
                f"{opt} holds `{name}` but never stepped during the watch",
                HINT_NEVER_STEPPED,
            ))

    def _never_applied(self, st: LeafState, where: Any) -> None:
        p = st.leaf()
        name = self._name(p)
        self.emit.anomaly(Raw(
            K.GRAD_NEVER_APPLIED, "backward", name,
            *_meta(p), None, None, "enabled", None, where,
            self.ctx.step(),
            f"`{name}.grad` keeps summing gradients that no optimizer step uses: optimizers "
            f"stepped {self.windows.all_steps - st.window_steps} times since it was last reset "
            "and none holds this parameter",
            HINT_NEVER_APPLIED,
        ))

    def check_state(self, opt: Any, params: list[torch.Tensor], where: Any) -> None:
        """Before a step of ``opt`` updates: see :class:`._optimizer_state.StateAliasCheck`."""
        self._state_alias.check(opt, params, where)

    def _read_mid_window(self, st: LeafState, first: Any, second: Any) -> None:
        p = st.leaf()
        name = self._name(p)
        loc = location_of(first)
        earlier = f" (first read at {loc}, `{loc.code}`)" if loc is not None else ""
        self.emit.anomaly(Raw(
            K.GRAD_READ_MID_WINDOW, "grad", f"{name}.grad",
            *_meta(p), None, None,
            "no_grad" if not _grad_enabled() else "enabled", None, second, self.ctx.step(),
            f"`{name}.grad` was read here after another backward pass added to it, without a "
            f"reset in between{earlier}: this read sees the sum of both passes, not the last "
            "one's gradient; the window was then replaced or dropped without an optimizer step "
            "using the sum",
            HINT_READ_MID_WINDOW,
        ))

    def _applied_twice(self, st: LeafState, where: Any, opt: Any) -> None:
        p = st.leaf()
        name = self._name(p)
        self.emit.anomaly(Raw(
            K.GRAD_APPLIED_TWICE, "optimizer.step", name,
            *_meta(p), None, None, "no_grad", None, where,
            self.ctx.step(),
            f"`{name}.grad` was applied by a second optimizer ({type(opt).__name__}) after "
            "another optimizer's step already used the same gradients: the parameter is "
            "updated twice per backward",
            HINT_APPLIED_TWICE,
        ))

    def closure_used(self, opt: torch.optim.Optimizer) -> None:
        """A closure ran again within one step (LBFGS): the step reads these gradients."""
        for st in self.windows.used_by_step([p for g in opt.param_groups for p in g["params"]
                                             if p.grad is not None]):
            stale_where = st.stale_where
            st.stale_where = None
            self.stale(st, stale_where, st.leaf(), hint=HINT_STALE_CLOSURE)

    def stale(self, st: LeafState, where: Any, p: torch.Tensor | None = None,
              edited: bool = False, hint: str = HINT_STALE) -> None:
        p = p if p is not None else st.leaf()
        name = self._name(p)
        edit = location_of(st.last_edit) if edited and st.last_edit is not None else None
        cause = f"; it was last edited at {edit} (`{edit.code}`)" if edit is not None else ""
        self.emit.anomaly(Raw(
            K.STALE_GRAD_ACCUMULATION, "backward", name,
            *_meta(p), None, None, "enabled", None, where,
            self.ctx.step(),
            f"`{name}.grad` now sums gradients taken at different versions of `{name}` (it "
            f"changed between two backward passes and .grad was not zeroed{cause})",
            hint,
        ))

    def prune(self, tracked: set[int]) -> None:
        self.windows.prune()
        self.windows.reached.intersection_update(tracked)

    def _name(self, p: torch.Tensor | None) -> str:
        if p is None:
            return "tensor"
        return self.ctx.names.param_name(p) or describe(p)


def _meta(p: torch.Tensor | None) -> tuple:
    """Shape, dtype and device of a record's tensor (None each once it is gone)."""
    return (None, None, None) if p is None else (tuple(p.shape), p.dtype, p.device)

