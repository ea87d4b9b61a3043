"""Qualified names for tensors, held weakly: parameters, buffers, ``.grad`` and optimizer state."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import torch

from ._location import user_frame

__all__ = ["TensorNames", "describe", "storage_key", "var_name"]

# On Python < 3.13, reading a function frame's ``f_locals`` stores a snapshot dict on the frame
# that holds every local until the frame ends (a pending graph's output would look alive for
# the whole loop); it is emptied after reading. From 3.13 on, ``f_locals`` is a live proxy.
_SNAPSHOT_LOCALS = sys.version_info < (3, 13)


def storage_key(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (shared by views and ``.data`` aliases), or None."""
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # sparse, meta-less subclasses, functional tensors...
        return None


def _bound_names(frame: FrameType) -> Iterator[tuple[str, Any]]:
    """(name, value) bound in a user frame: its locals, then its globals."""
    if frame.f_code.co_name != "<module>":
        local = frame.f_locals
        items = list(local.items())
        if _SNAPSHOT_LOCALS and type(local) is dict:
            local.clear()  # (refreshed from the frame whenever anyone reads it again)
        yield from items
        del items
    yield from list(frame.f_globals.items())


def var_name(frame: FrameType | None, obj: object) -> str | None:
    """The name a user frame binds to ``obj`` itself (``is``): a local, else a global; names
    starting with ``_`` are skipped. Holds nothing once it returns; costs one pass over the
    frame's names (call it once per object, when it is first seen)."""
    if frame is None:
        return None
    try:
        for name, value in _bound_names(frame):
            if value is obj and not name.startswith("_") and name.isidentifier():
                return name
    except Exception:
        return None
    return None


def describe(t: torch.Tensor) -> str:
    """A short description of an unnamed tensor, e.g. ``"tensor float32[3]"``."""
    dtype = str(t.dtype).replace("torch.", "")
    shape = ",".join(str(s) for s in t.shape)
    return f"tensor {dtype}[{shape}]"


