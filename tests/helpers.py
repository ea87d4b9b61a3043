"""Small test helpers: find a marked source line, collect events of a kind."""

from __future__ import annotations

import inspect
from pathlib import Path

import gradwatch


def line_of(marker: str, filename: str | None = None) -> int:
    """Line number of the unique line containing ``# <marker>`` in the calling test file."""
    if filename is None:
        filename = inspect.stack()[1].filename
    hits = [i for i, line in enumerate(Path(filename).read_text().splitlines(), 1)
            if line.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def of_kind(w: gradwatch.Watch, kind: str) -> list[gradwatch.Event]:
    return [e for e in w.events if e.kind == kind]


def anomalies(w: gradwatch.Watch) -> list[tuple[str, str, int]]:
    return [(a.kind.value, a.tensor, a.location.lineno if a.location else -1) for a in w.anomalies]
