"""The emitter: the one way records leave detection. Anomalies are warned, raised and handed to
the sinks as soon as they are known; info records wait in the buffer for the step boundary."""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .._failopen import warn_internal
from ..errors import AnomalyError, GradWatchWarning
from ..events import Event
from ..sinks import Sink, StepSummary
from .buffer import RecordBuffer
from .raw import LeafBatch, Raw, build_event, expand

__all__ = ["Emitter"]


class Emitter:
    """Records, anomalies and findings of one watch, and the sinks they go to. A sink that
    raises is warned about once and left out from then on."""

    def __init__(self, max_events: int, on_anomaly: str, sinks: Iterable[Sink] = ()) -> None:
        self.buffer = RecordBuffer(max_events)
        self.anomalies: deque[Event] = deque(maxlen=max_events)
        self.findings: dict[tuple, list[Any]] = {}  # key -> [first event, count, first, last step]
        self.sinks: list[Sink] = list(sinks)
        self.warn = on_anomaly == "warn"
        self.raise_now = on_anomaly == "raise"
        self.rank = 0
        self._last_counts: dict[str, int] = {}
        self._off: set[int] = set()  # ids of sinks switched off

    # -- emitting -----------------------------------------------------------------------------
    def record(self, r: Raw) -> None:
        self.buffer.add(r)

    def record_batch(self, batch: LeafBatch) -> None:
        self.buffer.add_batch(batch)

    def anomaly(self, r: Raw, *, raise_now: bool = True) -> Event:
        """Record an anomaly now; warn (``warn``) or raise (``raise``) once per distinct anomaly.
        ``raise_now=False``: torch's own error is already on its way (notes only)."""
        self.buffer.add(r)
        ev = build_event(r, self.rank)
        self.anomalies.append(ev)
        key = ev.key
        entry = self.findings.get(key)
        if entry is None:
            self.findings[key] = [ev, 1, ev.step, ev.step]
        else:
            entry[1] += 1
            entry[3] = ev.step
        for sink in self.sinks:
            self._call(sink, sink.anomaly, ev)
        if entry is None and self.warn:
            loc = ev.location
            warnings.warn_explicit(ev.describe(), GradWatchWarning,
                                   loc.filename if loc else "<gradwatch>", loc.lineno if loc else 0)
        elif self.raise_now and raise_now:
            raise AnomalyError(ev)
        return ev

    # -- reading ------------------------------------------------------------------------------
    def distinct(self) -> list[dict[str, Any]]:
        return [{"event": ev, "count": n, "first_step": first, "last_step": last}
                for ev, n, first, last in self.findings.values()]

    def events(self, max_events: int) -> list[Event]:
        self.take()
        return [build_event(r, self.rank) for r in self.buffer.latest(max_events)]

    def take(self) -> list[Any]:
        """Move waiting records into the bounded buffer (one sync for their small tensors)."""
        return self.buffer.take_unflushed()

    # -- the step boundary --------------------------------------------------------------------
    def flush(self, step: int, final: bool, busy: float) -> None:
        """Hand the step's info records and its summary to the sinks. With no sink, records wait
        (as many events as the buffer holds) and move into it when read, when that many wait,
        or at the end."""
        t0 = time.perf_counter()
        buffer = self.buffer
        if not self.sinks:
            if final or buffer.pending >= buffer.maxlen:
                buffer.take_unflushed()
            return
        new = buffer.take_unflushed()
        info = [r for r in new if r.kind.severity == "info"]
        counts = buffer.counts
        last = self._last_counts
        delta = {k: v - last.get(k, 0) for k, v in counts.items()}
        self._last_counts = dict(counts)
        ratios: dict[str, float] = {}
        for r in new:
            if isinstance(r.ratios, dict):
                ratios.update(r.ratios)
        summary = StepSummary(step=step, counts=delta, totals=dict(counts), update_ratios=ratios,
                              overhead_s=busy + (time.perf_counter() - t0), rank=self.rank)
        events = None  # built once, only for a sink that reads them
        for sink in self.sinks:
            if id(sink) in self._off:
                continue
            cls = type(sink)
            if info:
                if cls.write_records is not Sink.write_records:
                    self._call(sink, sink.write_records, info, self.rank)
                elif cls.write is not Sink.write:
                    if events is None:
                        events = [build_event(r, self.rank) for r in expand(info)]
                    self._call(sink, sink.write, events)
            self._call(sink, sink.step, summary)
            if final:
                self._call(sink, sink.flush)

    def close_sinks(self) -> None:
        """Close every sink, also one switched off (its file is released)."""
        for sink in self.sinks:
            self._call(sink, sink.close, closing=True)

    def _call(self, sink: Sink, fn: Callable[..., Any], *args: Any, closing: bool = False) -> None:
        off = id(sink) in self._off
        if off and not closing:
            return
        try:
            fn(*args)
        except AnomalyError:
            raise
        except Exception as exc:
            if not off:
                self._off.add(id(sink))
                warn_internal(f"sink {type(sink).__name__}", exc, stacklevel=4)
