"""``gradwatch.jsonl``: one JSON object per line, line-buffered (``gradwatch.rank{R}.jsonl``
when several ranks write).

Every anomaly (warning, error) is one line, written as soon as it is known. Info events are
aggregated: per step, one line per kind, op and line of code, whose ``count`` says how many
events it stands for (a backward pass over 200 parameters is one ``grad_accumulated`` line with
``count: 200``; the first event's fields, its tensor named ``"<first> (+N more)"``). Info
events that carry statistics (a data ``change``, ``update_ratios``: on statistics steps only)
keep a line each. A line without ``count`` is one event (files written before aggregation)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ..events import Event, EventKind
from ..records.raw import LeafBatch, build_event
from . import Sink

__all__ = ["JsonlSink", "jsonl_name"]


# One encoder for every line (json.dumps with options builds a new encoder per call).
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode

# The info events of a training loop repeat step after step with only the step and the version
# numbers changed: their lines come from a template, encoded once (same text as `_encode`).
_STEP, _BEFORE, _AFTER = "\x01s", "\x01b", "\x01a"
_SLOTS = {'"\\u0001s"': "{s}", '"\\u0001b"': "{b}", '"\\u0001a"': "{a}"}
_MAX_TEMPLATES = 4096


def _versions_text(e: Event) -> str | None:
    if e.version_before is None or e.version_after is None:
        return None
    return f"(version {e.version_before} → {e.version_after})"


def _number(v: int | None) -> str:
    return "null" if v is None else str(int(v))


class _Lines:
    """Event → JSON line, through templates keyed by everything but the step and versions."""

    def __init__(self) -> None:
        self._templates: dict[tuple, str | None] = {}

    def line(self, e: Event) -> str:
        tpl = self.template(e)
        if tpl == "":
            return _encode(e.to_dict())
        return _fill(tpl, e.step, e.version_before, e.version_after)

    def template(self, e: Event) -> str:
        """The event's line with its step and versions left as slots ("" when it has none)."""
        if e.change is not None or e.update_ratios is not None or type(e.step) is not int:
            return ""
        versions = _versions_text(e)
        message = e.message
        if versions is not None and versions in message:
            message = message.replace(versions, "\x01v")
        key = (e.kind, e.severity, e.op, e.tensor, e.shape, e.dtype, e.device, e.grad_mode,
               e.location, message, e.hint, e.rank)
        tpl = self._templates.get(key)
        if tpl is None:
            tpl = self._template(e, message)
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = tpl
        return tpl

    @staticmethod
    def _template(e: Event, message: str) -> str:
        loc = e.location
        texts = (e.message, e.tensor, e.op, e.hint, e.dtype or "", e.device or "", e.grad_mode,
                 *((loc.filename, loc.function, loc.code) if loc is not None else ()))
        if any("\x01" in t or "\\u0001" in t for t in texts):
            # the template's markers (or their escaped spelling) occur in the event's own text
            return ""
        d = e.to_dict()
        d["step"], d["version_before"], d["version_after"] = _STEP, _BEFORE, _AFTER
        d["message"] = message
        text = _encode(d).replace("{", "{{").replace("}", "}}")
        for slot, field in _SLOTS.items():
            text = text.replace(slot, field)
        return text.replace("\\u0001v", "{v}")


def _fill(tpl: str, step: int, before: int | None, after: int | None) -> str:
    versions = "" if before is None or after is None else f"(version {before} → {after})"
    return tpl.format(s=step, b=_number(before), a=_number(after), v=versions)


