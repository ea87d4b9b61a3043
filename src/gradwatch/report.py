"""Reading a run back, and rendering distinct anomalies as text (shared by CLI and ``report()``)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .events import SEVERITY_RANK, Event

__all__ = ["ReadError", "RunData", "format_report", "iter_event_file", "load_run"]


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


# ---------------------------------------------------------------------------------------------
# Reading a run back: gradwatch*.jsonl (every rank) and TensorBoard event files.
# Used by ``gradwatch report`` and ``gradwatch run``; the TensorBoard plugin reads the same tags
# through TensorBoard's data provider instead (see docs/INTERNALS.md for the tag layout).

TAG_PREFIX = "gradwatch/"
TEXT_SUFFIX = "/text_summary"  # torch's SummaryWriter.add_text appends it to every text tag
ANOMALY_JSON_TAG = "gradwatch/anomaly_json"
SUMMARY_JSON_TAG = "gradwatch/summary_json"
COUNT_TAG_PREFIX = "gradwatch/count/"
_JSONL_RE = re.compile(r"^gradwatch(\.rank\d+)?\.jsonl$")
_RANK_DIR_RE = re.compile(r"^rank\d+$")


class ReadError(Exception):
    """The log dir cannot be read at all (missing, not a directory)."""


@dataclass
class RunData:
    """What :func:`load_run` found under a log dir.

    ``distinct``: one dict per distinct anomaly, like ``Watch.distinct_anomalies()`` plus
    ``"run"`` (directory relative to the log dir, ``"."`` for the log dir itself) and ``"ranks"``.
    ``counts``: events per kind over everything read. ``warnings``: one line per problem met
    (corrupt or truncated files, skipped lines); reading never raises for a bad file.
    """

    logdir: str
    distinct: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether any gradwatch file was found."""
        return bool(self.files)

    @property
    def has_error(self) -> bool:
        return any(d["event"].severity == "error" for d in self.distinct)

    def sorted_distinct(self) -> list[dict[str, Any]]:
        """Worst first: severity, then count, then first step."""
        return sorted(self.distinct, key=_worst_first)


def _worst_first(d: dict[str, Any]) -> tuple[Any, ...]:
    ev: Event = d["event"]
    return (-SEVERITY_RANK[ev.severity], -d["count"], d["first_step"], d.get("run", ""))


class _Distinct:
    """Accumulates distinct anomalies keyed by run and :attr:`Event.key`."""

    def __init__(self) -> None:
        self.items: dict[tuple[Any, ...], dict[str, Any]] = {}

    def add(self, run: str, ev: Event, count: int = 1, first: int | None = None,
            last: int | None = None) -> None:
        first = ev.step if first is None else first
        last = ev.step if last is None else last
        key = (run, *ev.key)
        d = self.items.get(key)
        if d is None:
            self.items[key] = {"event": ev, "count": count, "first_step": first,
                               "last_step": last, "run": run, "ranks": [ev.rank]}
            return
        d["count"] += count
        if first < d["first_step"]:
            d["first_step"] = first
            d["event"] = ev
        d["last_step"] = max(d["last_step"], last)
        if ev.rank not in d["ranks"]:
            d["ranks"] = sorted([*d["ranks"], ev.rank])


def load_run(logdir: str | os.PathLike[str]) -> RunData:
    """Read every gradwatch file under ``logdir`` (recursively).

    ``gradwatch*.jsonl`` files (all ranks) are read first; TensorBoard event files are read only
    for directories without a jsonl file of their own (a ``rank{R}`` sub-directory is covered by
    its parent's ``gradwatch.rank{R}.jsonl``), so a run written with both is counted once.
    Raises :class:`ReadError` when ``logdir`` is missing or not a directory.
    """
    root = os.fspath(logdir)
    if not os.path.exists(root):
        raise ReadError(f"log dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise ReadError(f"{root!r} is not a directory")
    data = RunData(logdir=root)
    jsonl: list[str] = []
    event_files: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: data.warnings.append(
            f"cannot list {e.filename}: {e.strerror}")):
        dirnames.sort()
        for name in sorted(filenames):
            if _JSONL_RE.match(name):
                jsonl.append(os.path.join(dirpath, name))
            elif "tfevents" in name:
                event_files.setdefault(dirpath, []).append(os.path.join(dirpath, name))
    covered = {os.path.dirname(p) for p in jsonl}
    distinct = _Distinct()
    counts: Counter[str] = Counter()
    runs: set[str] = set()
    for path in jsonl:
        run = _run_name(root, os.path.dirname(path))
        data.files.append(path)
        runs.add(run)
        for ev in _read_jsonl(path, data.warnings):
            counts[ev.kind.value] += 1
            if ev.is_anomaly:
                distinct.add(run, ev)
    for dirpath, files in event_files.items():
        parent = os.path.dirname(dirpath)
        if dirpath in covered or (
            _RANK_DIR_RE.match(os.path.basename(dirpath)) and parent in covered
        ):
            continue
        run = _run_name(root, dirpath)
        found = _read_event_dir(run, files, distinct, counts, data.warnings)
        if found:
            data.files.extend(files)
            runs.add(run)
    data.distinct = list(distinct.items.values())
    data.counts = dict(counts)
    data.runs = sorted(runs)
    return data


