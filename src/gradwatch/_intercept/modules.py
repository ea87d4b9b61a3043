"""Module boundaries: naming modules as they first run (zero configuration), the fused
inference path of attention modules, and data loading.

Nothing here is attached to a user's object: the discovery hook is torch's global module hook,
and the fast-path bracket wraps the modules' classes (a module pickles, deep-copies and prints
as it would without gradwatch).
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from .._failopen import FailOpen, Part
from .._location import local_name, user_frame
from .gate import ModeGate, is_compiling

__all__ = ["Modules"]

_DISCOVERY_STEPS = 8  # module discovery stops after this many steps without a new module
_DISCOVERY_PASSES = 64  # ... or this many backward passes (loops without optimizer steps)
# modules whose inference fast path is skipped while any function mode is active
FAST_PATH_CLASSES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                     torch.nn.TransformerEncoder)
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


class Modules:
    """Discovery (``Part.NAMING``), the fast-path bracket and the data-fetch pause."""

    def __init__(self, ctx: RunContext, gate: ModeGate, fail: FailOpen) -> None:
        self.ctx = ctx
        self.gate = gate
        self.fail = fail
        self._hook: Any = None
        self._last_discovery = 0  # step at which a module was last discovered
        self._last_discovery_pass = 0  # and the backward passes then
        self.off = False

    def install(self, installed: Any) -> None:
        self._hook = installed.module_forward_pre_hook(self.fail.hook(Part.NAMING, self._on_call))
        for cls in FAST_PATH_CLASSES:
            installed.replace_attribute(cls, "forward", _bracketed(
                cls.__dict__["forward"], self._fast_path_enter, self._fast_path_exit,
                self.gate.fast_path_aside))
        if self.ctx.full:
            # Batches loaded in this process (num_workers=0): torch's indexing and collation of
            # every sample would each pass through the mode; the loader's own code needs no look.
            installed.wrap_attribute(torch.utils.data.dataloader._BaseDataLoaderIter, "__next__",
                                     self.fail.wrapper(Part.DATA_LOADING, self._fetch))

    def add(self, module: torch.nn.Module, prefix: str = "") -> None:
        """Name ``module``'s parameters and buffers and track its leaves."""
        track = self.ctx.leaves.track
        for p in self.ctx.names.add_module(module, prefix):
            track(p)

    def _on_call(self, module: torch.nn.Module, args: Any) -> None:
        if is_compiling() or self.off or threading.get_ident() != self.gate.thread:
            return  # (traced by dynamo: stay out of the graph; another thread's modules)
        names = self.ctx.names
        if self.gate.suspended or names.knows_module(module):
            return
        prefix = ""
        if names.has_roots():  # a second model: prefix it by the user's variable name
            var = local_name(user_frame(2), module)
            prefix = f"{var or type(module).__name__}."
        with torch._C.DisableTorchFunction():
            self.add(module, prefix)
        self._last_discovery = self.ctx.step()
        self._last_discovery_pass = self.ctx.passes

    def passed(self, passes: int) -> None:
        """A backward pass ended: a loop whose optimizer steps never come (a hand-written
        update) retires discovery after this many passes without a new module."""
        if self._hook is not None and passes - self._last_discovery_pass >= _DISCOVERY_PASSES:
            self.end_step(self._last_discovery + _DISCOVERY_STEPS)

    def end_step(self, step: int) -> None:
        if self._hook is not None and step - self._last_discovery >= _DISCOVERY_STEPS:
            # every module has run several times: stop paying a hook call per module call
            self._hook.remove()
            self._hook = None

    def _fast_path_enter(self, module: torch.nn.Module) -> bool:
        # (also once the mode part is off: the mode stays on the stack and would still change
        # the module's result)
        try:
            return self.gate.fast_path_enter(module)
        except Exception as exc:
            self.fail.fail(Part.MODE, exc)
            try:  # whatever it did not do: the mode off the stack for this forward all the same
                return self.gate.fast_path_aside(module)
            except Exception:
                return False

    def _fast_path_exit(self, module: torch.nn.Module) -> None:
        try:
            self.gate.fast_path_exit(module)
        except Exception as exc:
            self.fail.fail(Part.MODE, exc)

    def _fetch(self, call: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        """The loader's ``__next__`` with the mode stepped aside, put back after."""
        gate = self.gate
        if not gate.pause():
            return call(*args, **kwargs)
        try:
            return call(*args, **kwargs)
        finally:
            try:
                gate.resume()
            except Exception as exc:  # (the user's batch, or StopIteration, goes on)
                self.fail.fail(Part.DATA_LOADING, exc)


def _bracketed(forward: Callable, enter: Callable[[torch.nn.Module], bool],
               leave: Callable[[torch.nn.Module], None],
               aside: Callable[[torch.nn.Module], bool]) -> Callable:
    """``forward`` of an attention/encoder class, run with the mode aside in eval mode: there it
    takes a fused fast path unless a function mode is active, and with gradwatch's mode its
    outputs would differ in the last bits, and so would any training they feed (distillation,
    pseudo-labels, EMA teachers). A plain function (dynamo traces it as one).

    TorchScript compiles the source of ``forward`` (``__wrapped__``) but resolves its names in
    the globals of the function it was handed: the bracket is given ``forward``'s globals (all
    it needs itself is in its closure), so that ``torch.jit.script`` of these modules works
    inside a watch (a failed compilation would poison TorchScript's cache for the process).

    ``enter``/``leave`` guard themselves; the bracket guards their very entry (a RecursionError,
    a MemoryError there): ``aside`` then takes the mode off the stack all the same."""
    dynamo_compiling, compiler = _dynamo_compiling, _compiler

    def bracketed(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            plain = self.training or dynamo_compiling() or compiler._is_compiling_flag
        except Exception:  # (ours failed: decide by the module's own flag)
            plain = self.training
        if plain:
            return forward(self, *args, **kwargs)
        try:
            entered = enter(self)
        except Exception:
            try:
                entered = aside(self)
            except Exception:
                entered = False
        try:
            return forward(self, *args, **kwargs)
        finally:
            if entered:
                try:
                    leave(self)
                except Exception:  # (the mode stays aside: the module's result is the same)
                    pass

    rebound = types.FunctionType(bracketed.__code__, forward.__globals__, forward.__name__,
                                 bracketed.__defaults__, bracketed.__closure__)
    return functools.wraps(forward)(rebound)
