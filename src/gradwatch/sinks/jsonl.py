"""``gradwatch.jsonl``: one JSON object per event, line-buffered (``gradwatch.rank{R}.jsonl``
when several ranks write)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..events import Event
from . import Sink

__all__ = ["JsonlSink", "jsonl_name"]


# One encoder for every line (json.dumps with options builds a new encoder per call).
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


def jsonl_name(rank: int, world: int) -> str:
    return "gradwatch.jsonl" if world <= 1 else f"gradwatch.rank{rank}.jsonl"


class JsonlSink(Sink):
    def __init__(self, log_dir: str, rank: int = 0, world: int = 1) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, jsonl_name(rank, world))
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def _write_one(self, event: Event) -> None:
        self._file.write(_encode(event.to_dict()) + "\n")

    def anomaly(self, event: Event) -> None:
        if not self._file.closed:
            self._write_one(event)

    def write(self, events: Sequence[Event]) -> None:
        if self._file.closed:
            return
        self._file.write(
            "".join(_encode(e.to_dict()) + "\n" for e in events)
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
