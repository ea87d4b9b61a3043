"""The bounded buffer of raw records, with exact counts per kind."""

from __future__ import annotations

from collections import deque

import torch

from .._stats import ChangePair, change_table
from ..events import EventKind
from .raw import LeafBatch, Raw, UpdateStats, WriteRun, expand, write_raw

__all__ = ["RecordBuffer"]

_KIND_KEYS = {k: k.value for k in EventKind}  # (an enum's .value is a Python-level descriptor)
_WRITE_KEY = EventKind.INPLACE_NO_GRAD.value


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

    def add_write(self, entry: tuple) -> None:
        """One write of the short path (see :class:`WriteRun`): a tuple on the last run."""
        unflushed = self.unflushed
        if unflushed and type(last := unflushed[-1]) is WriteRun:
            last.append(entry)
        else:
            unflushed.append(WriteRun((entry,)))
        self.pending += 1
        self.counts[_WRITE_KEY] = self.counts.get(_WRITE_KEY, 0) + 1

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
        if any(type(r) is WriteRun for r in new):
            new = [x for r in new for x in (map(write_raw, r) if type(r) is WriteRun else (r,))]
        pairs = [r.change for r in new if type(r.change) is ChangePair]
        tensors = [r.change for r in new if isinstance(r.change, torch.Tensor)]
        norms = [r.ratios.norms for r in new if type(r.ratios) is UpdateStats]
        if pairs or tensors or norms:
            table = _table(pairs)
            values = _to_lists(table + tensors + norms)
            n = len(table)
            rows = values[0] if n and values[0] is not None else []
            width = len(rows) // len(pairs) if pairs else 0
            of_pairs = iter([rows[i * width:(i + 1) * width] for i in range(len(pairs))])
            of_tensors, of_norms = iter(values[n:n + len(tensors)]), iter(values[n + len(tensors):])
            resolved = []
            for r in new:
                if type(r.change) is ChangePair:
                    r = r._replace(change=next(of_pairs))
                elif isinstance(r.change, torch.Tensor):
                    r = r._replace(change=next(of_tensors))
                if type(r.ratios) is UpdateStats:
                    change, ratios = r.ratios.resolve(next(of_norms))
                    r = r._replace(change=change, ratios=ratios)
                resolved.append(r)
            new = resolved
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


def _table(pairs: list[ChangePair]) -> list[torch.Tensor]:
    """The writes' changes as one table (:func:`change_table`); if that fails, none (each
    write then has no change) instead of a failed flush."""
    if not pairs:
        return []
    with torch._C.DisableTorchFunction():
        try:
            return [change_table(pairs)]
        except Exception:
            return [torch.full((len(pairs), 0), 0.0)]


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
