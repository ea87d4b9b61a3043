"""Reading a run back, and rendering distinct anomalies as text (shared by CLI and ``report()``)."""

from __future__ import annotations

from typing import Any

from .events import SEVERITY_RANK, Event

__all__ = ["format_report"]


def format_report(distinct: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """One line per distinct anomaly, worst first, then counts per kind."""
    rows = sorted(
        distinct,
        key=lambda d: (-SEVERITY_RANK[d["event"].severity], -d["count"], d["first_step"]),
    )
    lines = []
    if not rows:
        lines.append("gradwatch: no anomalies")
    else:
        lines.append(f"gradwatch: {len(rows)} distinct anomal{'y' if len(rows) == 1 else 'ies'}")
    for d in rows:
        ev: Event = d["event"]
        loc = ev.location
        where = f"{loc.filename}:{loc.lineno}" if loc else "?"
        lines.append(
            f"  {ev.severity.upper():7} {ev.kind.value:28} {ev.tensor:30} {where}  "
            f"x{d['count']} (steps {d['first_step']}-{d['last_step']})"
        )
        if loc and loc.code:
            lines.append(f"          {loc.code}")
        if ev.hint:
            lines.append(f"          hint: {ev.hint}")
    if counts:
        lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
