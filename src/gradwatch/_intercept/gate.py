"""The gate: whether the function mode looks, and why — one object's business.

``full`` keeps the mode on the stack for the whole watch and steps it aside while library code
whose effect is checked otherwise runs (an optimizer step, zero_grad, clipping, data loading,
the fused fast path of attention modules). ``light`` pushes the mode only while user code has
grad mode off: it stands in for ``torch._C._set_grad_enabled``.

The state: ``suspended`` (on the mode: it passes everything through), ``paused`` (the mode or the
light switch stepped aside), ``light_pushed``, ``outer_step`` (a library optimizer's whole step is
running), ``step_depth`` (user-defined optimizer steps running: their writes are the step's),
the fast-path stack. Only this module writes them.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._location import is_internal
from ..errors import GradWatchWarning
from .mode import WatchMode

__all__ = ["ModeGate"]

_push_function_mode = torch._C._push_on_torch_function_stack
_pop_function_mode = torch._C._pop_torch_function_stack
_original_set_grad_enabled = torch._C._set_grad_enabled
_GRAD_MODE_FILE = torch.autograd.grad_mode.__file__
_CONTEXTLIB_FILE = torch.utils._contextlib.__file__
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler

_UNDER_USER_MODE = (
    "gradwatch: another TorchFunctionMode entered inside watch() is still active; gradwatch's "
    "mode was taken off the stack from beneath it (that mode is untouched and exits as usual)")


def is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` without its TorchScript check (our hooks never run
    scripted)."""
    return _dynamo_compiling() or _compiler._is_compiling_flag


def _remove_mode(mode: Any) -> bool:
    """Take ``mode`` off this thread's function-mode stack wherever it is: the modes above it
    are popped and pushed back in order (a mode's ``__exit__`` pops whatever is on top, so theirs
    still work). True if it was there."""
    above, found = [], False
    while not found and torch._C._len_torch_function_stack():
        top = _pop_function_mode()
        found = top is mode
        if not found:
            above.append(top)
    for m in reversed(above):
        _push_function_mode(m)
    return found


def _stack_top() -> Any:
    n = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(n - 1) if n else None


def switch_frame(depth: int = 2) -> Any:
    """The frame that switched grad mode: the first outside torch's grad_mode and gradwatch."""
    frame = sys._getframe(depth)
    while frame is not None and (frame.f_code.co_filename == _GRAD_MODE_FILE
                                 or frame.f_code.co_filename.startswith(_OWN_DIR)):
        frame = frame.f_back
    return frame


# The light watch's stand-in for torch._C._set_grad_enabled holds its gate weakly here.
_LIGHT_TARGET: list[weakref.ref[ModeGate] | None] = [None]


def _light_set_grad_enabled(mode: bool) -> None:
    """Stands in for ``torch._C._set_grad_enabled`` during a light watch: push the function mode
    while grad is off. One module-level function (memoised once), holding the gate weakly."""
    _original_set_grad_enabled(mode)
    if _dynamo_compiling() or _compiler._is_compiling_flag:
        return
    ref = _LIGHT_TARGET[0]
    gate = ref() if ref is not None else None
    if gate is not None:
        gate.grad_mode_switched(mode)


