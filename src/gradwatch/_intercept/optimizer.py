"""The optimizer step boundary: torch's global step pre/post hooks, a wrapper around each library
optimizer class's ``step`` (the mode steps aside for all of it), and closures.

Right before the update: the saved-tensor check of the parameters, the stale sums the step
consumes, the versions, and (on statistics steps) samples. After it: the ``optimizer_update``
record with its statistics and NaN probes, then the step boundary.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext, version
from .._failopen import FailOpen, Part
from .._location import caller, is_internal, without_own_frames
from .._stats import sample, sample_step, update_norms, without_grad
from ..detectors.accumulation import AccumulationDetector
from ..detectors.grad_flow import GradFlowDetector
from ..detectors.nonfinite import NonfiniteDetector
from ..detectors.saved_tensor import SavedTensorDetector
from ..errors import AnomalyError
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, UpdateStats
from .gate import ModeGate

__all__ = ["OptimizerInfo", "Optimizers"]

K = EventKind
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler
_DisableTorchFunction = torch._C.DisableTorchFunction
_get_ident = threading.get_ident


class OptimizerInfo:
    __slots__ = ("foreign", "index", "label", "messages", "name")

    def __init__(self, foreign: bool, index: int, name: str) -> None:
        self.foreign = foreign  # a library optimizer (its writes are checked at the hooks)
        self.index = index
        self.name = name
        self.label = f"{name}{index}"  # the optimizer_update event's tensor name
        self.messages: dict[int, str] = {}  # parameters updated -> message (no string work per step)

    def message(self, n: int) -> str:
        text = self.messages.get(n)
        if text is None:
            text = self.messages[n] = f"{self.name} updated {n} parameter(s)"
        return text


class StepState:
    """One running step: from its pre hook (or closure) to its post hook."""

    __slots__ = ("info", "outer", "params", "samples", "updated", "versions", "where")

    def __init__(self, info: OptimizerInfo, where: Any) -> None:
        self.info = info
        self.where = where
        self.outer: int | None = None  # id of the optimizer whose step this one runs inside
        self.samples: Any = None
        self.updated = False
        self.params: list[torch.Tensor] = []
        self.versions: list[int | None] = []


class Optimizers:
    """The step boundary (``Part.OPTIMIZER``)."""

    def __init__(self, ctx: RunContext, gate: ModeGate, emit: Emitter, fail: FailOpen,
                 installed: Any, saved: SavedTensorDetector, acc: AccumulationDetector,
                 grad_flow: GradFlowDetector, nonfinite: NonfiniteDetector,
                 step_boundary: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.gate = gate
        self.emit = emit
        self.fail = fail
        self.installed = installed
        self.saved = saved
        self.acc = acc
        self.grad_flow = grad_flow
        self.nonfinite = nonfinite
        self.step_boundary = step_boundary
        self.known: weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerInfo] = (
            weakref.WeakKeyDictionary())
        self._last: tuple[weakref.ref[Any], OptimizerInfo] | None = None  # hot: the same again
        self._wrapped: set[type] = set()  # optimizer classes whose step is wrapped
        self.running: dict[int, StepState] = {}  # id(optimizer) -> its running step
        self.off = False

    def install(self) -> None:
        hooks = (self.fail.hook(Part.OPTIMIZER, self.on_step_pre),
                 self.fail.hook(Part.OPTIMIZER, self.on_step_post))
        handles = self.installed.optimizer_hooks(*hooks)

        def compiling_possible() -> None:
            # torch.compiler.disable: inside a compiled ``opt.step()`` dynamo breaks the graph at
            # these hooks and runs them eagerly around the compiled update (the step is seen,
            # counted and checked like an eager one); outside compiled code they are plain
            # calls. It imports torch._dynamo (~1 s): done once something else has (the user's
            # torch.compile), never in a script that does not compile.
            for handle, hook in zip(handles, hooks):
                self.installed.replace_hook(handle, _compiler.disable(hook))

        self.installed.after_import("torch._dynamo", compiling_possible)
        self.installed.add(self.running.clear)  # a step that raised left its samples (views) here

    # -- knowing an optimizer -----------------------------------------------------------------
    def info(self, opt: torch.optim.Optimizer) -> OptimizerInfo:
        last = self._last
        if last is not None and last[0]() is opt:  # the usual case: the same optimizer again
            return last[1]
        info = self.known.get(opt)
        if info is not None:
            self._last = (weakref.ref(opt), info)
            return info
        step = inspect.unwrap(type(opt).step)
        code = getattr(step, "__code__", None)
        foreign = code is None or is_internal(code) or _is_library(code.co_filename)
        info = OptimizerInfo(foreign, len(self.known), type(opt).__name__)
        self.known[opt] = info
        if foreign:
            self._wrap_step_of(type(opt))
        leaves = self.ctx.leaves
        for p in self.ctx.names.add_optimizer(opt):
            leaves.track(p)
        for g in opt.param_groups:
            for p in g["params"]:
                leaves.track(p)
                self.acc.optimized(p)
                self.grad_flow.cuts.mark_trained(p)
        return info

    def _wrap_step_of(self, cls: type) -> None:
        """Step aside for the whole ``step`` of a library optimizer class, from before torch's
        step wrapper (at full its ``record_function`` would otherwise pass through the mode twice
        per step) to after the post hooks, and step back in even if the step raised."""
        owner = next((c for c in cls.__mro__ if "step" in c.__dict__), None)
        if owner is None or owner in self._wrapped or owner is torch.optim.Optimizer:
            return
        self._wrapped.add(owner)  # (AdamW runs Adam's step: wrapped once, on Adam)
        self.installed.wrap_attribute(owner, "step", self._wrap_step)

    def _wrap_step(self, wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        gate = self.gate
        try:
            skip = (_dynamo_compiling() or _compiler._is_compiling_flag or instance is None
                    or self.off or gate.outer_step or gate.closed or _get_ident() != gate.thread)
        except Exception as exc:
            self.fail.fail(Part.OPTIMIZER, exc)
            skip = True
        if skip:
            return wrapped(*args, **kwargs)
        try:
            last = self._last
            info = last[1] if last is not None and last[0]() is instance else \
                self.known.get(instance)
            paused = info is not None and info.foreign and gate.pause()
        except Exception as exc:
            self.fail.fail(Part.OPTIMIZER, exc)
            return wrapped(*args, **kwargs)
        if not paused:
            return wrapped(*args, **kwargs)
        try:
            suspended, gate.outer_step = gate.suspended, True
        except Exception as exc:
            self.fail.fail(Part.OPTIMIZER, exc)
            gate.resume()
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:  # (the user's, torch's, or raise's: no frame of ours below)
            try:
                exc = exc.with_traceback(without_own_frames(exc.__traceback__))
            except Exception:
                pass
            raise exc
        finally:  # also when the step raised (no post hook then): watching resumes at once
            try:  # (after the user's call: an error here is ours, never the user's)
                gate.outer_step = False
                gate.suspended = suspended
                gate.resume()
            except Exception as exc:
                self.fail.fail(Part.OPTIMIZER, exc)

    # -- the hooks ----------------------------------------------------------------------------
    def on_step_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        gate = self.gate
        if (_dynamo_compiling() or _compiler._is_compiling_flag or gate.closed or self.off
                or _get_ident() != gate.thread):
            return None  # (another thread's step is not the watched loop's)
        t0 = time.perf_counter()
        result = None
        try:
            if gate.paused and not gate.outer_step:
                gate.resume()  # a step that raised left it paused
            with _DisableTorchFunction():
                gate.suspended = False
                last = self._last  # the usual case: the same optimizer again
                info = last[1] if last is not None and last[0]() is opt else self.info(opt)
                where = caller(1)  # skip the boundary hook: torch's step wrapper, then the caller
                state = StepState(info, where)
                # a step inside another optimizer's step (SAM's base optimizer) is part of it
                state.outer = next(iter(self.running), None) if self.running else None
                self.running[id(opt)] = state
                closure = args[1] if len(args) > 1 else kwargs.get("closure")
                if closure is not None:
                    result = self._wrap_closure(opt, state, args, kwargs, closure)
                else:
                    self._about_to_update(opt, state)
        except AnomalyError:
            self.ctx.busy += time.perf_counter() - t0
            raise
        except Exception as exc:
            self.fail.fail(Part.OPTIMIZER, exc)
            return None
        if info.foreign:
            gate.suspended = True
            gate.pause()
        else:
            gate.step_depth += 1
        self.ctx.busy += time.perf_counter() - t0
        return result

    def _wrap_closure(self, opt: Any, state: StepState, args: tuple, kwargs: dict,
                      closure: Callable) -> Any:
        gate = self.gate
        fail = self.fail

        def closure_watched(*a: Any, **k: Any) -> Any:
            suspended, depth, paused = gate.suspended, gate.step_depth, False
            try:  # the closure's backward is the user's: watched
                gate.suspended = False
                gate.step_depth = 0
                paused = gate.resume()
            except Exception as exc:
                fail.fail(Part.OPTIMIZER, exc)
            try:
                if not torch.is_grad_enabled():  # the step runs its closure under no_grad
                    fail.guard(Part.GRAD_FLOW, self.grad_flow.closure_without_grad, opt,
                               sys._getframe(1))
            except Exception as exc:  # (the guard's very entry)
                fail.fail(Part.GRAD_FLOW, exc)
            try:
                out = closure(*a, **k)
            except BaseException as exc:  # the user's (or torch's): no frame of ours below here
                raise exc.with_traceback(without_own_frames(exc.__traceback__))  # noqa: B904
            finally:
                try:  # (after the user's call: an error here is ours, never the user's)
                    gate.suspended, gate.step_depth = suspended, depth
                    if paused:
                        gate.pause()
                except Exception as exc:
                    fail.fail(Part.OPTIMIZER, exc)
            try:
                with _DisableTorchFunction():
                    if not state.updated:
                        fail.guard(Part.OPTIMIZER, self._about_to_update, opt, state)
                    else:  # called again within the step (LBFGS): the step reads these gradients
                        fail.guard(Part.ACCUMULATION, self.acc.closure_used, opt)
            except AnomalyError:
                raise
            except Exception as exc:  # (the guards' very entry)
                fail.fail(Part.OPTIMIZER, exc)
            return out

        if len(args) > 1:
            return (args[0], closure_watched, *args[2:]), kwargs
        kwargs = dict(kwargs)
        kwargs["closure"] = closure_watched
        return args, kwargs

    def _about_to_update(self, opt: torch.optim.Optimizer, state: StepState) -> None:
        """Right before the optimizer writes: saved-tensor, stale and consumption checks."""
        state.updated = True
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        state.params = params
        if self.saved.registry:
            self.saved.check_tensors("optimizer.step", params, state.where)
        if not self.acc.off:
            self.acc.stepped(params, opt, state.where, owner=state.outer)
            if opt.state:
                self.fail.guard(Part.ACCUMULATION, self.acc.check_state, opt, params, state.where)
        try:
            state.versions = [p._version for p in params]
        except Exception:  # a tensor without a version counter (inference, odd subclasses)
            state.versions = [version(p) for p in params]
        if self.ctx.is_stats_step():
            state.samples = without_grad(sample_step, params)

    def on_step_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        gate = self.gate
        if (_dynamo_compiling() or _compiler._is_compiling_flag or gate.closed
                or _get_ident() != gate.thread):
            return
        t0 = time.perf_counter()
        state = self.running.pop(id(opt), None)
        if state is not None and not state.info.foreign:
            gate.step_depth = max(0, gate.step_depth - 1)
        gate.suspended = False
        if gate.paused and not gate.outer_step:
            gate.resume()
        if state is None or self.off:
            return
        step = self.ctx.step()  # the step the events being flushed belong to
        try:
            with _DisableTorchFunction():
                self._after_update(state, step)
        except AnomalyError:
            raise
        except Exception as exc:
            self.fail.fail(Part.OPTIMIZER, exc)
        self.ctx.busy += time.perf_counter() - t0
        if state.outer is None:
            self.step_boundary(step)

    def _after_update(self, state: StepState, step: int) -> None:
        params, versions, where, info = state.params, state.versions, state.where, state.info
        self.saved.stepped(where, step, params, versions)
        ratios = None
        if state.samples is not None:
            ratios = self._statistics(info, params, versions, state.samples, where, step)
        if state.outer is None:  # (a nested step is part of the step it runs in)
            self.ctx.steps += 1
        n = len(params)
        self.emit.record(Raw(K.OPTIMIZER_UPDATE, "optimizer.step", info.label, None, None, None,
                             None, None, "no_grad", None, where, step,
                             info.messages.get(n) or info.message(n), "", ratios))

    def _statistics(self, info: OptimizerInfo, params: list[Any], versions: list[Any],
                    samples: Any, where: Any, step: int) -> UpdateStats | None:
        """A statistics step: the update's size from the samples taken before it, and the queued
        NaN/Inf probe of the updated parameters, all from one fused norm call (read lazily)."""
        views, copies, pointers = samples
        kept, before, after = [], [], []
        for p, vb, view, copy, pointer in zip(params, versions, views, copies, pointers):
            if copy is None:  # not sampled
                continue
            if view is None or p.data_ptr() != pointer:  # no view kept, or .data rebound
                view = sample(p)
                if view is None or view.shape != copy.shape:
                    continue
            kept.append((p, vb))
            before.append(copy)
            after.append(view)
        if not kept:
            return None
        params = [p for p, _ in kept]
        versions = [vb for _, vb in kept]
        check = self.ctx.config.check_nonfinite
        # One fused norm call for ‖before‖, ‖after‖, ‖Δ‖ of the samples and, for the NaN/Inf
        # probe, of each whole parameter; one vector, read at the flush (no sync here).
        vec = without_grad(update_norms, before, after, params if check else [])
        names = [self.ctx.names.param_name(p) for p in params]
        labels = [n or f"{info.name}{info.index}.param{i}" for i, n in enumerate(names)]
        if check:
            self.nonfinite.stepped(vec, len(params), params, versions, where, step, names)
        return UpdateStats(vec, labels)


def _is_library(filename: str) -> bool:
    return ("site-packages" in filename or "dist-packages" in filename
            or filename.startswith(sys.prefix + os.sep + "lib"))
