"""Sinks: where events go. The in-memory buffer and warnings live in the watch itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import Event

__all__ = ["Sink", "StepSummary"]


@dataclass
class StepSummary:
    """What happened during one optimizer step, aggregated (sinks never see single ops)."""

    step: int
    counts: dict[str, int]  # events of each kind during this step
    totals: dict[str, int]  # exact totals so far
    update_ratios: dict[str, float] = field(default_factory=dict)  # param -> ‖Δ‖/‖w‖ (stats steps)
    overhead_s: float = 0.0  # gradwatch's own time during this step
    rank: int = 0


class Sink:
    """Base class: override what you need. Called at step boundaries, never per op."""

    def anomaly(self, event: Event) -> None:
        """An anomaly, as soon as it is known (before a possible crash)."""

    def write(self, events: Sequence[Event]) -> None:
        """Info events of the step that just ended."""

    def write_records(self, records: Sequence[Any], rank: int) -> None:
        """Optional, instead of :meth:`write`: the step's info records as gradwatch keeps them
        (``gradwatch.records.raw``; build events with ``build_event``/``expand``). A sink that
        overrides it gets records, not events (the JSONL sink writes them from templates)."""

    def step(self, summary: StepSummary) -> None:
        """End of an optimizer step."""

    def flush(self) -> None:
        """Make everything durable."""

    def close(self) -> None:
        """Flush and release resources (idempotent)."""
