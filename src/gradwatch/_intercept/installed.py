"""Everything gradwatch installs outside the function mode, each with its undo.

Global optimizer step hooks, a global module forward pre-hook (naming without a ``model``),
a ``saved_tensors_hooks`` pair, and thin wrappers (wrapt) around ``torch.autograd.backward``/
``grad``, ``zero_grad`` and the gradient-clipping functions, and until ``torch._dynamo`` is
imported a one-shot meta path finder that waits for it (``after_import``).
``Installed.undo()`` removes all of it, in reverse order, whatever happened.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.modules.module as _module
import wrapt
from torch.optim import optimizer as _optimizer
from torch.utils.hooks import RemovableHandle

from .._failopen import warn_internal

__all__ = ["Installed"]

_autograd_c = torch._C._autograd


class Installed:
    """A stack of undo callables."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def undo(self) -> None:
        """Undo everything, newest first. Every step is idempotent: one that fails is run once
        more, then reported (a ``GradWatchWarning``, once) and dropped; one that an interrupt (a
        second Ctrl-C while closing) cut short stays on the stack and runs once more, and the
        others run too: the interrupt is re-raised at the end."""
        interrupt: BaseException | None = None
        warned = False
        tries = 0
        while True:
            try:
                while self._undo:
                    fn = self._undo[-1]  # (popped once it ran: an interrupt keeps it here)
                    try:
                        fn()
                    except Exception as exc:  # never let cleanup break the user's program
                        try:
                            fn()
                        except Exception:
                            if not warned:
                                warned = True
                                warn_internal("cleanup", exc, consequence=(
                                    "a step of the watch's cleanup failed twice and was skipped"))
                    self._undo.pop()
                    tries = 0
                break
            except BaseException as exc:  # KeyboardInterrupt, SystemExit
                interrupt = interrupt or exc
                tries += 1
                if tries > 1:  # (a step interrupted again when run once more: given up)
                    if self._undo:
                        self._undo.pop()
                    tries = 0
        if interrupt is not None:
            raise interrupt

    # -- global hooks -------------------------------------------------------------------------
    def _global_hook(self, hooks: Any, register: Callable[[Callable], Any],
                     hook: Callable) -> Any:
        """Register ``hook`` in one of torch's global hook dicts, its removal pushed first (an
        interrupt between the two leaves nothing behind): what torch's ``register_*`` does."""
        if not isinstance(hooks, dict):  # (a torch without the dict: its public function)
            h = register(hook)
            self.add(h.remove)
            return h
        handle = RemovableHandle(hooks)
        self.add(handle.remove)
        hooks[handle.id] = hook
        return handle

    def optimizer_hooks(self, pre: Callable, post: Callable) -> tuple[Any, Any]:
        """The global optimizer step pre/post hooks; their handles (see :meth:`replace_hook`)."""
        return (self._global_hook(getattr(_optimizer, "_global_optimizer_pre_hooks", None),
                                  _optimizer.register_optimizer_step_pre_hook, pre),
                self._global_hook(getattr(_optimizer, "_global_optimizer_post_hooks", None),
                                  _optimizer.register_optimizer_step_post_hook, post))

    @staticmethod
    def replace_hook(handle: Any, hook: Callable) -> None:
        """Put ``hook`` where ``handle``'s hook is, in place: its removal stays as it was."""
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            hooks[handle.id] = hook

    def after_import(self, name: str, callback: Callable[[], None]) -> None:
        """``callback()`` once module ``name`` has been imported: now if it is, else right after
        its import (a one-shot finder first in ``sys.meta_path``, removed on undo)."""
        if name in sys.modules:
            callback()
            return
        finder = _AfterImport(name, callback)
        self.add(finder.remove)  # (first, as every undo)
        sys.meta_path.insert(0, finder)

    def module_forward_pre_hook(self, hook: Callable) -> Any:
        return self._global_hook(getattr(_module, "_global_forward_pre_hooks", None),
                                 _module.register_module_forward_pre_hook, hook)

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
        self.add(lambda: setattr(owner, name, original))  # (first, as above)
        setattr(owner, name, value)

    # -- saved tensors ------------------------------------------------------------------------
    def saved_tensors_hooks(self, pack: Callable, unpack: Callable) -> bool:
        """Push the pair unless the user already has one active (theirs must keep working)."""
        if _autograd_c._top_saved_tensors_default_hooks(False) is not None:
            return False
        if not _autograd_c._saved_tensors_hooks_is_enabled():
            return False

        def pop() -> None:
            top = _autograd_c._top_saved_tensors_default_hooks(False)
            if top is not None and top[0] is pack:
                _autograd_c._pop_saved_tensors_default_hooks()

        self.add(pop)  # (first: an interrupt between the two leaves nothing behind)
        _autograd_c._push_saved_tensors_default_hooks(pack, unpack)

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


class _AfterImport:
    """A meta path finder for one module: it finds the module's spec with the other finders and
    has that spec's loader call ``callback`` once the module has run, then takes itself out
    (or on undo). It finds nothing itself; a spec asked for without an import (``find_spec``)
    leaves it waiting for the real import."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback: Callable[[], None] | None = callback

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)

    def _ran(self) -> None:
        self.remove()
        callback, self.callback = self.callback, None
        if callback is None:
            return
        try:
            callback()
        except Exception as exc:  # (never fail the user's import)
            warn_internal("import hook", exc, consequence=(
                "a compiled optimizer step may not be seen"))

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name or self.callback is None:
            return None
        try:
            spec = next((found for finder in list(sys.meta_path) if finder is not self
                         and (find := getattr(finder, "find_spec", None)) is not None
                         and (found := find(fullname, path, target)) is not None), None)
            loader = spec.loader if spec is not None else None
            run = getattr(loader, "exec_module", None)
            if run is None:
                return spec
            ran = self._ran

            def exec_module(module: Any) -> None:
                run(module)
                ran()

            loader.exec_module = exec_module  # (this spec's own loader object)
            return spec
        except Exception:  # let the import system find it as if we were not here
            return None