class ModeGate:
    """Owns the mode's on/off state (see the module docstring)."""

    def __init__(self, full: bool, on_no_grad: Callable[[Any], None],
                 on_light_fail: Callable[[BaseException], None]) -> None:
        self.full = full
        self.mode = WatchMode()
        self.mode.on_no_grad = self._no_grad_entered
        self._on_no_grad = on_no_grad  # (the frame of a user's no_grad block)
        self._on_light_fail = on_light_fail
        self.thread = threading.get_ident()
        self.paused = False
        self.light_pushed = False
        self.outer_step = False
        self.step_depth = 0
        self.closed = False
        self.fast_path_stack: list[tuple[Any, bool, bool, bool]] = []

    # -- suspended ----------------------------------------------------------------------------
    @property
    def suspended(self) -> bool:
        return self.mode.suspended

    @suspended.setter
    def suspended(self, value: bool) -> None:
        self.mode.suspended = value

    # -- install ------------------------------------------------------------------------------
    def install(self, installed: Any) -> None:
        if self.full:
            self.mode.__enter__()
            installed.add(self._exit_full)
        else:
            _LIGHT_TARGET[0] = weakref.ref(self)
            installed.add(lambda: _LIGHT_TARGET.__setitem__(0, None))
            installed.replace_attribute(torch._C, "_set_grad_enabled", _light_set_grad_enabled)
            installed.add(self._exit_light)
            if not torch.is_grad_enabled():
                self._push_light()
        installed.add(self.close)

    def close(self) -> None:
        """The watch ends: the mode passes everything through from now on."""
        self.closed = True
        self.suspended = True

    def _exit_full(self) -> None:
        mode = self.mode
        if self.paused:
            return
        from torch.overrides import _get_current_function_mode_stack

        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)
        elif mode in stack:
            _remove_mode(mode)
            warnings.warn(_UNDER_USER_MODE, GradWatchWarning, stacklevel=3)

    # -- stepping aside -----------------------------------------------------------------------
    def pause(self) -> bool:
        """Step aside while library code whose effect is checked otherwise runs: full takes the
        mode off the stack, light puts torch's own grad-mode switch back. True if paused."""
        if self.paused or threading.get_ident() != self.thread:
            return False  # (the mode stack is per thread: only the watch's thread pauses it)
        if not self.full:
            if torch._C._set_grad_enabled is _light_set_grad_enabled:
                torch._C._set_grad_enabled = _original_set_grad_enabled
                self.paused = True
                return True
            return False
        if _stack_top() is self.mode:
            _pop_function_mode()  # hot: what the mode's __exit__ does, minus two Python calls
            self.paused = True
            return True
        return False

    def resume(self) -> bool:
        """Undo :meth:`pause` (after the library call, or if it raised: at the next hook)."""
        if not self.paused or threading.get_ident() != self.thread:
            return False
        self.paused = False
        if not self.closed:
            if self.full:
                _push_function_mode(self.mode)  # the mode's __enter__
            else:
                torch._C._set_grad_enabled = _light_set_grad_enabled
        return True

    def call_paused(self, call: Callable, args: tuple, kwargs: dict) -> Any:
        """``call`` with the mode stepped aside, put back after."""
        if self.pause():
            try:
                return call(*args, **kwargs)
            finally:
                self.resume()
        return call(*args, **kwargs)

    # -- grad mode switches -------------------------------------------------------------------
    def _no_grad_entered(self) -> None:
        """The mode saw grad mode switched off (full)."""
        self._on_no_grad(switch_frame(3))

    def grad_mode_switched(self, enabled: bool) -> None:
        """Light: grad mode was switched; push the mode while user code has it off."""
        if (self.suspended and not self.light_pushed) or threading.get_ident() != self.thread:
            return
        try:
            if not enabled:
                if not self.light_pushed and (self.step_depth or self._user_no_grad()):
                    self._on_no_grad(switch_frame(3))
                    self._push_light()
            elif self.light_pushed:
                self._pop_light()
        except Exception as exc:
            self._on_light_fail(exc)

    def _user_no_grad(self) -> bool:
        """Whether grad mode is being switched off by user code (a ``with torch.no_grad():``
        block, or a user function decorated with ``@torch.no_grad()``) rather than inside torch
        (``clip_grad_norm_``, optimizer internals): light watches only the former."""
        frame = switch_frame(3)
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "decorate_context" and code.co_filename == _CONTEXTLIB_FILE:
            func = frame.f_locals.get("func")  # the decorated function
            inner = getattr(inspect.unwrap(func), "__code__", None) if func is not None else None
            return inner is not None and not is_internal(inner)
        return not is_internal(code)

    def _push_light(self) -> None:
        if threading.get_ident() == self.thread:
            self.mode.__enter__()
            self.light_pushed = True

    def _pop_light(self) -> None:
        if _stack_top() is self.mode:
            self.mode.__exit__(None, None, None)
            self.light_pushed = False

    def _exit_light(self) -> None:
        if self.light_pushed:
            self._pop_light()
        if self.light_pushed and _remove_mode(self.mode):  # under a mode of the user's
            self.light_pushed = False
            warnings.warn(_UNDER_USER_MODE, GradWatchWarning, stacklevel=3)

    # -- the fused inference path of attention modules ----------------------------------------
    def fast_path_enter(self, module: torch.nn.Module) -> bool:
        """An attention/encoder module in eval mode starts its forward: step aside. True if the
        gate stepped aside (then :meth:`fast_path_exit` must follow)."""
        if self.closed:
            return False
        paused = self.pause()  # full: the mode off the stack; light: torch's own switch
        popped = (not self.full and self.light_pushed
                  and threading.get_ident() == self.thread and _stack_top() is self.mode)
        if popped:  # light, inside the user's no_grad block
            _pop_function_mode()
        if paused or popped:
            self.fast_path_stack.append((module, paused, popped, self.suspended))
            self.suspended = True
            return True
        return False

    def fast_path_exit(self, module: torch.nn.Module) -> None:
        stack = self.fast_path_stack
        if not stack or stack[-1][0] is not module:
            return
        _, paused, popped, suspended = stack.pop()
        self.suspended = suspended
        if popped and not self.closed:
            _push_function_mode(self.mode)
        if paused:
            self.resume()
