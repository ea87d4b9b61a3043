"""Reading a run back, and rendering findings as text (shared by CLI and ``report()``).

Findings are grouped by ``records.findings`` (one per kind and culprit line), the same rule the
watch, the TensorBoard sink and the GradWatch tab use."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._files import (
    MAX_LINE_BYTES,
    MAX_RECORD_BYTES,
    MAX_TOTAL_BYTES,
    ReadError,
    _Bounded,
    _Limits,
    _open_regular,
    _stat,
    _what,
)
from .events import SEVERITY_RANK, Event, Location
from .records.findings import Findings, event_key, row_label

__all__ = ["ReadError", "RunData", "format_report", "iter_event_file", "load_run", "worst_first"]


def format_report(distinct: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """One line per finding, worst first (severity, kind, the tensors it touched compressed,
    culprit ``file:line``, anomaly events and steps), its source line and hint under it; then
    events per kind. ``distinct``: ``Watch.distinct_anomalies()``."""
    rows = sorted(distinct, key=worst_first)
    lines = []
    if not rows:
        lines.append("gradwatch: no anomalies")
    else:
        lines.append(f"gradwatch: {len(rows)} finding{'' if len(rows) == 1 else 's'}")
    for d in rows:
        ev: Event = d["event"]
        loc = ev.location
        where = f"{loc.filename}:{loc.lineno}" if loc else "?"
        lines.append(
            f"  {ev.severity.upper():7} {ev.kind.value:28} {row_label(d):30} {where}  "
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
# Used by ``gradwatch report``; the TensorBoard plugin reads the same tags through TensorBoard's
# data provider instead (see docs/INTERNALS.md for the tag layout).
#
# Reading is bounded, whatever lies on disk: only regular files are opened (never a named pipe,
# a device or a socket: checked before opening, and again on the open descriptor, which is opened
# without blocking), a file is read up to its size when it was opened, lines and records longer
# than a limit are skipped and counted, and all files together are read up to a byte budget.

TAG_PREFIX = "gradwatch/"
TEXT_SUFFIX = "/text_summary"  # torch's SummaryWriter.add_text appends it to every text tag
ANOMALY_JSON_TAG = "gradwatch/anomaly_json"
SUMMARY_JSON_TAG = "gradwatch/summary_json"
COUNT_TAG_PREFIX = "gradwatch/count/"
_JSONL_RE = re.compile(r"^gradwatch(\.rank\d+)?\.jsonl$")
_RANK_DIR_RE = re.compile(r"^rank\d+$")

@dataclass
class RunData:
    """What :func:`load_run` found under a log dir (or in one file).

    ``distinct``: one dict per finding, like ``Watch.distinct_anomalies()`` plus ``"run"``
    (directory relative to the log dir, ``"."`` for the log dir itself) and ``"ranks"``; a
    finding of several ranks is one entry.
    ``counts``: events per kind over everything read. ``warnings``: one line per problem met
    (corrupt or truncated files, skipped lines, files that are not regular files); reading never
    raises for a bad file. ``records``: events and gradwatch tags read; ``skipped``: lines and
    records skipped as unreadable.
    """

    logdir: str
    distinct: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    records: int = 0
    skipped: int = 0

    @property
    def found(self) -> bool:
        """Whether any gradwatch file was found."""
        return bool(self.files)

    @property
    def readable(self) -> bool:
        """False when gradwatch files were found but every line or record in them was skipped."""
        return self.records > 0 or self.skipped == 0

    @property
    def has_error(self) -> bool:
        return any(d["event"].severity == "error" for d in self.distinct)

    def sorted_distinct(self) -> list[dict[str, Any]]:
        """Worst first: severity, then count, then first step."""
        return sorted(self.distinct, key=worst_first)


def worst_first(d: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key of a finding: severity, then count, then first step, then run."""
    ev: Event = d["event"]
    return (-SEVERITY_RANK[ev.severity], -d["count"], d["first_step"], d.get("run", ""))


