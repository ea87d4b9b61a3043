"""The event record gradwatch produces: plain values, never a tensor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

__all__ = ["Change", "Event", "EventKind", "Location", "Severity"]

Severity = Literal["info", "warning", "error"]


class EventKind(str, Enum):
    """What happened. A ``str`` enum: ``EventKind.INPLACE_NO_GRAD == "inplace_no_grad"``."""

    INPLACE_NO_GRAD = "inplace_no_grad"
    OPTIMIZER_UPDATE = "optimizer_update"
    GRAD_ACCUMULATED = "grad_accumulated"
    SAVED_TENSOR_MUTATED = "saved_tensor_mutated"
    GRAD_FLOW_CUT = "grad_flow_cut"
    STALE_GRAD_ACCUMULATION = "stale_grad_accumulation"
    ACCUMULATED_GRAD_DISCARDED = "accumulated_grad_discarded"
    NONFINITE_INTRODUCED = "nonfinite_introduced"
    GRAD_NEVER_APPLIED = "grad_never_applied"
    GRAD_APPLIED_TWICE = "grad_applied_twice"
    GRAD_READ_MID_WINDOW = "grad_read_mid_window"

    def __str__(self) -> str:
        return self.value

    @property
    def severity(self) -> Severity:
        return SEVERITY[self]


SEVERITY: dict[EventKind, Severity] = {
    EventKind.INPLACE_NO_GRAD: "info",
    EventKind.OPTIMIZER_UPDATE: "info",
    EventKind.GRAD_ACCUMULATED: "info",
    EventKind.SAVED_TENSOR_MUTATED: "error",
    EventKind.GRAD_FLOW_CUT: "error",
    EventKind.STALE_GRAD_ACCUMULATION: "warning",
    EventKind.ACCUMULATED_GRAD_DISCARDED: "warning",
    EventKind.NONFINITE_INTRODUCED: "error",
    EventKind.GRAD_NEVER_APPLIED: "warning",
    EventKind.GRAD_APPLIED_TWICE: "warning",
    EventKind.GRAD_READ_MID_WINDOW: "warning",
}
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class Location:
    """A line of the user's code."""

    filename: str
    lineno: int
    function: str
    code: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


@dataclass(frozen=True)
class Change:
    """How an edit changed a tensor's values: ‖after − before‖₂, that over ‖before‖₂, max |Δ|."""

    l2: float
    rel: float
    max_abs: float
    nonfinite: bool


@dataclass(frozen=True)
class Event:
    """One observation. Fields follow DESIGN.md; ``update_ratios`` is set on optimizer updates."""

    kind: EventKind
    severity: Severity
    step: int
    op: str
    tensor: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    device: str | None = None
    version_before: int | None = None
    version_after: int | None = None
    grad_mode: str = "no_grad"
    change: Change | None = None
    location: Location | None = None
    message: str = ""
    hint: str = ""
    rank: int = 0
    update_ratios: dict[str, float] | None = dataclasses.field(default=None, hash=False)

    @property
    def is_anomaly(self) -> bool:
        return self.severity != "info"

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity of a distinct anomaly: kind, tensor and culprit line."""
        loc = self.location
        return (self.kind, self.tensor, loc.filename if loc else None, loc.lineno if loc else None)

    def describe(self) -> str:
        where = ""
        if self.location is not None:
            where = f" at {self.location}"
            if self.location.code:
                where += f"  `{self.location.code}`"
        text = f"[gradwatch] {self.kind.value}: {self.message}{where}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, fields in declaration order (what ``gradwatch.jsonl`` holds)."""
        d = dict(self.__dict__)  # a shallow copy: the nested values are frozen or copied below
        d["kind"] = self.kind.value
        if self.shape is not None:
            d["shape"] = list(self.shape)
        if self.change is not None:
            d["change"] = dict(self.change.__dict__)
        if self.location is not None:
            d["location"] = dict(self.location.__dict__)
        if self.update_ratios is not None:
            d["update_ratios"] = dict(self.update_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output (as written to ``gradwatch.jsonl``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["kind"] = EventKind(values["kind"])
        if values.get("shape") is not None:
            values["shape"] = tuple(values["shape"])
        if isinstance(values.get("location"), dict):
            values["location"] = Location(**values["location"])
        if isinstance(values.get("change"), dict):
            values["change"] = Change(**values["change"])
        return cls(**values)
