"""The private function mode. Its only job: classify (memoised), return early, hand the rare
interesting call to the session. No strings, no names, no syncs here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from ..errors import AnomalyError
from .ops import ACTIONS, Action, classify

if TYPE_CHECKING:
    from ..session import Watch

__all__ = ["WatchMode"]

_PASS = Action.PASS
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled

# torch.compiler.is_compiling() is two Python calls (it asks TorchScript first); per op, ask
# dynamo directly (it folds this call to True while tracing) and read export's flag.
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


class WatchMode(TorchFunctionMode):
    """Sees every torch call while active. Calls ``func`` exactly once; around the rare
    interesting call it asks the session for ``before`` work and hands the result to ``after``.
    A failure in either is the session's to report: the user's op always runs."""

    def __init__(self, session: Watch) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if kwargs is None:
            kwargs = {}
        s = self.session
        if s.suspended or _dynamo_compiling() or _compiler._is_compiling_flag:
            # first: dynamo (or export) must trace nothing of ours
            return func(*args, **kwargs)
        action = ACTIONS.get(func)
        if action is None:
            action = classify(func)
        if action is _PASS:
            if kwargs and ("out" in kwargs or kwargs.get("inplace") is True):
                action = Action.KWARG_WRITE
            elif func is _set_grad_enabled:
                if args and args[0] is False:
                    s.on_no_grad_entered()
                return func(*args, **kwargs)
            elif not _grad_enabled():
                action = Action.NO_GRAD_OP
            else:
                return func(*args, **kwargs)
        try:
            pre = s.before(action, func, args, kwargs)
        except AnomalyError:
            raise
        except Exception as exc:
            s.mode_failed(exc)
            pre = None
        out = func(*args, **kwargs)
        if pre is not None:
            try:
                s.after(pre, out)
            except AnomalyError:
                raise
            except Exception as exc:
                s.mode_failed(exc)
        return out