def load_run(logdir: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES,
             max_record_bytes: int = MAX_RECORD_BYTES,
             max_total_bytes: int = MAX_TOTAL_BYTES) -> RunData:
    """Read every gradwatch file under the log dir ``logdir`` (recursively), or, when ``logdir``
    is a file, that one gradwatch file (a ``*.jsonl`` written by gradwatch, or a TensorBoard
    event file).

    ``gradwatch*.jsonl`` files (all ranks) are read first; TensorBoard event files are read only
    for directories without a jsonl file of their own (a ``rank{R}`` sub-directory is covered by
    its parent's ``gradwatch.rank{R}.jsonl``), so a run written with both is counted once. Only
    regular files are read; lines over ``max_line_bytes`` and records over ``max_record_bytes``
    are skipped (and counted in a warning); all files together are read up to
    ``max_total_bytes``. Raises :class:`ReadError` when ``logdir`` is missing, not a valid path,
    neither a directory nor a regular file, or a file that is no gradwatch file or cannot be
    opened.
    """
    limits = _Limits(max_line_bytes, max_record_bytes, max_total_bytes)
    root = os.fsdecode(logdir)
    mode = _stat(root).st_mode
    data = RunData(logdir=root)
    jsonl: list[str] = []
    event_files: dict[str, list[str]] = {}
    one_file = not stat.S_ISDIR(mode)
    if not one_file:
        _find_files(root, jsonl, event_files, data.warnings)
    elif stat.S_ISREG(mode):
        name = os.path.basename(root)
        if name.endswith(".jsonl"):
            jsonl.append(root)
        elif "tfevents" in name:
            event_files[os.path.dirname(root)] = [root]
        else:
            raise ReadError(f"{root!r} is not a directory, nor a gradwatch file "
                            "(gradwatch*.jsonl or a TensorBoard event file)")
        _open_regular(root)[0].close()  # cannot be opened: an error, not a warning
    else:
        raise ReadError(f"{root!r} is {_what(mode)}, not a directory or a regular file")
    covered = {os.path.dirname(p) for p in jsonl}
    distinct = Findings()
    counts: Counter[str] = Counter()
    runs: set[str] = set()
    for file in jsonl:
        run = "." if one_file else _run_name(root, os.path.dirname(file))
        n_files = len(data.files)
        for ev, n in _read_jsonl(file, data, limits):
            counts[ev.kind.value] += n
            if ev.is_anomaly:
                distinct.add(ev, scope=(run,))
        if len(data.files) > n_files:
            runs.add(run)
    for dirpath, files in event_files.items():
        parent = os.path.dirname(dirpath)
        if dirpath in covered or (
            _RANK_DIR_RE.match(os.path.basename(dirpath)) and parent in covered
        ):
            continue
        run = "." if one_file else _run_name(root, dirpath)
        if _read_event_dir(run, files, distinct, counts, data, limits):
            data.files.extend(files)
            runs.add(run)
    data.distinct = [{**f.to_dict(), "run": f.scope[0], "ranks": f.ranks} for f in distinct]
    data.counts = dict(counts)
    data.runs = sorted(runs)
    return data


def _find_files(root: str, jsonl: list[str], event_files: dict[str, list[str]],
                warnings: list[str]) -> None:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: warnings.append(
            f"cannot list {e.filename}: {e.strerror}")):
        dirnames.sort()
        for name in sorted(filenames):
            if _JSONL_RE.match(name):
                jsonl.append(os.path.join(dirpath, name))
            elif "tfevents" in name:
                event_files.setdefault(dirpath, []).append(os.path.join(dirpath, name))


def _run_name(root: str, dirpath: str) -> str:
    rel = os.path.relpath(dirpath, root)
    return rel.replace(os.sep, "/")


def _read_jsonl(path: str, data: RunData, limits: _Limits) -> Iterator[tuple[Event, int]]:
    """Events of one jsonl file, each with the number of events its line stands for (an info
    line's ``count``: the sink aggregates info events; 1 for an anomaly and for a line without
    one); bad and over-long lines are skipped and counted in a warning."""
    try:
        f, size = _open_regular(path)
    except ReadError as exc:
        data.warnings.append(f"{exc}; skipped")
        return
    data.files.append(path)
    bad = long = lineno = 0
    first_bad = ""
    reader = _Bounded(f, size, limits)
    with f:
        while True:
            try:
                line = reader.readline(limits.max_line + 1)
                if len(line) > limits.max_line:  # over-long: skip to the end of the line
                    if not line.endswith(b"\n"):
                        reader.skip_line()
                    lineno += 1
                    long += 1
                    continue
            except OSError as exc:
                data.warnings.append(f"{path}: read error after line {lineno} ({exc})")
                break
            if not line or (reader.cut and not reader.left and not line.endswith(b"\n")):
                break  # the end, or a line the byte budget cut (noted below)
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", errors="replace"))
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                ev = _checked(Event.from_dict(obj))
                n = 1 if ev.is_anomaly else _count_of(obj)
            except Exception as exc:
                bad += 1
                if not first_bad:
                    why = "truncated line" if not line.endswith(b"\n") else _short(exc)
                    first_bad = f"line {lineno}: {why}"
                continue
            data.records += 1
            yield ev, n
    data.skipped += bad + long
    if bad:
        data.warnings.append(
            f"{path}: skipped {bad} bad line{'s' if bad != 1 else ''} (first at {first_bad})"
        )
    if long:
        data.warnings.append(f"{path}: skipped {long} over-long line{'s' if long != 1 else ''} "
                             f"(over {limits.max_line} bytes)")
    reader.note_budget(path, data.warnings)


def _count_of(obj: dict[str, Any]) -> int:
    """An aggregated info line's ``count`` (1 when absent); raises ValueError if malformed."""
    n = obj.get("count", 1)
    if type(n) is float and n.is_integer():
        n = int(n)
    if type(n) is not int or n < 1:
        raise ValueError(f"count must be a positive integer, got {n!r}")
    return n


