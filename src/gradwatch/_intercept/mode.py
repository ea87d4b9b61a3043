"""The private function mode. Its only job: classify (memoised), return early, hand the rare
interesting call to the session. No strings, no names, no syncs here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from .ops import ACTIONS, Action, classify

if TYPE_CHECKING:
    from ..watch import Watch

__all__ = ["WatchMode"]

_PASS = Action.PASS
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled

try:
    from torch._dynamo.external_utils import is_compiling as _is_compiling
except Exception:  # pragma: no cover - older torch
    _is_compiling = torch.compiler.is_compiling


class WatchMode(TorchFunctionMode):
    """Sees every torch call while active; forwards in-place writes and cuts to the session."""

    def __init__(self, session: Watch) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if kwargs is None:
            kwargs = {}
        action = ACTIONS.get(func)
        if action is None:
            action = classify(func)
        s = self.session
        if s.suspended or _is_compiling():
            return func(*args, **kwargs)
        if action is _PASS:
            if kwargs and ("out" in kwargs or kwargs.get("inplace") is True):
                return s.on_out_or_inplace_kwarg(func, args, kwargs)
            if func is _set_grad_enabled:
                if args and args[0] is False:
                    s.on_no_grad_entered()
                return func(*args, **kwargs)
            if not _grad_enabled():
                return s.on_no_grad_op(func, args, kwargs)
            return func(*args, **kwargs)
        return s.on_action(action, func, args, kwargs)
