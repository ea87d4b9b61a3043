"""Raw records: cheap tuples appended on the hot path, turned into :class:`Event` s later."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from types import CodeType
from typing import Any, NamedTuple

import torch

from ._intercept.ops import op_name
from ._location import location_of
from .events import SEVERITY, Change, Event, EventKind

__all__ = ["LeafBatch", "Raw", "RecordBuffer", "UpdateStats", "build_event", "expand"]

_OP_NAMES: dict[Any, str] = {}


class Raw(NamedTuple):
    """An observation before it becomes an Event: no strings formatted, no tensor held
    (``change``/``ratios`` are small derived tensors, resolved to floats at the next flush)."""

    kind: EventKind
    op: Any  # a torch function, or a ready string
    name: str | None
    shape: tuple[int, ...] | None
    dtype: Any
    device: Any
    version_before: int | None
    version_after: int | None
    grad_mode: str
    change: Any  # None, a 4-vector tensor [l2, rel, max_abs, nonfinite], or a Change
    where: tuple[CodeType, int] | None
    step: int
    message: str = ""
    hint: str = ""
    ratios: Any = None  # optimizer updates: UpdateStats (until the flush), then a dict


class UpdateStats(NamedTuple):
    """An optimizer step's statistics, still on the device until the flush: one vector of norms,
    per sampled parameter ``‖before‖``, then ``‖after‖``, then ``‖Δ‖`` (``3 × len(names)``
    entries; more may follow). One copy at the flush turns it into the update's
    :class:`Change` and per-parameter update/weight ratios."""

    norms: torch.Tensor
    names: list[str]

    def resolve(self, values: list[float] | None) -> tuple[tuple | None, dict[str, float] | None]:
        if values is None:
            return None, None
        k = len(self.names)
        before, after, delta = values[:k], values[k:2 * k], values[2 * k:3 * k]
        ratios = {}
        for name, b, a, d in zip(self.names, before, after, delta):
            # a zero-initialised bias is measured against its new value (NaN stays NaN)
            ratios[name] = d / max(b if b > 0 else a, 1e-12)
        total = math.sqrt(sum(d * d for d in delta))
        weights = math.sqrt(sum(b * b for b in before))
        finite = all(math.isfinite(d) for d in delta)
        largest = max(delta) if not any(math.isnan(d) for d in delta) else math.nan
        return (total, total / max(weights, 1e-12), largest, not finite), ratios


def _op(op: Any) -> str:
    if isinstance(op, str):
        return op
    name = _OP_NAMES.get(op)
    if name is None:
        name = op_name(op)
        try:
            _OP_NAMES[op] = name
        except TypeError:
            pass
    return name


def build_event(r: Raw, rank: int) -> Event:
    name = r.name
    if name is None:
        name = describe_shape(r.shape, r.dtype)
    change = r.change
    if isinstance(change, (list, tuple)) and len(change) == 4:
        change = Change(float(change[0]), float(change[1]), float(change[2]), bool(change[3]))
    elif change is not None and not isinstance(change, Change):
        change = None
    ratios = r.ratios if isinstance(r.ratios, dict) else None
    # Field by field in declaration order, without the frozen dataclass's per-field
    # object.__setattr__ calls: events are built for every info record written to a sink.
    ev = _new_event(Event)
    ev.__dict__.update(
        kind=r.kind,
        severity=SEVERITY[r.kind],
        step=r.step,
        op=_op(r.op),
        tensor=name,
        shape=r.shape,
        dtype=None if r.dtype is None else _dtype_name(r.dtype),
        device=None if r.device is None else _device_name(r.device),
        version_before=r.version_before,
        version_after=r.version_after,
        grad_mode=r.grad_mode,
        change=change,
        location=location_of(r.where),
        message=r.message or _default_message(r, name),
        hint=r.hint,
        rank=rank,
        update_ratios=ratios,
    )
    return ev


_new_event = object.__new__
_DTYPE_NAMES: dict[Any, str] = {}


def _device_name(device: Any) -> str:
    name = _DTYPE_NAMES.get(device)
    if name is None:
        name = _DTYPE_NAMES[device] = str(device)
    return name


def _dtype_name(dtype: Any) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def describe_shape(shape: tuple[int, ...] | None, dtype: Any) -> str:
    if shape is None:
        return "tensor"
    d = str(dtype).replace("torch.", "") if dtype is not None else "?"
    return f"tensor {d}[{','.join(str(s) for s in shape)}]"


def _default_message(r: Raw, name: str) -> str:
    op = _op(r.op)
    if r.kind is EventKind.INPLACE_NO_GRAD:
        versions = ""
        if r.version_before is not None:
            versions = f" (version {r.version_before} → {r.version_after})"
        return f"`{name}` was changed in place by {op} with grad mode {r.grad_mode}{versions}"
    if r.kind is EventKind.GRAD_ACCUMULATED:
        return f"backward accumulated a gradient into `{name}.grad`"
    if r.kind is EventKind.OPTIMIZER_UPDATE:
        return f"{name} updated its parameters"
    return f"{r.kind.value} on `{name}`"


class LeafBatch(NamedTuple):
    """The per-leaf events of one backward pass (``grad_accumulated``) or of one clipping call
    (``inplace_no_grad`` on each ``.grad``) as one tuple: leaves held weakly, names and shapes
    looked up only when events are built (:meth:`raws`)."""

    kind: EventKind
    op: str
    leaves: list[Any]  # weakrefs
    versions: list[tuple[int, int]] | None  # per leaf (before, after): writes only
    where: tuple[CodeType, int] | None
    step: int
    names: Any  # the session's TensorNames

    change = None
    ratios = None

    def raws(self) -> list[Raw]:
        return [self.raw(i) for i in range(len(self.leaves))]

    def raw(self, i: int) -> Raw:
        """The record of leaf ``i`` (its ``.grad`` for clipping writes)."""
        grads = self.kind is EventKind.INPLACE_NO_GRAD
        p = self.leaves[i]()
        t = (p.grad if grads else p) if p is not None else None
        name = self.names.param_name(p) if p is not None else None
        if grads and name:
            name = f"{name}.grad"
        vb, va = self.versions[i] if self.versions is not None else (None, None)
        return Raw(
            self.kind, self.op, name, tuple(t.shape) if t is not None else None,
            t.dtype if t is not None else None, t.device if t is not None else None,
            vb, va, "no_grad" if grads else "enabled", None, self.where, self.step,
        )


def expand(records: Iterable[Any]) -> Iterator[Raw]:
    """Raw records, with each :class:`LeafBatch` unfolded into one per leaf."""
    for r in records:
        if type(r) is LeafBatch:
            yield from r.raws()
        else:
            yield r


_KIND_KEYS = {k: k.value for k in EventKind}  # (an enum's .value is a Python-level descriptor)


class RecordBuffer:
    """Bounded buffer of raw records plus exact counts; new records wait for the next flush."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.records: deque[Raw] = deque()  # bounded by events held (a batch holds several)
        self.held = 0
        self.unflushed: list[Raw] = []
        self.pending = 0  # events in `unflushed`
        self.counts: dict[str, int] = {}

    def add(self, r: Raw) -> None:
        self.unflushed.append(r)
        self.pending += 1
        key = _KIND_KEYS[r.kind]
        self.counts[key] = self.counts.get(key, 0) + 1

    def add_batch(self, batch: LeafBatch) -> None:
        """Per-leaf events as one record (counted per leaf)."""
        self.unflushed.append(batch)
        n = len(batch.leaves)
        self.pending += n
        key = _KIND_KEYS[batch.kind]
        self.counts[key] = self.counts.get(key, 0) + n

    def latest(self, n: int) -> list[Raw]:
        """The most recent ``n`` events' records, oldest first (batches unfolded)."""
        out: list[Raw] = []
        for r in reversed(self.records):
            if type(r) is LeafBatch:
                out.extend(reversed(r.raws()))
            else:
                out.append(r)
            if len(out) >= n:
                break
        out.reverse()
        return out[-n:] if len(out) > n else out

    def unfold_batches(self) -> None:
        """Unfold held leaf batches into per-leaf records, reading names and shapes now (at the
        end of a watch, while the leaves are alive: ``events`` read later still name them)."""
        if any(type(r) is LeafBatch for r in self.records):
            self.records = deque(expand(self.records))

    def take_unflushed(self) -> list[Raw]:
        """Resolve pending small tensors (one sync) and move records into the bounded buffer."""
        new, self.unflushed = self.unflushed, []
        self.pending = 0
        if not new:
            return new
        tensors = [r.change for r in new if isinstance(r.change, torch.Tensor)]
        tensors += [r.ratios.norms for r in new if type(r.ratios) is UpdateStats]
        if tensors:
            values = _to_lists(tensors)
            it = iter(values)
            resolved = []
            for r in new:
                if isinstance(r.change, torch.Tensor):
                    r = r._replace(change=next(it))
                resolved.append(r)
            new = []
            for r in resolved:
                if type(r.ratios) is UpdateStats:
                    change, ratios = r.ratios.resolve(next(it))
                    r = r._replace(change=change, ratios=ratios)
                new.append(r)
        records = self.records
        records.extend(new)
        self.held += sum(len(r.leaves) if type(r) is LeafBatch else 1 for r in new)
        while records:  # drop the oldest records not needed for the latest `maxlen` events
            first = records[0]
            n = len(first.leaves) if type(first) is LeafBatch else 1
            if self.held - n < self.maxlen:
                break
            records.popleft()
            self.held -= n
        return new


def _to_lists(tensors: list[torch.Tensor]) -> list[list[float] | None]:
    """One device-to-host copy for all small tensors; a tensor that cannot be read (meta, fake)
    gives None instead of failing the flush."""
    with torch._C.DisableTorchFunction():
        try:
            flat = [t.detach().reshape(-1).to(torch.float64) for t in tensors]
            joined = torch.cat(flat).tolist()
        except Exception:
            return [_one_list(t) for t in tensors]
    out, i = [], 0
    for t in flat:
        n = t.numel()
        out.append(joined[i:i + n])
        i += n
    return out


def _one_list(t: torch.Tensor) -> list[float] | None:
    try:
        return t.detach().reshape(-1).to(torch.float64).tolist()
    except Exception:
        return None