class TensorNames:
    """Maps tensors to qualified names by storage, holding only weak references."""

    def __init__(self) -> None:
        # storage address -> (name, weakref to the named tensor)
        self._by_storage: dict[int, tuple[str, weakref.ref]] = {}
        self._params: dict[int, tuple[str, weakref.ref]] = {}  # id(param) -> (name, ref)
        self._known_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._n_optimizers = 0
        # ids of parameters named after an optimizer or not named: a module's name replaces these
        self._provisional: set[int] = set()
        # roots added without a prefix (the first model): prefixed by their variable name when
        # a second model brings parameters, as long as no name was handed out yet
        self._unprefixed: list[weakref.ref[torch.nn.Module]] = []
        self._published = False

    # -- registration -------------------------------------------------------------------------
    def add_module(self, module: torch.nn.Module, prefix: str = "") -> list[torch.nn.Parameter]:
        """Name every parameter and buffer of ``module``; return the newly seen parameters."""
        if prefix and prefix == f"{type(module).__name__}.":  # (discovery's fallback)
            var = var_name(user_frame(2), module)  # a function's local, which it does not read
            prefix = f"{var}." if var else prefix
        new: list[torch.nn.Parameter] = []
        renamed = 0
        for sub in module.modules():
            self._known_modules.add(sub)
        for name, p in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=True):
            entry = self._params.get(id(p))
            if entry is None or entry[1]() is not p:  # unseen (or a dead tensor's reused id)
                new.append(p)
                self._add(name, p, param=True)
                self._provisional.discard(id(p))
            elif id(p) in self._provisional:
                self._provisional.discard(id(p))
                self._rename(name, p)
                renamed += 1
        for name, b in module.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=True):
            self._add(name, b)
        if not prefix:
            self._unprefixed.append(weakref.ref(module))
        elif (new or renamed) and not self._published:
            self._prefix_earlier_roots()
        return new

    def _prefix_earlier_roots(self) -> None:
        """A second model came with its prefix (``D.``): give the models added without one
        theirs (``G.``: the variable the user's frame binds it to, else its class name), so
        that both models' tensors are named alike."""
        roots, self._unprefixed = self._unprefixed, []
        frame = user_frame(2)
        for ref in roots:
            module = ref()
            if module is None:
                continue
            var = var_name(frame, module) or type(module).__name__
            for name, p in module.named_parameters(prefix=var, remove_duplicate=True):
                entry = self._params.get(id(p))
                if entry is not None and entry[1]() is p and id(p) not in self._provisional:
                    self._rename(name, p)
            for name, b in module.named_buffers(prefix=var, remove_duplicate=True):
                key = storage_key(b)
                entry = self._by_storage.get(key) if key is not None else None
                if entry is not None and entry[1]() is b:
                    self._by_storage[key] = (name, entry[1])  # type: ignore[index]

    def has_roots(self) -> bool:
        return len(self._known_modules) > 0

    def knows_module(self, module: torch.nn.Module) -> bool:
        return module in self._known_modules

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Name the optimizer's unnamed parameters; return parameters not seen before."""
        index = self._n_optimizers
        self._n_optimizers += 1
        new: list[torch.Tensor] = []
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in self._params:
                    new.append(p)
                    self._add(f"optimizer{index}.param_groups[{g}][{i}]", p, param=True)
                    self._provisional.add(id(p))
        return new

    def add_leaf(self, t: torch.Tensor) -> None:
        """Remember a plain leaf tensor: writes through its aliases are then tracked. It is
        named by the variable the user's frame binds it to (``a``), if any; a module's name
        replaces that later."""
        if id(t) not in self._params:
            name = var_name(user_frame(2), t)
            ref = weakref.ref(t)
            self._params[id(t)] = (name, ref)  # type: ignore[assignment]
            self._provisional.add(id(t))
            key = storage_key(t)
            if key is not None and key not in self._by_storage:
                self._by_storage[key] = (name, ref)  # type: ignore[assignment]

    def add_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for p, state in list(optimizer.state.items()):
            if not isinstance(p, torch.Tensor):
                continue
            base = self.name_of(p)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    self._add(f"{base}.{key}", value)

    def _add(self, name: str, t: torch.Tensor, *, param: bool = False) -> None:
        ref = weakref.ref(t)
        if param:
            self._params[id(t)] = (name, ref)
        key = storage_key(t)
        if key is not None and key not in self._by_storage:
            self._by_storage[key] = (name, ref)

    def _rename(self, name: str, p: torch.Tensor) -> None:
        """Give a provisionally named parameter (and its storage) its module name."""
        old = self._params[id(p)][0]
        ref = weakref.ref(p)
        self._params[id(p)] = (name, ref)
        key = storage_key(p)
        entry = self._by_storage.get(key) if key is not None else None
        if key is not None and (entry is None or entry[0] == old):
            self._by_storage[key] = (name, ref)

    # -- lookup -------------------------------------------------------------------------------
    def params(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, ref in list(self._params.values()):
            p = ref()
            if p is not None and name is not None:
                yield name, p

    def owner_of_storage(self, key: int | None) -> torch.Tensor | None:
        """The live named tensor whose storage is ``key`` (a ``.data`` alias's parameter)."""
        entry = self._by_storage.get(key) if key is not None else None
        owner = entry[1]() if entry is not None else None
        return owner if owner is not None and storage_key(owner) == key else None

    def has_storage(self, key: int | None) -> bool:
        """Whether ``key`` is the storage of a live named tensor (a freed storage's address is
        reused by the allocator: a stale entry is dropped, not matched)."""
        if key is None:
            return False
        entry = self._by_storage.get(key)
        if entry is None:
            return False
        owner = entry[1]()
        if owner is not None and storage_key(owner) == key:
            return True
        del self._by_storage[key]
        return False

    def storage_requires_grad(self, key: int) -> bool:
        """Whether the live tensor named for storage ``key`` requires grad (a parameter)."""
        entry = self._by_storage.get(key)
        owner = entry[1]() if entry is not None else None
        return owner is not None and owner.requires_grad

    # Until a name is first handed out, the three lookups below go through ``_publishing``,
    # which notes it and then rebinds them on the instance to the plain methods (no cost after).
    def param_name(self, p: torch.Tensor) -> str | None:
        return self._publishing("param_name", self._param_name(p))

    def lookup(self, t: torch.Tensor, key: int | None = None) -> str | None:
        return self._publishing("lookup", self._lookup(t, key))

    def name_of(self, t: torch.Tensor, key: int | None = None) -> str:
        name = self._name_of(t, key)
        return self._publishing("name_of", name, name != describe(t))  # type: ignore[return-value]

    def _publishing(self, method: str, name: str | None, named: bool | None = None) -> str | None:
        if name is not None and (named is None or named):
            self._published = True  # names are in events now: models are no longer renamed
            self.param_name = self._param_name  # type: ignore[method-assign]
            self.lookup = self._lookup  # type: ignore[method-assign]
            self.name_of = self._name_of  # type: ignore[method-assign]
        return name

    def _param_name(self, p: torch.Tensor) -> str | None:
        entry = self._params.get(id(p))
        if entry is not None and entry[1]() is p:
            return entry[0]
        return None

    def _lookup(self, t: torch.Tensor, key: int | None = None) -> str | None:
        """The qualified name of ``t`` or of the named tensor its storage belongs to (views,
        ``.data``); None when unnamed. Dictionary lookups only."""
        name = self._param_name(t)
        if name is not None:
            return name
        if key is None:
            key = storage_key(t)
        entry = self._by_storage.get(key) if key is not None else None
        if entry is not None:
            owner = entry[1]()
            if owner is not None:
                return entry[0]
        return None

    def _name_of(self, t: torch.Tensor, key: int | None = None) -> str:
        """Qualified name of ``t`` (or of the tensor whose storage it aliases), else a description."""
        name = self._param_name(t)
        if name is not None:
            return name
        if key is None:
            key = storage_key(t)
        if key is not None:
            entry = self._by_storage.get(key)
            if entry is not None:
                owner = entry[1]()
                if owner is not None and storage_key(owner) == key:
                    return entry[0] or describe(t)
                del self._by_storage[key]
            grad_name = self._grad_name(key)
            if grad_name is not None:
                return grad_name
        return describe(t)

    def _grad_name(self, key: int) -> str | None:
        for name, ref in list(self._params.values()):
            p = ref()
            if name is None:
                continue
            g = None if p is None else p.grad
            if g is not None and storage_key(g) == key:
                return f"{name}.grad"
        return None

    def prune(self) -> None:
        """Drop entries whose tensors died."""
        for key, (_, ref) in list(self._by_storage.items()):
            if ref() is None:
                del self._by_storage[key]
        for key, (_, ref) in list(self._params.items()):
            if ref() is None:
                del self._params[key]
                self._provisional.discard(key)

