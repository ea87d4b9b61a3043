"""The saved-tensor registry behind ``saved_tensor_mutated`` (see :mod:`.saved_tensor`).

A weak registry of saved tensors, filled by a ``saved_tensors_hooks`` pair, is keyed by storage
so that writes through views and ``.data`` aliases are caught at the mutating line. Registering
hooks switches off torch's own saved-version check, so ``unpack`` repeats it. Without the hooks
(``level="light"``, or hooks of the user's already active) torch's own error is annotated from a
bounded log of recent mutations.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch

from .._location import location_of

__all__ = ["Mutation", "SavedTensorRegistry", "note_text", "numel", "parse_version_error",
           "torch_wording"]

_ref = weakref.ref
_SWEEP_EVERY = 4096  # packs between sweeps when no backward pass comes

_VERSION_ERROR = re.compile(
    r"modified by an inplace operation: \[(?P<type>[\w.]+) \[(?P<shape>[\d, ]*)\]\].*?"
    r"is at version (?P<now>\d+); expected version (?P<expected>\d+)",
    re.S,
)

HINT = (
    "compute the loss again after this in-place update (or call backward before it); "
    "for a value you only read, use a clone: x = x.clone()"
)
HINT_STEP = (
    "call backward on every loss that uses these weights before this optimizer step changes "
    "them (e.g. compute the generator's loss after the discriminator's step, or step after all "
    "backward passes), or compute that loss again after the step"
)
HINT_GRAD = (
    "use the out-of-place form (y = x * s instead of x *= s; inplace=False) for a tensor the "
    "graph still needs"
)


def hint_for(op: str, grad_mode: str = "no_grad") -> str:
    """The fix for a write into a saved tensor, by what wrote it."""
    if op == "optimizer.step":
        return HINT_STEP
    if grad_mode == "enabled":
        return HINT_GRAD
    return HINT


@dataclass(frozen=True)
class Mutation:
    """One in-place write, remembered (without the tensor) to explain a later version error."""

    name: str
    shape: tuple[int, ...]
    version_before: int | None
    version_after: int | None
    op: str
    where: tuple[CodeType, int] | None
    step: int

    def describe(self) -> str:
        loc = location_of(self.where)
        place = f"{loc} (`{loc.code}`)" if loc else "an unknown line"
        versions = ""
        if self.version_before is not None and self.version_after is not None:
            versions = f", version {self.version_before} → {self.version_after}"
        return f"`{self.name}` was modified in place by {self.op} at {place}{versions}"


class _Saved:  # hot: slotted, one per saved tensor
    """What the pack hook returns: a detached alias (shares the version counter) + its version."""

    __slots__ = ("__weakref__", "alias", "key", "mutated_by", "node", "output_nr", "renamed",
                 "seq", "used", "version")


class _VIEW:
    """Marks a saved view in ``_Saved.node`` (torch regenerates a changed view's node)."""


def parse_version_error(message: str) -> tuple[tuple[int, ...], int, int] | None:
    m = _VERSION_ERROR.search(message)
    if m is None:
        return None
    shape = tuple(int(s) for s in m.group("shape").replace(" ", "").split(",") if s)
    return shape, int(m.group("now")), int(m.group("expected"))


class SavedTensorRegistry:
    """Saved tensors of pending graphs by storage address; weak, so freed graphs vanish. The
    references of freed graphs are dropped by :meth:`sweep` (after each backward pass, at step
    ends, and every ``_SWEEP_EVERY`` packs), not by a callback per saved tensor."""

    def __init__(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._by_storage: dict[int, list[weakref.ref[_Saved]]] = {}
        # pack/unpack are torch's hooks themselves (no wrapper layer per saved tensor): an
        # internal error is handed to on_error once and the hooks pass tensors through after it
        self.off = False
        self.on_error = on_error
        self._packed = 0  # since the last sweep
        # The autograd engine re-creates exceptions raised in hooks: remember the culprit here.
        self.last_failure: Mutation | None = None
        self.last_failure_key: int | None = None  # the storage of the tensor that failed
        # writes whose saved tensor a backward used although torch saw no version change
        self.used_after_write: list[Mutation] = []

    def __bool__(self) -> bool:
        return bool(self._by_storage)

    # -- the saved_tensors_hooks pair ----------------------------------------------------------
    def pack(self, t: torch.Tensor) -> Any:
        if self.off:
            return t
        try:
            return self._pack(t)
        except Exception as exc:
            self._failed(exc)
            return t

    def _pack(self, t: torch.Tensor) -> Any:
        try:
            version = t._version
            key = t.untyped_storage().data_ptr()
        except Exception:  # no version counter or no storage: keep torch's behaviour
            return t
        s = _Saved()
        # An alias sharing t's version counter; detached only when t has a grad_fn (an output
        # saved by its own node would otherwise make a cycle). Leaves (parameters, inputs) are
        # kept as they are, as torch itself keeps them.
        if t.is_leaf:
            s.alias = t
            s.node = None
        else:
            s.alias = t.detach()
            # for the error text only (torch names the tensor's node): the class and sequence
            # number, never the node itself
            fn = t.grad_fn
            s.node = _VIEW if t._is_view() else type(fn)
            s.seq = fn._sequence_nr()
            s.output_nr = t.output_nr
            s.renamed = None
        s.version = version
        s.used = False
        s.key = key
        s.mutated_by = None
        refs = self._by_storage.get(key)
        if refs is None:
            self._by_storage[key] = [_ref(s)]
        else:
            refs.append(_ref(s))
        self._packed += 1
        if self._packed >= _SWEEP_EVERY:  # graphs built and dropped without a backward pass
            self.sweep()
        return s

    def unpack(self, s: Any) -> torch.Tensor:
        """torch's check, repeated: the saved tensor must be at the version it was saved at.
        Runs also after the watch closed (for graphs packed while it ran)."""
        if type(s) is not _Saved:
            return s
        alias = s.alias
        if self.off:
            return alias
        try:  # (ours: an error here hands the saved tensor back, as torch would)
            s.used = True
            if alias._version == s.version:
                if s.mutated_by is not None:  # written through an alias torch cannot see (.data)
                    self.used_after_write.append(s.mutated_by)
                return alias
            self.last_failure = s.mutated_by
            self.last_failure_key = s.key
        except Exception as exc:
            self._failed(exc)
            return alias
        try:
            error = _version_error(alias, s)
        except Exception as exc:  # torch's check still holds, in fewer words
            self._failed(exc)
            error = RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: is at version {alias._version}; expected version "
                f"{s.version} instead.")
        try:
            raise error
        finally:  # no cycle error -> traceback -> this frame: the failed graph is freed at once
            del error

    def _failed(self, exc: BaseException) -> None:
        self.off = True
        if self.on_error is not None:
            self.on_error(exc)

    def sweep_if_packed(self) -> None:
        """:meth:`sweep`, if anything was packed since the last one (a backward pass's end and
        the step's end follow each other: the second finds nothing new to drop)."""
        if self._packed:
            self.sweep()

    def sweep(self) -> None:
        """Drop the references whose saved tensor is gone (its graph was used or freed)."""
        self._packed = 0
        by_storage = self._by_storage
        if not by_storage:
            return
        dead = []
        for key, refs in by_storage.items():
            if len(refs) == 1:  # the usual entry: one saved tensor on its storage
                if refs[0]() is None:
                    dead.append(key)
                continue
            live = [r for r in refs if r() is not None]
            if not live:
                dead.append(key)
            elif len(live) != len(refs):
                refs[:] = live
        for key in dead:
            del by_storage[key]

    # -- queries ------------------------------------------------------------------------------
    def pending(self, key: int | None) -> list[_Saved] | None:
        """Intact saved tensors on this storage whose graph no backward has used yet."""
        if key is None:
            return None
        refs = self._by_storage.get(key)
        if not refs:
            return None
        found = None
        for ref in refs:
            s = ref()
            if s is not None and not s.used and s.alias._version == s.version:
                if found is None:
                    found = [s]
                else:
                    found.append(s)
        return found

    def mark(self, saved: list[_Saved], mutation: Mutation, written: torch.Tensor | None = None
             ) -> None:
        """Remember who mutated them so the unpack error can name it. ``written``: the tensor
        after an in-place op under grad, which gave it a new node (torch's error names that)."""
        node = None
        if written is not None and not written._is_view():
            fn = written.grad_fn
            node = type(fn) if fn is not None else None
        for s in saved:
            if s.mutated_by is None:
                s.mutated_by = mutation
            if node is not None and s.node is not None and s.alias.shape == written.shape:
                s.renamed = (node, written.output_nr)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _version_error(alias: torch.Tensor, s: _Saved) -> RuntimeError:
    """torch's own version error, word for word (torch skips its check while saved-tensor
    hooks are registered, so ``unpack`` raises it in torch's place)."""
    kind = f"{alias.type()}" if alias.device.type != "meta" else "torch.Tensor"
    shape = ", ".join(str(d) for d in alias.shape)
    node = ""
    if s.node is not None:
        saved_as, nr = s.node, s.output_nr
        # torch names a saved input's grad_fn as it is now (an in-place op under grad rebases
        # it) but a node's own saved output by that node: the one unpacking it now
        if s.renamed is not None:
            unpacking = torch._C._current_autograd_node()
            if unpacking is None or unpacking._sequence_nr() != s.seq:
                saved_as, nr = s.renamed
        if saved_as is _VIEW and not torch._C._is_view_replay_enabled():
            name = "AsStridedBackward0"  # a view whose base changed gets a regenerated node
        else:
            name = saved_as.__name__
        node = f", which is output {nr} of {_node_name(name)},"
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: [{kind} [{shape}]]{node} is at version {alias._version}; expected version "
        f"{s.version} instead.{torch_wording()[1]}"
    )


