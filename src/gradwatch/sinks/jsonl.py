"""``gradwatch.jsonl``: one JSON object per event, line-buffered (``gradwatch.rank{R}.jsonl``
when several ranks write)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..events import Event
from . import Sink

__all__ = ["JsonlSink", "jsonl_name"]


def jsonl_name(rank: int, world: int) -> str:
    return "gradwatch.jsonl" if world <= 1 else f"gradwatch.rank{rank}.jsonl"


class JsonlSink(Sink):
    def __init__(self, log_dir: str, rank: int = 0, world: int = 1) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, jsonl_name(rank, world))
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def _write_one(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_dict(), ensure_ascii=False, default=str) + "\n")

    def anomaly(self, event: Event) -> None:
        if not self._file.closed:
            self._write_one(event)

    def write(self, events: Sequence[Event]) -> None:
        if self._file.closed:
            return
        self._file.write(
            "".join(json.dumps(e.to_dict(), ensure_ascii=False, default=str) + "\n" for e in events)
        )

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
