"""Raw records: cheap tuples made where something is seen, turned into :class:`Event` s later.

Plain data at the bottom of the house: imports nothing of gradwatch but events and locations."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from types import CodeType
from typing import Any, NamedTuple

import torch

from .._location import location_of
from ..events import SEVERITY, Change, Event, EventKind

__all__ = ["LeafBatch", "Raw", "UpdateStats", "WriteRun", "build_event", "describe_shape", "expand",
           "op_str", "write_raw"]

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


def op_name(func: Any) -> str:
    """The user-facing name: ``sub_``, ``copy_``, ``__setitem__``, ``grad.__set__``…"""
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__self__", None)
    if name in ("__get__", "__set__") and owner is not None:
        return f"{getattr(owner, '__name__', '?')}.{name}"
    return name


def op_str(op: Any) -> str:
    """``op`` as events show it: a ready string as it is, a torch function by its name (memoised)."""
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
        op=op_str(r.op),
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
    op = op_str(r.op)
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


class WriteRun(list):
    """Consecutive in-place writes recorded by the write path's short path
    (``Writes._window_goes_on``), one tuple each: (the record of its window's first write —
    the same tensor, op and line —, version before, version after, grad mode, step). A write
    costs a tuple until its records are read: :meth:`RecordBuffer.take_unflushed` unfolds
    them (:func:`write_raw`) before anything else sees them."""

    __slots__ = ()


def write_raw(entry: tuple) -> Raw:
    """The record of one write of a :class:`WriteRun` (what the general path records)."""
    first, vb, va, grad_mode, step = entry
    return Raw(first.kind, first.op, first.name, first.shape, first.dtype, first.device, vb, va,
               grad_mode, None, first.where, step)


def expand(records: Iterable[Any]) -> Iterator[Raw]:
    """Raw records, with each :class:`LeafBatch` unfolded into one per leaf."""
    for r in records:
        if type(r) is LeafBatch:
            yield from r.raws()
        else:
            yield r


