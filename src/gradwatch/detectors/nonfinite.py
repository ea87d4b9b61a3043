"""``nonfinite_introduced``: an op under no_grad writes NaN/Inf into a finite tensor.

Checks are lazy and batched: each watched write queues a 0-d "max |x|" of the tensor before and
after (a device tensor, no sync); the queue is read in one ``tolist()`` at the next step
boundary, backward, or flush. The first write whose before is finite and after is not is reported.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._context import RunContext, version
from .._location import location_of
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, describe_shape, op_str

K = EventKind

__all__ = ["NonfiniteDetector", "NonfiniteTracker"]

HINT = (
    "guard the division/log/sqrt on this line (e.g. x / norm.clamp_min(eps)), or lower the "
    "learning rate; check the inputs of this update for zeros and overflow"
)
HINT_LOG = "clamp what this line takes the log of (x.clamp_min(eps).log()); check it for zeros"
HINT_SQRT = ("add eps inside the square root (torch.sqrt(v + eps)), not outside it; check what "
             "it takes the root of for negative values")
HINT_STEP = ("lower the learning rate or clip the gradients (torch.nn.utils.clip_grad_norm_) "
             "before the step; check the gradients for NaN/Inf (a loss that overflowed)")
HINT_VALUES = ("check what this line writes: its inputs for NaN/Inf and overflow (values "
               "beyond the dtype's range), or lower the learning rate")


def hint_for(op: str, code: str) -> str:
    """The fix for a write that made a tensor non-finite, by the op and the source line."""
    if op == "optimizer.step":
        return HINT_STEP
    text = f"{op} {code}"
    if "sqrt" in text:
        return HINT_SQRT
    if "log" in text:
        return HINT_LOG
    if "div" in text or "/" in code:
        return HINT
    return HINT_VALUES


class _Vector(NamedTuple):
    """An optimizer step's probes in one device vector: ``vec[before + i]`` is parameter i's
    probe before the update, ``vec[after + i]`` after it."""

    vec: torch.Tensor
    before: int
    after: int
    infos: list[Any]


class NonfiniteTracker:
    """Queue of pending (before, after) checks; resolved in batches."""

    def __init__(self, limit: int = 2048) -> None:
        self.limit = limit
        self.pending: list[Any] = []  # (before, after, info) or a _Vector
        self.reported: set[str] = set()

    def queue(self, before: list[torch.Tensor], after: list[torch.Tensor], infos: list[Any]) -> bool:
        """Queue checks; True when the queue is full and should be resolved now."""
        self.pending.extend(zip(before, after, infos))
        return len(self.pending) >= self.limit

    def queue_vector(self, vec: torch.Tensor, before: int, after: int, infos: list[Any]) -> None:
        """Queue one check per entry of ``infos`` whose probes lie in ``vec`` (see _Vector)."""
        self.pending.append(_Vector(vec, before, after, infos))

    def resolve(self, report: Callable[[Any], None]) -> None:
        """Read all pending checks in one sync and report the first write that broke each tensor."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        pairs = [e for e in pending if type(e) is tuple]
        vectors = [e.vec.reshape(-1).float() for e in pending if type(e) is _Vector]
        parts = [torch.stack([x.float() for b, a, _ in pairs for x in (b, a)])] if pairs else []
        try:
            values = torch.cat(parts + vectors).tolist()
        except RuntimeError:  # tensors on several devices
            values = [x for part in parts + vectors for x in part.tolist()]
        finite = [math.isfinite(v) for v in values]
        i = 0  # pairs first, then the vectors, each in queue order
        j = 2 * len(pairs)
        for e in pending:
            if type(e) is tuple:
                if finite[i] and not finite[i + 1]:
                    report(e[2])
                i += 2
            else:
                for k, info in enumerate(e.infos):
                    if finite[j + e.before + k] and not finite[j + e.after + k]:
                        report(info)
                j += e.vec.numel()



class NonfiniteDetector:
    """Queues finiteness probes of watched writes and optimizer steps; reports, once per tensor,
    the first write that made a finite tensor non-finite."""

    def __init__(self, ctx: RunContext, emit: Emitter) -> None:
        self.ctx = ctx
        self.emit = emit
        self.queue = NonfiniteTracker()
        self.reported: set[str] = set()
        self.off = False

    def wrote(self, before: list[torch.Tensor], after: list[torch.Tensor], raws: list[Raw]) -> None:
        """Probes (see :func:`gradwatch._stats.probe`) of tensors before and after the writes
        recorded as ``raws``."""
        if self.queue.queue(before, after, raws):
            self.queue.resolve(self.report)

    def stepped(self, vec: torch.Tensor, k: int, params: list[torch.Tensor],
                versions: list[int | None], where: Any, step: int,
                names: list[str | None] | None = None) -> None:
        """An optimizer step's probes: ``vec[i]`` before and ``vec[2k + ... ]`` layout of
        :func:`gradwatch._stats.update_norms` (sample before, whole parameter after).
        ``names``: the parameters' names now (they may be gone when the probes are read)."""
        if names is None:
            names = [self.ctx.names.param_name(p) for p in params]
        lazy = [functools.partial(self._update_raw, weakref.ref(p), vb, where, step, name,
                                  (tuple(p.shape), p.dtype, p.device))
                for p, vb, name in zip(params, versions, names)]
        self.queue.queue_vector(vec, 0, 3 * k, lazy)

    def end_step(self, final: bool) -> None:
        """One read of the queued probes (a sync on GPU) per statistics step, not per step."""
        q = self.queue
        if q.pending and (final or self.ctx.is_stats_step() or len(q.pending) > q.limit // 2):
            q.resolve(self.report)

    def _update_raw(self, ref: weakref.ref[torch.Tensor], vb: int | None, where: Any,
                    step: int, name: str | None, meta: tuple) -> Raw:
        """The record of an optimizer step's write into one parameter (built only when its NaN
        check fails; the parameter may be gone by then: its name and shape were kept)."""
        p = ref()
        shape, dtype, device = meta
        return Raw(K.NONFINITE_INTRODUCED, "optimizer.step", name, shape, dtype, device, vb,
                   version(p) if p is not None else None, "no_grad", None, where, step)

    def report(self, raw: Raw | Callable[[], Raw]) -> None:
        if callable(raw):
            raw = raw()
        name = raw.name or describe_shape(raw.shape, raw.dtype)
        if name in self.reported:
            return
        self.reported.add(name)
        op = op_str(raw.op)
        loc = location_of(raw.where)
        self.emit.anomaly(raw._replace(
            kind=K.NONFINITE_INTRODUCED, change=None,
            message=f"{op} wrote NaN/Inf into `{name}`, which was finite before",
            hint=hint_for(op, loc.code if loc is not None else ""),
        ))
