"""The gradient-clipping boundary (``clip_grad_norm_`` and friends): one bracketed unit, like an
optimizer step. The mode and the grad-mode switch stay out of torch's own ops inside; each
``.grad`` they changed is recorded afterwards as one ``inplace_no_grad`` event with its versions."""

from __future__ import annotations

import functools
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from .._failopen import FailOpen, Part
from .._location import caller
from ..detectors.accumulation import AccumulationDetector
from ..detectors.saved_tensor import SavedTensorDetector
from ..errors import AnomalyError
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import LeafBatch
from .gate import ModeGate

__all__ = ["Clipping"]

K = EventKind
_Tensor = torch.Tensor
_get_ident = threading.get_ident
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler
_OWNERS = (torch.nn.utils, torch.nn.utils.clip_grad)
_FUNCTIONS = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "clip_grads_with_norm_")
_NORMS = ("clip_grad_norm_", "clip_grad_norm")  # (they return the norm)


class Clipping:
    def __init__(self, ctx: RunContext, gate: ModeGate, emit: Emitter, fail: FailOpen,
                 saved: SavedTensorDetector, acc: AccumulationDetector) -> None:
        self.ctx = ctx
        self.acc = acc
        self.gate = gate
        self.emit = emit
        self.fail = fail
        self.saved = saved
        self.off = False

    def install(self, installed: Any) -> None:
        for name in _FUNCTIONS:
            wrapper = self.fail.wrapper(Part.CLIPPING, functools.partial(self._wrapper, name),
                                        prepare=_with_parameter_list)
            for owner in _OWNERS:
                if callable(getattr(owner, name, None)):
                    installed.wrap_attribute(owner, name, wrapper)

    def _wrapper(self, op: str, call: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        gate = self.gate
        if (_dynamo_compiling() or _compiler._is_compiling_flag or gate.suspended or gate.closed
                or _get_ident() != gate.thread):
            return call(*args, **kwargs)
        t0 = time.perf_counter()
        params = _parameters(args, kwargs)
        disabled = torch._C.DisableTorchFunction()
        with disabled:
            before = [(p, g, g._version) for p in params
                      if isinstance(p, _Tensor) and (g := p.grad) is not None]
            if self.saved.registry:
                self.saved.check_tensors(op, [g for _, g, _ in before], caller)
        where = caller(1)  # skip the boundary wrapper: the next frame called the function
        paused = gate.pause()
        gate.suspended = True  # grad-mode switches and the (light) mode: nothing to see inside
        self.ctx.busy += time.perf_counter() - t0
        try:
            return call(*args, **kwargs)
        finally:
            try:  # (after the user's call: an error here is ours, never the user's)
                gate.suspended = False
                if paused:
                    gate.resume()
                with disabled:
                    self._written(op, before, where)
            except AnomalyError:
                raise
            except Exception as exc:
                self.fail.fail(Part.CLIPPING, exc)

    def _written(self, op: str, before: list[tuple[Any, Any, int]], where: Any) -> None:
        if self.off:
            return
        t0 = time.perf_counter()
        if op in _NORMS:
            self.acc.norm_read()  # (the user got the gradients' norm: a read, see accumulation)
        changed = [(p, vb, va) for p, g, vb in before
                   if p.grad is g and (va := g._version) != vb]
        if changed:
            self.emit.record_batch(LeafBatch(
                K.INPLACE_NO_GRAD, op, [weakref.ref(c[0]) for c in changed],
                [(c[1], c[2]) for c in changed], where, self.ctx.step(), self.ctx.names))
        self.ctx.busy += time.perf_counter() - t0


def _with_parameter_list(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with the ``parameters`` argument as a list (a generator can be read
    only once: the clipping function and any fallback get the same parameters), or, for an empty
    generator, a fresh empty generator (torch warns about those)."""
    if args:
        given = args[0]
    elif "parameters" in kwargs:
        given = kwargs["parameters"]
    else:
        return args, kwargs
    if isinstance(given, (_Tensor, list, tuple)):
        return args, kwargs
    try:
        params = list(given)
    except Exception as exc:  # the user's iterable failed: torch's own iteration raises it
        again: Any = _raising(exc)
    else:
        again = params if params or not isinstance(given, types.GeneratorType) else (p for p in ())
    if args:
        return (again, *args[1:]), kwargs
    return args, {**kwargs, "parameters": again}


def _raising(exc: BaseException) -> Any:
    """A generator that raises ``exc`` when iterated (what the user's iterable did)."""
    raise exc
    yield  # (a generator)


def _parameters(args: tuple, kwargs: dict) -> list[Any]:
    given = args[0] if args else kwargs.get("parameters", ())
    if isinstance(given, _Tensor):
        return [given]
    return list(given) if isinstance(given, (list, tuple)) else []
