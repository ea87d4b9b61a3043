"""Value statistics: strided samples, fused norms, data changes. Pure functions on tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["ChangePair", "PassSamples", "change", "change_table", "checkable", "probe", "sample",
           "sample_step", "update_norms", "without_grad"]

# Samples for update/weight ratios and change stats: 2.4% of each tensor, 8 to 1024 elements.
_SAMPLE, _SAMPLE_MIN, _SAMPLE_SHARE = 1024, 8, 0.024
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled  # torch's own (light replaces the attribute)
_DisableTorchFunction = torch._C.DisableTorchFunction


def _stride(n: int) -> int:
    """Stride of the sample of an ``n``-element tensor: every element up to ``_SAMPLE_MIN``,
    else about one in ``1 / _SAMPLE_SHARE`` and at most ``_SAMPLE`` elements, so that the two
    copies a statistics step holds stay within 5% of the parameters' bytes."""
    k = min(_SAMPLE, max(_SAMPLE_MIN, int(n * _SAMPLE_SHARE)))
    return 1 if k >= n else -(-n // k)


def sample(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of evenly strided elements of ``t`` (see :func:`_stride`); None for tensors
    whose values cannot be sampled cheaply (sparse, nested, meta, subclasses)."""
    if not checkable(t):
        return None
    flat = t.detach().reshape(-1)
    step = _stride(flat.numel())
    if step > 1:
        flat = flat[::step]
    return flat.clone()


class PassSamples:
    """Which writes of a statistics pass have their change measured: each line's first write
    into a storage. A line that writes one tensor many times between backward passes is
    measured once per pass (each sample holds two copies until the flush)."""

    def __init__(self) -> None:
        self._pass = -1
        self._seen: set[tuple[int, Any]] = set()

    def taken(self, passes: int, key: int | None, where: Any) -> bool:
        """Whether pass ``passes`` measured a write at ``where`` into storage ``key`` already."""
        return key is not None and self._pass == passes and (key, where) in self._seen

    def take(self, passes: int, t: torch.Tensor, key: int | None,
             where: Any) -> torch.Tensor | None:
        """The sample for the change of a write at ``where`` into ``t`` (on storage ``key``),
        or None where that line measured it already in pass ``passes``."""
        if self._pass != passes:
            self._pass, self._seen = passes, set()
        if key is not None:
            if (key, where) in self._seen:
                return None
            self._seen.add((key, where))
        return sample(t)


def without_grad(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with grad mode off, switched by torch's own function (no hook of ours)."""
    enabled = _grad_enabled()
    _set_grad_enabled(False)
    try:
        return fn(*args)
    finally:
        try:
            _set_grad_enabled(enabled)
        except BaseException:  # (a Ctrl-C just then: grad mode is put back all the same)
            _set_grad_enabled(enabled)
            raise


def sample_step(params: list[torch.Tensor]) -> tuple[list[Any], list[Any], list[int]]:
    """For a statistics step, before the optimizer writes: a strided view into each contiguous
    parameter (it shows the values after the update, no second sample needed), the sampled
    values now (one fused copy), and each parameter's data pointer (a rebound ``.data`` is
    sampled afresh). Other sampleable tensors get a copy and no view. Call without grad."""
    views: list[Any] = []
    copies: list[Any] = [None] * len(params)
    pointers: list[int] = []
    live, where = [], []
    for i, t in enumerate(params):
        view = None
        if checkable(t):
            if t.is_contiguous():
                step = _stride(t.numel())
                view = t.view(-1)[::step] if step > 1 else t.view(-1)
                live.append(view)
                where.append(i)
            else:
                copies[i] = sample(t)
        views.append(view)
        pointers.append(t.data_ptr() if view is not None else 0)
    if live:
        try:
            fused = torch._foreach_mul(live, 1.0)  # exact copies (×1), one dispatch
        except Exception:
            fused = [v.clone() for v in live]
        for i, c in zip(where, fused):
            copies[i] = c
    return views, copies, pointers


def update_norms(before: list[torch.Tensor], after: list[torch.Tensor],
                  whole: list[torch.Tensor]) -> torch.Tensor:
    """One vector: ‖before‖, ‖after‖, ‖after − before‖ per sample, then ‖p‖ per whole tensor."""
    delta = list(torch._foreach_sub(after, before))
    norms = torch._foreach_norm(before + after + delta + whole)
    try:
        return torch.stack(norms)
    except RuntimeError:  # mixed dtypes or devices
        return torch.stack([n.float().to(norms[0].device) for n in norms])


class ChangePair(NamedTuple):
    """A write's change, not computed yet: the strided sample before the write and the same
    sample after it (copies). Every pair of a flush is computed in a few fused ops
    (:func:`change_table`), as an optimizer step's statistics are (:func:`update_norms`)."""

    before: torch.Tensor
    after: torch.Tensor


def change(before: torch.Tensor | None, t: torch.Tensor) -> ChangePair | None:
    """The pair for the change from the strided sample ``before`` (:func:`sample`) to ``t``
    now: one copy of the same elements now (no sync, nothing computed yet)."""
    if before is None or not checkable(t):
        return None
    flat = t.detach().reshape(-1)
    step = _stride(flat.numel())
    after = flat[::step] if step > 1 else flat
    if after.shape != before.shape:
        return None
    return ChangePair(before, after.clone())


def change_table(pairs: Sequence[ChangePair]) -> torch.Tensor:
    """One row per pair, in float32 on the first pair's device (no sync): [‖after − before‖₂,
    that over ‖before‖₂, max |after − before|, 1 if after holds NaN/Inf else 0]. Float32
    pairs on one device take six fused ops for all of them; others are computed one by one."""
    device = pairs[0].before.device
    if len(pairs) > 1 and all(p.before.dtype == _float32 and p.before.device == device
                              for p in pairs):
        befores = [p.before for p in pairs]
        afters = [p.after for p in pairs]
        deltas = list(torch._foreach_sub(afters, befores))
        k = len(pairs)
        norms = torch.stack(torch._foreach_norm(deltas + befores))
        peaks = torch.stack(torch._foreach_norm(deltas + afters, _INF))
        l2 = norms[:k]
        return torch.stack([l2, l2 / norms[k:].clamp_min(1e-12), peaks[:k],
                            (~torch.isfinite(peaks[k:])).float()], 1)
    return torch.stack([_change_row(p.before, p.after).to(device) for p in pairs])


def _change_row(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    delta = after - before
    if delta.dtype != _float32:
        if delta.is_complex():
            delta, before = delta.abs(), before.abs()
        delta, before = delta.float(), before.float()
    l2, ref = torch._foreach_norm([delta, before])
    return torch.stack([l2, l2 / ref.clamp_min(1e-12), torch.linalg.vector_norm(delta, _INF),
                        (~torch.isfinite(after).all()).float()])


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_float32 = torch.float32
_INF = float("inf")
# every floating-point and complex dtype this torch has (a set lookup per call, not two calls)
_VALUED = frozenset(d for d in vars(torch).values()
                    if isinstance(d, torch.dtype) and (d.is_floating_point or d.is_complex))


def checkable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be probed and sampled cheaply (plain strided float tensors)."""
    return (type(t) in _PLAIN and t.dtype in _VALUED and t.layout is _STRIDED
            and not t.is_meta and not t.is_nested and t.numel() > 0)


def probe(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A 0-d finiteness probe per tensor, without a sync: the L2 norm (one fused kernel; NaN and
    Inf propagate; ~45x cheaper on CPU than the inf-norm). Finite values above ~1e19 overflow it
    in float32, which only matters for weights that have already blown up. Computed with
    grad off and no function mode: a probe of a parameter made with grad on would be a graph
    that saves the parameter (a pending saved tensor for every later write) and holds it."""
    if not tensors:
        return []
    with _DisableTorchFunction():
        enabled = _grad_enabled()
        if enabled:
            _set_grad_enabled(False)
        try:
            try:
                return list(torch._foreach_norm(list(tensors)))
            except Exception:
                return [torch.linalg.vector_norm(t.detach()) for t in tensors]
        finally:
            if enabled:
                _set_grad_enabled(True)