def _run_name(root: str, dirpath: str) -> str:
    rel = os.path.relpath(dirpath, root)
    return rel.replace(os.sep, "/")


def _read_jsonl(path: str, warnings: list[str]) -> Iterator[Event]:
    """Events of one jsonl file; bad lines are skipped and summarised in one warning."""
    bad = 0
    first_bad = ""
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        warnings.append(f"{path}: cannot open ({exc.strerror or exc})")
        return
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except OSError as exc:
                warnings.append(f"{path}: read error after line {lineno} ({exc})")
                break
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                ev = Event.from_dict(obj)
            except Exception as exc:
                bad += 1
                if not first_bad:
                    truncated = not line.endswith("\n")
                    why = "truncated line" if truncated else _short(exc)
                    first_bad = f"line {lineno}: {why}"
                continue
            yield ev
    if bad:
        warnings.append(
            f"{path}: skipped {bad} bad line{'s' if bad != 1 else ''} (first at {first_bad})"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def iter_event_file(path: str, warnings: list[str]) -> Iterator[Any]:
    """Event protos of one TensorBoard event file (TFRecord framing), stopping with one warning
    at the first truncated or corrupt record. Data CRCs are not checked (pure-Python crc32c is
    slow); a corrupt payload shows as a proto that does not parse."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        warnings.append(f"{path}: cannot open ({exc.strerror or exc})")
        return
    with f:
        n = 0
        while True:
            header = f.read(12)
            if not header:
                return
            problem = None
            if len(header) < 12:
                problem = "truncated record header"
            else:
                length, crc = struct.unpack("<QI", header)
                if masked_crc32c(header[:8]) != crc:
                    problem = "corrupt record header (bad checksum)"
                else:
                    payload = f.read(length)
                    footer = f.read(4)
                    if len(payload) < length or len(footer) < 4:
                        problem = "truncated record"
                    else:
                        try:
                            event = event_pb2.Event.FromString(payload)
                        except Exception as exc:
                            problem = f"corrupt record ({_short(exc)})"
            if problem is not None:
                warnings.append(
                    f"{path}: {problem} after {n} record{'s' if n != 1 else ''}; "
                    "the rest of the file is skipped"
                )
                return
            n += 1
            yield event


def _read_event_dir(run: str, files: list[str], distinct: _Distinct, counts: Counter[str],
                    warnings: list[str]) -> bool:
    """Merge gradwatch tags of one TensorBoard run (a directory's event files). Returns whether
    any gradwatch tag was found."""
    summary: tuple[tuple[float, int], list[Any]] | None = None
    firsts: list[Event] = []
    found = False
    for path in files:
        for event in iter_event_file(path, warnings):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                tag = value.tag
                if not tag.startswith(TAG_PREFIX):
                    continue
                found = True
                if tag.endswith(TEXT_SUFFIX):
                    tag = tag[: -len(TEXT_SUFFIX)]
                if tag in (ANOMALY_JSON_TAG, SUMMARY_JSON_TAG):
                    text = _text_of(value)
                    try:
                        obj = json.loads(text) if text is not None else None
                        if tag == ANOMALY_JSON_TAG:
                            firsts.append(Event.from_dict(obj))  # type: ignore[arg-type]
                        else:
                            if not isinstance(obj, list):
                                raise ValueError("expected a JSON list")
                            order = (event.wall_time, event.step)
                            if summary is None or order >= summary[0]:
                                summary = (order, obj)
                    except Exception as exc:
                        warnings.append(
                            f"{path}: skipped an unreadable {tag} at step {event.step} "
                            f"({_short(exc)})"
                        )
                elif tag.startswith(COUNT_TAG_PREFIX):
                    kind = tag[len(COUNT_TAG_PREFIX):]
                    number = _scalar_of(value)
                    if number and math.isfinite(number):
                        counts[kind] += round(number)
    seen: set[tuple[Any, ...]] = set()
    if summary is not None:
        for item in summary[1]:
            try:
                ev = Event.from_dict(item["event"])
                distinct.add(run, ev, int(item["count"]), int(item["first_step"]),
                             int(item["last_step"]))
                seen.add(ev.key)
            except Exception as exc:
                warnings.append(f"{run}: skipped an unreadable summary entry ({_short(exc)})")
    for ev in firsts:  # first occurrences the summary does not know (no clean close)
        if ev.key not in seen:
            seen.add(ev.key)
            distinct.add(run, ev)
    return found


def _text_of(value: Any) -> str | None:
    tensor = value.tensor
    if tensor.string_val:
        raw = tensor.string_val[0]
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return None


def _scalar_of(value: Any) -> float | None:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    tensor = value.tensor
    if tensor.float_val:
        return float(tensor.float_val[0])
    if tensor.double_val:
        return float(tensor.double_val[0])
    return None
