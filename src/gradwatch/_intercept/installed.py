"""Everything gradwatch installs outside the function mode, each with its undo.

Global optimizer step hooks, a global module forward pre-hook (naming without a ``model``),
a ``saved_tensors_hooks`` pair, and thin wrappers (wrapt) around ``torch.autograd.backward``/
``grad``, ``zero_grad`` and the gradient-clipping functions. ``Installed.undo()`` removes all
of it, in reverse order, whatever happened.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import wrapt

__all__ = ["Installed"]

_autograd_c = torch._C._autograd


class Installed:
    """A stack of undo callables."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def undo(self) -> None:
        """Undo everything, newest first. A step that fails is warned about; an interrupt
        (a second Ctrl-C while closing) does not stop the others: it is re-raised at the end."""
        interrupt: BaseException | None = None
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # never let cleanup break the user's program
                warnings.warn(f"gradwatch: cleanup step failed: {exc!r}", RuntimeWarning, stacklevel=2)
            except BaseException as exc:  # KeyboardInterrupt, SystemExit
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt

    # -- global hooks -------------------------------------------------------------------------
    def optimizer_hooks(self, pre: Callable, post: Callable) -> None:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        h1 = register_optimizer_step_pre_hook(pre)
        self.add(h1.remove)
        h2 = register_optimizer_step_post_hook(post)
        self.add(h2.remove)

    def module_forward_pre_hook(self, hook: Callable) -> Any:
        h = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        self.add(h.remove)
        return h

    # -- wrappers -----------------------------------------------------------------------------
    def wrap_attribute(self, owner: Any, name: str, wrapper: Callable) -> None:
        """Replace ``owner.name`` by a wrapt ``FunctionWrapper``; restore the original on undo."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def restore() -> None:
            setattr(owner, name, original)

        self.add(restore)  # (first: an interrupt between the two leaves nothing behind)
        setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))

    def replace_attribute(self, owner: Any, name: str, value: Any) -> None:
        original = getattr(owner, name)
        self.add(lambda: setattr(owner, name, original))
        setattr(owner, name, value)

    # -- saved tensors ------------------------------------------------------------------------
    def saved_tensors_hooks(self, pack: Callable, unpack: Callable) -> bool:
        """Push the pair unless the user already has one active (theirs must keep working)."""
        if _autograd_c._top_saved_tensors_default_hooks(False) is not None:
            return False
        if not _autograd_c._saved_tensors_hooks_is_enabled():
            return False
        _autograd_c._push_saved_tensors_default_hooks(pack, unpack)

        def pop() -> None:
            top = _autograd_c._top_saved_tensors_default_hooks(False)
            if top is not None and top[0] is pack:
                _autograd_c._pop_saved_tensors_default_hooks()

        self.add(pop)

        # torch.func transforms refuse to run while any pair is registered: step aside for them.
        original = torch.autograd.graph.disable_saved_tensors_hooks

        @contextlib.contextmanager
        def disable_saved_tensors_hooks(error_message: str):  # type: ignore[no-untyped-def]
            top = _autograd_c._top_saved_tensors_default_hooks(False)
            ours = top is not None and top[0] is pack
            if ours:
                _autograd_c._pop_saved_tensors_default_hooks()
            try:
                with original(error_message):
                    yield
            finally:
                if ours:
                    _autograd_c._push_saved_tensors_default_hooks(pack, unpack)

        self.replace_attribute(torch.autograd.graph, "disable_saved_tensors_hooks",
                               disable_saved_tensors_hooks)
        return True