def _checked(ev: Event) -> Event:
    """``ev`` if its fields have the types gradwatch writes (a report must not fail on a line
    that parses but holds, say, a severity of its own); raises ValueError otherwise."""
    if ev.severity not in SEVERITY_RANK:
        raise ValueError(f"unknown severity {ev.severity!r}")
    if type(ev.step) is float and ev.step.is_integer():
        ev = dataclasses.replace(ev, step=int(ev.step))
    if type(ev.step) is not int or type(ev.rank) is not int:
        raise ValueError("step and rank must be integers")
    if not all(isinstance(v, str) for v in (ev.tensor, ev.op, ev.message, ev.hint)):
        raise ValueError("tensor, op, message and hint must be strings")
    loc = ev.location
    if loc is not None and not (
        isinstance(loc, Location) and isinstance(loc.filename, str) and type(loc.lineno) is int
        and isinstance(loc.function, str) and isinstance(loc.code, (str, type(None)))
    ):
        raise ValueError("malformed location")
    return ev


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def iter_event_file(path: str, warnings: list[str], *, limits: _Limits | None = None
                    ) -> Iterator[Any]:
    """Event protos of one TensorBoard event file (TFRecord framing), stopping with one warning
    at the first truncated or corrupt record. Data CRCs are not checked (pure-Python crc32c is
    slow); a corrupt payload shows as a proto that does not parse. Only a regular file is read,
    up to its size when opened; records over the record limit are skipped (one warning)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    if limits is None:
        limits = _Limits(MAX_LINE_BYTES, MAX_RECORD_BYTES, MAX_TOTAL_BYTES)
    try:
        f, size = _open_regular(path)
    except ReadError as exc:
        warnings.append(f"{exc}; skipped")
        return
    reader = _Bounded(f, size, limits)
    n = skipped = 0
    with f:
        while True:
            try:
                header = reader.read(12)
                if not header:
                    break
                problem = None
                if len(header) < 12:
                    problem = "truncated record header"
                else:
                    length, crc = struct.unpack("<QI", header)
                    if masked_crc32c(header[:8]) != crc:
                        problem = "corrupt record header (bad checksum)"
                    elif length + 4 > reader.left:
                        if reader.cut:  # the byte budget ends first: noted below
                            reader.skip(reader.left)
                            break
                        problem = "truncated record"
                    elif length > limits.max_record:
                        reader.skip(length + 4)
                        skipped += 1
                        continue
                    else:
                        payload = reader.read(length)
                        footer = reader.read(4)
                        if len(payload) < length or len(footer) < 4:
                            problem = "truncated record"
                        else:
                            try:
                                event = event_pb2.Event.FromString(payload)
                            except Exception as exc:
                                problem = f"corrupt record ({_short(exc)})"
            except OSError as exc:
                problem = f"read error ({exc})"
            if problem is not None:
                if reader.cut and reader.left == 0:
                    break  # the byte budget, not the file, ended here: noted below
                warnings.append(
                    f"{path}: {problem} after {n} record{'s' if n != 1 else ''}; "
                    "the rest of the file is skipped"
                )
                break
            n += 1
            yield event
    if skipped:
        warnings.append(f"{path}: skipped {skipped} over-long record{'s' if skipped != 1 else ''}"
                        f" (over {limits.max_record} bytes)")
    reader.note_budget(path, warnings)


def _read_event_dir(run: str, files: list[str], distinct: Findings, counts: Counter[str],
                    data: RunData, limits: _Limits) -> bool:
    """Merge gradwatch tags of one TensorBoard run (a directory's event files). Returns whether
    any gradwatch tag was found."""
    warnings = data.warnings
    summary: tuple[tuple[float, int], list[Any]] | None = None
    firsts: list[Event] = []
    found = False
    for path in files:
        for event in iter_event_file(path, warnings, limits=limits):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                tag = value.tag
                if not tag.startswith(TAG_PREFIX):
                    continue
                found = True
                data.records += 1
                if tag.endswith(TEXT_SUFFIX):
                    tag = tag[: -len(TEXT_SUFFIX)]
                if tag in (ANOMALY_JSON_TAG, SUMMARY_JSON_TAG):
                    text = _text_of(value)
                    try:
                        obj = json.loads(text) if text is not None else None
                        if tag == ANOMALY_JSON_TAG:
                            firsts.append(_checked(Event.from_dict(obj)))  # type: ignore[arg-type]
                        else:
                            if not isinstance(obj, list):
                                raise ValueError("expected a JSON list")
                            order = (event.wall_time, event.step)
                            if summary is None or order >= summary[0]:
                                summary = (order, obj)
                    except Exception as exc:
                        data.skipped += 1
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
                ev = _checked(Event.from_dict(item["event"]))
                for k in ("count", "first_step", "last_step"):
                    int(item[k])
                distinct.merge_event(ev, item, scope=(run,))
                seen.add(event_key(ev))
            except Exception as exc:
                warnings.append(f"{run}: skipped an unreadable summary entry ({_short(exc)})")
    firsts_seen: set[tuple[Any, ...]] = set()
    for ev in firsts:  # first occurrences the summary does not know (no clean close)
        key = event_key(ev)
        if key not in seen and (key, ev.tensor) not in firsts_seen:
            firsts_seen.add((key, ev.tensor))
            distinct.add(ev, scope=(run,))
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


# ---------------------------------------------------------------------------------------------
