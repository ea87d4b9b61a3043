"""The private function mode. Its only job: classify (memoised), return early, hand the rare
interesting call to its handler. No strings, no names, no syncs here.

``handlers[action](func, args, kwargs)`` runs before the op; it returns None or a pair
``(after, state)``, and ``after(state, out)`` runs once the op returned. Whether the mode looks
at all is the gate's business (:mod:`.gate` writes ``suspended``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .._location import without_own_frames
from ..errors import AnomalyError
from .ops import ACTIONS, Action, classify

__all__ = ["Handler", "WatchMode"]

Handler = Callable[[Any, tuple, dict], Any]

_PASS = Action.PASS
_KWARG_WRITE = Action.KWARG_WRITE
_NO_GRAD_OP = Action.NO_GRAD_OP
_grad_enabled = torch.is_grad_enabled
_DisableTorchFunction = torch._C.DisableTorchFunction
_set_grad_enabled = torch._C._set_grad_enabled

# torch.compiler.is_compiling() is two Python calls (it asks TorchScript first); per op, ask
# dynamo directly (it folds this call to True while tracing) and read export's flag.
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


def _nothing(*_: Any) -> None:
    return None


class WatchMode(TorchFunctionMode):
    """Sees every torch call while active. Calls ``func`` exactly once; a handler's failure is
    handed to ``on_fail``: the user's op always runs."""

    def __init__(self) -> None:
        super().__init__()
        self.suspended = True  # pass everything through (written by the gate only)
        self.handlers: list[Handler] = [_nothing] * Action.COUNT
        self.on_no_grad: Callable[[], None] = _nothing  # user code switched grad mode off
        self.on_fail: Callable[[BaseException], None] = _nothing

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        try:  # (free unless something raises: then no frame of gradwatch's below this one)
            if kwargs is None:
                kwargs = {}
            # hot: the suspended/compile check first (dynamo, or export, must trace nothing of ours)
            if self.suspended or _dynamo_compiling() or _compiler._is_compiling_flag:
                return func(*args, **kwargs)
            try:  # the classification is ours: if it fails, the op runs unlooked at
                try:
                    action = ACTIONS.get(func)  # hot: memoised classification, identity tests
                except TypeError:  # an unhashable callable (a user's object): classified per call
                    action = None
                if action is None:
                    action = classify(func)
                if action is _PASS:
                    if kwargs and ("out" in kwargs or kwargs.get("inplace") is True):
                        action = _KWARG_WRITE
                    elif func is _set_grad_enabled:
                        if args and args[0] is False:
                            self.on_no_grad()
                    elif not _grad_enabled():
                        action = _NO_GRAD_OP
            except Exception as exc:
                self.on_fail(exc)
                action = _PASS
            if action is _PASS:
                return func(*args, **kwargs)
            try:
                with _DisableTorchFunction():  # our own reads: no mode below ours sees them
                    pre = self.handlers[action](func, args, kwargs)
            except AnomalyError as exc:
                try:
                    exc = exc.with_traceback(without_own_frames(exc.__traceback__))
                except Exception:
                    pass
                raise exc
            except Exception as exc:
                self.on_fail(exc)
                pre = None
            out = func(*args, **kwargs)
            if pre is not None:
                try:
                    with _DisableTorchFunction():
                        pre[0](pre[1], out)
                except AnomalyError:
                    raise
                except Exception as exc:
                    self.on_fail(exc)
            return out
        except BaseException as exc:
            try:  # (never replace the exception passing through by one of ours)
                if (func is _set_grad_enabled and args and args[0] is True
                        and isinstance(exc, KeyboardInterrupt) and not _grad_enabled()):
                    # a Ctrl-C in our code before a block's exit put grad mode back: its exit
                    # never runs again, so the switch happens as if the Ctrl-C came after it
                    func(*args)
                exc = exc.with_traceback(without_own_frames(exc.__traceback__))
            except Exception:
                pass
            raise exc