_WORDING: list[tuple[bool, str]] = []


def torch_wording() -> tuple[bool, str]:
    """(whether torch names nodes without their ``Backward0`` suffix, the hint after
    "instead."), read once from an error torch raises itself (call it before registering
    saved-tensor hooks: torch checks versions only without them); a fixed text if it cannot."""
    if not _WORDING:
        strip, hint = False, (" Hint: enable anomaly detection to find the operation that failed "
                              "to compute its gradient, with torch.autograd.set_detect_anomaly(True).")
        try:
            with torch.enable_grad(), torch._C.DisableTorchFunction():
                top = torch._C._autograd._top_saved_tensors_default_hooks(False)
                if top is None:  # torch checks versions only while no hooks are registered
                    out = (torch.ones(1, requires_grad=True) * 2).exp()
                    out.add_(1)
                    try:
                        out.backward()
                    except RuntimeError as exc:
                        text = str(exc)
                        strip = "of ExpBackward" not in text
                        hint = text[text.index(" instead.") + len(" instead."):]
        except Exception:
            pass
        _WORDING.append((strip, hint))
    return _WORDING[0]


def _node_name(name: str) -> str:
    return re.sub(r"Backward\d*$", "", name) if torch_wording()[0] else name


def note_text(m: Mutation | None, *, light: bool = False) -> str:
    """The note added to torch's version error."""
    if m is None:
        if light:
            return ("gradwatch: no in-place write to a tensor of this shape and version was seen; "
                    'level="light" does not watch in-place ops while grad mode is on (an '
                    "activation edited in forward, `x += y` after an in-place ReLU): rerun with "
                    'level="full" to name the line')
        return ("gradwatch: no in-place write to a tensor of this shape and version was seen: it "
                "happened where gradwatch cannot look (a C++ kernel, another thread, a compiled "
                "region) or before watch() started")
    return (f"gradwatch: {m.describe()} after a pending graph saved it for backward. "
            f"Fix: {hint_for(m.op)}.")

