"""``saved_tensor_mutated``: an in-place op changes a tensor a pending graph saved for backward.

Certainty before severity: a graph may stay alive without ever being backwarded (``y, _ = f(x)``,
``torch.autograd.grad`` on an input), and mutating what it saved is then harmless. So at
``level="full"`` the registry (:mod:`._saved_registry`) marks the saved tensors a write changes,
at the mutating line, and the write is reported — as an error, at that line — when a backward
actually uses one of them: torch's version error (with a note), or, for a write torch cannot
see (through ``.data``, a fused step), the backward that silently used the new values. Torch's
own version error is also explained after the fact from a bounded log of recent writes and
optimizer steps (both levels).
"""

from __future__ import annotations

import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext, version
from .._naming import storage_key
from ..errors import is_version_error
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, describe_shape, op_str, write_raw
from ._saved_registry import (
    HINT,
    HINT_STEP,
    Mutation,
    SavedTensorRegistry,
    hint_for,
    note_text,
    numel,
    parse_version_error,
    torch_wording,
)

__all__ = ["HINT", "HINT_STEP", "Mutation", "SavedTensorDetector"]

K = EventKind
_SUSPECTS = 1024  # writes into saved tensors waiting for a backward (the oldest are dropped)


class SavedTensorDetector:
    """Owns the registry, the log of recent writes and steps, and every message of its kind."""

    def __init__(self, ctx: RunContext, emit: Emitter) -> None:
        self.ctx = ctx
        self.emit = emit
        self.registry: SavedTensorRegistry | None = None
        self.log: deque[Any] = deque(maxlen=256)  # Mutations, inplace Raws, short-path tuples
        self.recent_steps: deque[tuple] = deque(maxlen=8)  # (where, step, param ids, versions)
        # writes into saved tensors, reported once a backward uses what they changed
        self.suspects: OrderedDict[int, tuple[Mutation, Raw]] = OrderedDict()
        self.off = False

    @staticmethod
    def prepare() -> None:
        """Read torch's error wording while torch still checks versions itself (before any
        hook of ours is installed: it runs a small backward)."""
        torch_wording()

    def install(self, installed: Any, on_error: Callable[[BaseException], None]) -> None:
        """Push the registry's pack/unpack pair (full): torch calls them directly (guarded
        inside: an internal error is reported once, tensors pass through from then on)."""
        torch_wording()  # read torch's error wording while torch still checks
        registry = SavedTensorRegistry(on_error=on_error)
        if installed.saved_tensors_hooks(registry.pack, registry.unpack):
            self.registry = registry
            installed.add(functools.partial(setattr, self, "registry", None))

    # -- at a write ---------------------------------------------------------------------------
    def pending(self, key: int | None) -> list[Any] | None:
        """Intact saved tensors of pending graphs on storage ``key`` (None without any)."""
        registry = self.registry
        return registry.pending(key) if registry else None

    def mutated(self, func: Any, t: torch.Tensor, saved: list[Any], key: int | None, where: Any,
                grad_mode: str, *, after: bool) -> None:
        """``t`` (on storage ``key``) is written in place by ``func`` at ``where`` while the
        graphs that saved ``saved`` are pending (``after``: the write happened): a suspect,
        reported when a backward uses those graphs (:meth:`used`)."""
        name = self.ctx.names.name_of(t, key)
        now = version(t)
        vb = (now - 1) if (after and now is not None) else now
        first = saved[0]
        silent = after and first.alias._version == first.version
        op = op_str(func)
        step = self.ctx.step()
        mutation = Mutation(name, tuple(t.shape), vb, now if after else None, op, where, step)
        if self.registry is not None:
            self.registry.mark(saved, mutation, t if after and grad_mode == "enabled" else None)
        self.log.append(mutation)
        if silent:
            msg = (f"`{name}` was written in place by {op} through an alias with its own version "
                   "counter (.data/.detach()) while a pending graph saved it: torch cannot detect "
                   "this, backward will silently use the new values")
            vb = va = None
        else:
            msg = (f"`{name}` is modified in place by {op} while a graph that has not run backward "
                   f"yet saved it at version {first.version}: backward through that graph will fail "
                   "(or use the new values)")
            va = now if after else None
        raw = Raw(K.SAVED_TENSOR_MUTATED, op, name, tuple(t.shape), t.dtype, t.device, vb, va,
                  grad_mode, None, where, step, msg, hint_for(op, grad_mode))
        suspects = self.suspects
        suspects[id(mutation)] = (mutation, raw)
        if len(suspects) > _SUSPECTS:
            suspects.popitem(last=False)

    def used(self, mutation: Mutation | None, *, raise_now: bool) -> bool:
        """A backward used a saved tensor ``mutation`` changed: report the write (once). False
        if it was no suspect (reported already, or never seen)."""
        entry = self.suspects.pop(id(mutation), None) if mutation is not None else None
        if entry is None or entry[0] is not mutation:
            return False
        self.emit.anomaly(entry[1], raise_now=raise_now)
        return True

    def after_backward(self) -> None:
        """A backward pass ended: report the writes torch could not see that it used."""
        registry = self.registry
        if registry is None or not registry.used_after_write:
            return
        used, registry.used_after_write = registry.used_after_write, []
        for mutation in dict.fromkeys(used):
            self.used(mutation, raise_now=True)

    def wrote(self, raw: Raw | tuple) -> None:
        """An in-place write was recorded (its record, or the short path's tuple: see
        :class:`~..records.raw.WriteRun`): remember it for a later version error's note."""
        self.log.append(raw)

    def check_tensors(self, op: Any, tensors: list[torch.Tensor], where: Any) -> None:
        """Library code (an optimizer step, clipping) is about to write these tensors."""
        for t in tensors:
            key = storage_key(t)
            saved = self.pending(key)
            if saved is not None:
                where = where() if callable(where) else where
                self.mutated(op, t, saved, key, where, "no_grad", after=False)

    def stepped(self, where: Any, step: int, params: list[torch.Tensor],
                versions: list[int | None]) -> None:
        """An optimizer step wrote ``params`` (their versions before it): for later notes."""
        self.recent_steps.append((where, step, list(map(id, params)), versions))

    def end_step(self) -> None:
        if self.registry is not None:
            self.registry.sweep_if_packed()  # freed graphs' entries

    # -- when torch raises --------------------------------------------------------------------
    def annotate(self, exc: RuntimeError) -> bool:
        """Add a note naming the write behind torch's version error; False if not one."""
        if not is_version_error(exc):
            return False
        reported = key = None
        registry = self.registry
        if registry is not None:
            reported, registry.last_failure = registry.last_failure, None
            key, registry.last_failure_key = registry.last_failure_key, None
        mutation = reported or self.explain(str(exc), key)
        exc.add_note(note_text(mutation, light=not self.ctx.full))
        if reported is not None:
            self.used(reported, raise_now=False)  # torch's own error is the one to see
        elif mutation is not None:
            self.emit.anomaly(Raw(
                K.SAVED_TENSOR_MUTATED, mutation.op, mutation.name, mutation.shape, None, None,
                mutation.version_before, mutation.version_after, "no_grad", None,
                mutation.where, mutation.step,
                f"`{mutation.name}` was modified in place after a graph saved it; backward "
                "failed on it", hint_for(mutation.op),
            ), raise_now=False)
        return True

    def explain(self, message: str, key: int | None = None) -> Mutation | None:
        """The write behind torch's version error: a recorded in-place write, else a recent
        optimizer step's write into a parameter that fits the error — on the failing storage
        (``key``, full), else of the error's shape (transposed first for 2-D), else its size."""
        m = self._logged(message)
        parsed = parse_version_error(message)
        if parsed is None:
            return m
        shape, _now, expected = parsed
        if m is not None and m.version_before == expected:
            return m
        params = self.ctx.names._params
        best, best_rank = None, 4
        for where, step, ids, versions in reversed(self.recent_steps):
            for pid, vb in zip(ids, versions):
                entry = params.get(pid)
                p = entry[1]() if entry else None
                if p is None or vb != expected or p.numel() != numel(shape):
                    continue
                own = tuple(p.shape)
                # nn.Linear saves weight.t(): a 2-D error shape is the transpose most often
                rank = (0 if key is not None and storage_key(p) == key else
                        1 if (own[::-1] if len(own) == 2 else own) == shape else
                        2 if own == shape else 3)
                if rank < best_rank:
                    best_rank, best = rank, Mutation(entry[0], own, vb, vb + 1,
                                                     "optimizer.step", where, step)
            if best_rank == 0:
                break
        return best or m

    def _logged(self, message: str) -> Mutation | None:
        """The logged write that explains torch's version error ``message``."""
        parsed = parse_version_error(message)
        if parsed is None:
            return None
        shape, _now, expected = parsed
        n = numel(shape)
        best = None
        for entry in reversed(self.log):
            m = (entry if isinstance(entry, Mutation)
                 else _from_raw(write_raw(entry) if type(entry) is tuple else entry))
            if numel(m.shape) != n:  # the saved tensor may be a view (weight.t())
                continue
            if m.version_before is not None and m.version_before == expected:
                return m
            if best is None:
                best = m
        return best


def _from_raw(r: Raw) -> Mutation:
    return Mutation(r.name or describe_shape(r.shape, r.dtype), r.shape, r.version_before,
                    r.version_after, op_str(r.op), r.where, r.step)
