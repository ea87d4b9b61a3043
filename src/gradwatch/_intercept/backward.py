"""The backward boundary: wrappers around ``torch.autograd.backward`` and ``torch.autograd.grad``.

Before a pass: the mode resumes (a step that raised left it paused), the user's line, leaf
discovery from the graph, replaced cuts. Around it: one snapshot of the tracked leaves' ``.grad``
before and one comparison after (accumulation). When torch raises, the detectors add their note.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from .._failopen import FailOpen, Part
from .._location import caller, location_of
from ..detectors.accumulation import AccumulationDetector
from ..detectors.grad_flow import GradFlowDetector
from ..detectors.saved_tensor import SavedTensorDetector
from ..errors import AnomalyError, is_freed_graph_error
from .gate import ModeGate

__all__ = ["Backward"]

_Tensor = torch.Tensor
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler
_get_ident = threading.get_ident
_DISCOVERY_PASSES = 8  # leaf discovery stops after this many passes without a new leaf


class Backward:
    """The backward boundary (``Part.BACKWARD``; the snapshot belongs to ``Part.ACCUMULATION``)."""

    def __init__(self, ctx: RunContext, gate: ModeGate, fail: FailOpen,
                 saved: SavedTensorDetector, acc: AccumulationDetector,
                 grad_flow: GradFlowDetector, pass_over: Callable[[], None]) -> None:
        self.ctx = ctx
        self.pass_over = pass_over  # after each pass (the runtime flushes a full buffer)
        self.gate = gate
        self.fail = fail
        self.saved = saved
        self.acc = acc
        self.grad_flow = grad_flow
        self.running = False  # torch.autograd.backward re-dispatches itself: look once
        self.last: tuple[Any, int] | None = None  # where and step of the last pass that ran
        self._discover = _DISCOVERY_PASSES

    def install(self, installed: Any) -> None:
        wrap = self.fail.wrapper
        installed.wrap_attribute(torch.autograd, "backward", wrap(
            Part.BACKWARD, functools.partial(self._wrapper, True)))
        installed.wrap_attribute(torch.autograd, "grad", wrap(
            Part.BACKWARD, functools.partial(self._wrapper, False)))

    def _wrapper(self, accumulates: bool, wrapped: Callable, instance: Any, args: tuple,
                 kwargs: dict) -> Any:
        if (_dynamo_compiling() or _compiler._is_compiling_flag or self.running
                or self.gate.closed or _get_ident() != self.gate.thread):
            # (another thread's backward is not the watched loop's)
            return wrapped(*args, **kwargs)
        before = None
        refs = self.ctx.leaves.refs
        roots: tuple = ()
        where = None
        disabled = torch._C.DisableTorchFunction()
        with disabled:
            roots = _roots(args[0] if args else kwargs.get("tensors", kwargs.get("outputs")))
            try:
                where = self._before(roots)
            except AnomalyError:
                raise
            except Exception as exc:
                self.fail.fail(Part.BACKWARD, exc)
            if accumulates and not self.acc.off:
                try:  # hot: per tracked leaf: (id, version) of its .grad, None without one
                    before = [None if (g := None if (p := ref()) is None else p.grad) is None
                              else (id(g), g._version) for ref in refs]
                except Exception as exc:
                    self.fail.fail(Part.ACCUMULATION, exc)
        self.running = True
        try:
            out = wrapped(*args, **kwargs)
        except RuntimeError as exc:
            self.running = False
            try:  # (torch's error is the one to see: nothing of ours may replace it)
                self.fail.guard(Part.BACKWARD, self._annotate, exc, roots)
                self.fail.guard(Part.BACKWARD, self._freed, exc)
                self._failed(refs, before, where)
            except Exception as err:
                self.fail.fail(Part.BACKWARD, err)
            raise
        finally:
            self.running = False
        self.last = (where, self.ctx.step())  # (the last pass that ran: it freed its graph)
        try:  # (after torch's backward: an error here is ours, never the user's)
            self.grad_flow.backward_done()
        except Exception as exc:
            self.fail.fail(Part.GRAD_FLOW, exc)
        try:
            self.saved.after_backward()  # writes torch could not see, used by this pass
            self.saved.end_step()  # this pass's graph is freed (unless retained): drop its entries
        except AnomalyError:
            raise
        except Exception as exc:
            self.fail.fail(Part.SAVED_TENSORS, exc)
        if before is not None:
            try:
                with disabled:
                    self._accumulated(refs, before, where)
            except AnomalyError:
                raise
            except Exception as exc:
                self.fail.fail(Part.ACCUMULATION, exc)
        try:
            self.pass_over()
        except AnomalyError:
            raise
        except Exception as exc:
            self.fail.fail(Part.FLUSH, exc)
        return out

    def _failed(self, refs: list[Any], before: list[Any] | None, where: Any) -> None:
        """Torch's backward raised: what was accumulated before it did still counts."""
        try:
            self.grad_flow.backward_done()
        except Exception as exc:
            self.fail.fail(Part.GRAD_FLOW, exc)
        if before is not None:
            try:
                with torch._C.DisableTorchFunction():
                    self.fail.guard(Part.ACCUMULATION, self._accumulated, refs, before, where)
            except AnomalyError:
                pass  # recorded; torch's own error is the one to see
            self.acc.backward_failed()

    def _before(self, roots: tuple) -> Any:
        t0 = time.perf_counter()
        gate = self.gate
        gate.suspended = False
        if gate.paused:
            gate.resume()
        gate.step_depth = 0
        self.ctx.passes += 1
        where = caller()
        if self._discover > 0 and roots:
            self._discover = _DISCOVERY_PASSES if self._discover_leaves(roots) else self._discover - 1
        if not self.grad_flow.off:
            self.grad_flow.end_step()  # a trained tensor replaced since: report it now
            if roots and self.grad_flow.window:
                self.grad_flow.rewrapped_roots(roots, self.ctx.leaves.ids)
            if self.grad_flow.zero_ops:
                self.fail.guard(Part.GRAD_FLOW, self.grad_flow.zero_gradient_paths, roots)
        self.ctx.busy += time.perf_counter() - t0
        return where

    def _discover_leaves(self, roots: tuple, limit: int = 20000) -> bool:
        """Track leaves of this graph not tracked yet (plain tensors with requires_grad)."""
        seen: set[int] = set()
        stack = [r.grad_fn for r in roots if r.grad_fn is not None]
        found = False
        tracked = self.ctx.leaves
        names = self.ctx.names
        while stack and len(seen) < limit:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if isinstance(var, _Tensor):
                if id(var) not in tracked.ids:
                    names.add_leaf(var)
                    tracked.track(var)
                    found = True
                continue
            stack.extend(nf for nf, _ in fn.next_functions if nf is not None)
        return found

    def _accumulated(self, refs: list[Any], before: list[Any], where: Any) -> None:
        t0 = time.perf_counter()
        per_leaf = self.grad_flow.watching
        leaves = self.acc.backward(refs, before, where, per_leaf=per_leaf)
        if per_leaf and leaves:
            self.grad_flow.trained(leaves)
        self.ctx.busy += time.perf_counter() - t0

    def _freed(self, exc: RuntimeError) -> None:
        """Torch's "backward through the graph a second time": name the pass that freed it."""
        if self.last is None or not is_freed_graph_error(exc):
            return
        loc = location_of(self.last[0])
        if loc is None:
            return
        exc.add_note(
            f"gradwatch: the graph this backward needs was freed by the backward at {loc} "
            f"(`{loc.code}`, step {self.last[1]}): a tensor computed before that backward is used "
            "again (a recurrent state carried over, a generator's output reused after the "
            "discriminator's backward, a loss kept from an earlier step). Fix: detach what you "
            "carry over (hidden = hidden.detach()), recompute it, or pass retain_graph=True to "
            "the first backward if both really need the same graph.")

    def _annotate(self, exc: RuntimeError, roots: tuple) -> None:
        if not self.saved.annotate(exc):
            self.grad_flow.annotate(exc, roots)


def _roots(given: Any) -> tuple:
    if isinstance(given, _Tensor):
        return (given,)
    if given:
        return tuple(r for r in given if isinstance(r, _Tensor))
    return ()
