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
from .findings import Finding, Findings, describe_finding
from .raw import LeafBatch, Raw, build_event, expand

__all__ = ["Emitter"]


class Emitter:
    """Records, anomalies and findings of one watch, and the sinks they go to. A sink that
    raises is warned about once and left out from then on.

    Anomalies group into findings (``records.findings``: one per kind and culprit line, with
    every tensor it touched). With ``on_anomaly="warn"`` a finding's one ``GradWatchWarning``
    waits until the boundary call that reported it is over (the next backward or clipping
    batch, the step boundary, or the end of the watch), so that it names all the tensors the bug
    touched there, not just the first."""

    def __init__(self, max_events: int, on_anomaly: str, sinks: Iterable[Sink] = ()) -> None:
        self.buffer = RecordBuffer(max_events)
        self.anomalies: deque[Event] = deque(maxlen=max_events)
        self.findings = Findings()
        self._unwarned: list[Finding] = []  # new findings whose warning waits (``warn``)
        self.sinks: list[Sink] = list(sinks)
        self.warn = on_anomaly == "warn"
        self.raise_now = on_anomaly == "raise"
        self.rank = 0
        self._last_counts: dict[str, int] = {}
        self._off: set[int] = set()  # ids of sinks switched off
        # called when as many records wait as the buffer holds: a loop with neither backward
        # passes nor optimizer steps has no boundary to flush them at (the runtime's flush)
        self.on_full: Callable[[], None] | None = None

    # -- emitting -----------------------------------------------------------------------------
    def record(self, r: Raw) -> None:
        buffer = self.buffer
        buffer.add(r)
        if buffer.pending >= buffer.maxlen and self.on_full is not None:
            self.on_full()

    def record_write(self, entry: tuple) -> None:
        """A write of the short path (see :class:`~.raw.WriteRun`)."""
        buffer = self.buffer
        buffer.add_write(entry)
        if buffer.pending >= buffer.maxlen and self.on_full is not None:
            self.on_full()

    def record_batch(self, batch: LeafBatch) -> None:
        buffer = self.buffer
        buffer.add_batch(batch)
        if buffer.pending >= buffer.maxlen and self.on_full is not None:
            self.on_full()
        if self._unwarned:  # a backward or clipping call: what came before it is complete
            self.warn_pending()

    def anomaly(self, r: Raw, *, raise_now: bool = True) -> Event:
        """Record an anomaly now; warn (``warn``, once per finding, see the class) or raise
        (``raise``, at once). ``raise_now=False``: torch's own error is already on its way
        (notes only)."""
        self.buffer.add(r)
        ev = build_event(r, self.rank)
        self.anomalies.append(ev)
        finding, new = self.findings.add(ev)
        for sink in self.sinks:
            self._call(sink, sink.anomaly, ev)
        if new and self.warn:
            self._unwarned.append(finding)
        elif self.raise_now and raise_now:
            raise AnomalyError(ev)
        return ev

    def warn_pending(self) -> None:
        """Issue the waiting findings' warnings, each at its culprit line."""
        waiting, self._unwarned = self._unwarned, []
        for f in waiting:
            loc = f.event.location
            warnings.warn_explicit(describe_finding(f), GradWatchWarning,
                                   loc.filename if loc else "<gradwatch>", loc.lineno if loc else 0)

    # -- reading ------------------------------------------------------------------------------
    def distinct(self) -> list[dict[str, Any]]:
        """The findings: first event, count, first and last step, tensors (names, in order)."""
        return self.findings.rows()

    def events(self, max_events: int) -> list[Event]:
        self.take()
        return [build_event(r, self.rank) for r in self.buffer.latest(max_events)]

    def take(self) -> list[Any]:
        """Move waiting records into the bounded buffer (one sync for their small tensors)."""
        return self.buffer.take_unflushed()

    # -- the step boundary --------------------------------------------------------------------
    def flush(self, step: int, final: bool, busy: float) -> None:
        """Hand the step's info records and its summary to the sinks, then issue the waiting
        warnings. With no sink, records wait (as many events as the buffer holds) and move into
        it when read, when that many wait, or at the end."""
        try:
            self._flush(step, final, busy)
        finally:
            if self._unwarned:
                self.warn_pending()

    def _flush(self, step: int, final: bool, busy: float) -> None:
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
        """Close every sink, also one switched off (its file is released); warnings still
        waiting (a flush that did not run) are issued first. A sink whose close() an interrupt
        cut short is closed once more (a sink's close() is idempotent), and the other sinks
        still close; the interrupt is re-raised at the end."""
        try:
            if self._unwarned:
                self.warn_pending()
        finally:
            interrupt: BaseException | None = None
            for sink in self.sinks:
                for _ in range(2):
                    try:
                        self._call(sink, sink.close, closing=True)
                        break
                    except BaseException as exc:  # (a Ctrl-C)
                        interrupt = interrupt or exc
            if interrupt is not None:
                raise interrupt

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
