"""The ``zero_grad`` boundary (optimizers' and modules'): the accumulation detector checks the
windows it resets; at full the mode steps aside while torch resets them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from .._failopen import FailOpen, Part
from ..detectors.accumulation import AccumulationDetector
from .gate import ModeGate

__all__ = ["ZeroGrad"]

_get_ident = threading.get_ident
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


class ZeroGrad:
    def __init__(self, ctx: RunContext, gate: ModeGate, fail: FailOpen,
                 acc: AccumulationDetector, know_optimizer: Callable[[Any], Any]) -> None:
        self.know_optimizer = know_optimizer  # an optimizer seen before its first step
        self.ctx = ctx
        self.gate = gate
        self.fail = fail
        self.acc = acc

    def install(self, installed: Any) -> None:
        wrapper = self.fail.wrapper(Part.ACCUMULATION, self._wrapper)
        installed.wrap_attribute(torch.optim.Optimizer, "zero_grad", wrapper)
        installed.wrap_attribute(torch.nn.Module, "zero_grad", wrapper)

    def _wrapper(self, wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        gate = self.gate
        if (_dynamo_compiling() or _compiler._is_compiling_flag or gate.suspended
                or instance is None or _get_ident() != gate.thread):
            return wrapped(*args, **kwargs)
        if isinstance(instance, torch.optim.Optimizer):
            # zero-config: an optimizer zeroing before its first step is known from here on
            # (its leaves are trained: a window it zeroes unused is discarded)
            self.know_optimizer(instance)
        # hot: usual case, right after a step with set_to_none: nothing unconsumed to check, and the
        # next backward sees each .grad start afresh (None before it): no per-leaf work here.
        set_to_none = args[0] if args else kwargs.get("set_to_none", True)
        if self.acc.has_unconsumed() or not set_to_none:
            t0 = time.perf_counter()
            with torch._C.DisableTorchFunction():
                self.acc.zero_grad(instance)
            self.ctx.busy += time.perf_counter() - t0
        # The resets are recorded: torch's own .grad reads and writes inside need no mode
        # (full). zero_grad switches no grad mode: light has nothing to step aside from.
        if not (self.ctx.full and gate.pause()):
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            try:  # (after the user's call: an error here is ours, never the user's)
                gate.resume()
            except Exception as exc:
                self.fail.fail(Part.ACCUMULATION, exc)