class _BatchLines:
    """Lines of the per-leaf events in :class:`LeafBatch` records without building an Event
    for each: per (kind, op, line of code, leaf) a template, made once from the real event and
    used while the leaf (its ``.grad`` for clipping) keeps its name, shape, dtype and device."""

    def __init__(self, lines: _Lines) -> None:
        self._lines = lines
        self._cache: dict[tuple, tuple] = {}

    def lines(self, batch: LeafBatch, rank: int) -> list[str]:
        out = []
        grads = batch.kind is EventKind.INPLACE_NO_GRAD
        where = batch.where
        site = (batch.kind, batch.op, None if where is None else (id(where[0]), where[1]), rank)
        versions = batch.versions
        cache = self._cache
        param_name = batch.names.param_name
        for i, ref in enumerate(batch.leaves):
            p = ref()
            t = (p.grad if grads else p) if p is not None else None
            if t is None:
                out.append(self._lines.line(build_event(batch.raw(i), rank)))
                continue
            key = (site, id(p))
            entry = cache.get(key)
            name = param_name(p)
            if (entry is None or entry[0]() is not p or entry[1] != name
                    or entry[2] != t.shape or entry[3] is not t.dtype or entry[4] != t.device):
                event = build_event(batch.raw(i), rank)
                entry = (ref, name, t.shape, t.dtype, t.device, self._lines.template(event))
                if len(cache) >= _MAX_TEMPLATES:
                    cache.clear()
                cache[key] = entry
                if entry[5] == "":
                    out.append(_encode(event.to_dict()))
                    continue
            elif entry[5] == "":
                out.append(self._lines.line(build_event(batch.raw(i), rank)))
                continue
            vb, va = versions[i] if versions is not None else (None, None)
            out.append(_fill(entry[5], batch.step, vb, va))
        return out


def _aggregate_line(first: Any, n: int, rank: int) -> str:
    """One line for ``n`` info events like ``first`` (a Raw or a LeafBatch): its first event,
    ``count`` added; fields that differ from tensor to tensor left out when ``n > 1``."""
    raw = first.raw(0) if type(first) is LeafBatch else first
    d = build_event(raw, rank).to_dict()
    if n > 1:
        d["tensor"] = f"{d['tensor']} (+{n - 1} more)"
        d["message"] = f"{d['message']} (and {n - 1} more like it)"
        for field in ("shape", "dtype", "device", "version_before", "version_after"):
            d.pop(field, None)
    d["count"] = n
    return _encode({k: v for k, v in d.items() if v is not None})


def jsonl_name(rank: int, world: int) -> str:
    return "gradwatch.jsonl" if world <= 1 else f"gradwatch.rank{rank}.jsonl"


class JsonlSink(Sink):
    def __init__(self, log_dir: str, rank: int = 0, world: int = 1) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, jsonl_name(rank, world))
        self._lines = _Lines()
        self._batch_lines = _BatchLines(self._lines)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (last)

    def _write_one(self, event: Event) -> None:
        self._file.write(_encode(event.to_dict()) + "\n")

    def anomaly(self, event: Event) -> None:
        if not self._file.closed:
            self._write_one(event)

    def write(self, events: Sequence[Event]) -> None:
        if self._file.closed:
            return
        self._file.write(
            "".join(self._lines.line(e) + "\n" for e in events)
        )

    def write_records(self, records: Sequence[Any], rank: int) -> None:
        """The step's info records, aggregated (see the module docstring): one event built per
        kind, op and line of code, whatever the number of tensors."""
        if self._file.closed:
            return
        lines: list[str] = []
        groups: dict[tuple, list[Any]] = {}  # (step, kind, op, line) -> [first record, count]
        for r in records:
            if type(r) is LeafBatch:
                n = len(r.leaves)
                if not n:
                    continue
            elif r.change is not None or r.ratios is not None:
                lines.append(self._lines.line(build_event(r, rank)))  # statistics: its own line
                continue
            else:
                n = 1
            where = r.where
            key = (r.step, r.kind, r.op, None if where is None else (id(where[0]), where[1]))
            group = groups.get(key)
            if group is None:
                groups[key] = [r, n]
            else:
                group[1] += n
        for first, n in groups.values():
            lines.append(_aggregate_line(first, n, rank))
        self._file.write("".join(line + "\n" for line in lines))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.flush()
            finally:
                self._file.close()
