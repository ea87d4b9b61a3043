"""``gradwatch run``'s one report: the torchrun job this process belongs to, the log directory
its ranks share, and the findings of this process, the processes its script started and the
other ranks, merged (see :mod:`._children` for how child processes are followed)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

from ._children import PROCESS_DIR, STATUS_FILE
from .events import SEVERITY_RANK
from .records.findings import Findings
from .report import ReadError, RunData, load_run, worst_first

__all__ = ["RANK_WAIT_S", "Merged", "default_log_dir", "fail_on", "fold_processes",
           "join_children", "launcher_job", "mark_rank_done", "merge_processes", "merged_report"]

RANK_WAIT_S = 60.0  # how long rank 0 of a torchrun job waits for the other ranks' files


def launcher_job() -> dict[str, Any] | None:
    """This process's place in a job started by torchrun (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` set), or None. ``id`` is the same on every rank of a
    node: the launcher's pid and start time."""
    env = os.environ
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local, local_world = int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        return None
    if world < 2 or "LOCAL_RANK" not in env:
        return None
    ppid = os.getppid()
    started = _process_start(ppid)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) if started else None
    return {"rank": rank, "world": world, "local": local, "local_world": local_world,
            "id": f"torchrun-{ppid}-{stamp or 'x'}", "stamp": stamp, "ppid": ppid}


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (Linux: /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


def default_log_dir(job: dict[str, Any] | None) -> str:
    """``runs/gradwatch-<timestamp>``; under torchrun the same for every rank of a node (the
    launcher's start time and pid), so that rank 0 finds every rank's files."""
    if job is None:
        return os.path.join("runs", "gradwatch-" + time.strftime("%Y%m%d-%H%M%S"))
    return os.path.join("runs", f"gradwatch-{job['stamp'] or 'torchrun'}-{job['ppid']}")


def join_children() -> None:
    """Wait for the script's non-daemon children (Python would, at exit; their reports must be
    written before ours is read)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if not child.daemon:
            try:
                child.join()
            except Exception:
                pass


def mark_rank_done(log_dir: str, rank: int, status: int) -> None:
    try:
        with open(os.path.join(log_dir, f"gradwatch.rank{rank}.done"), "w") as f:
            json.dump({"rank": rank, "pid": os.getpid(), "status": status}, f)
    except OSError:
        pass


class Merged:
    """The run's report, merged: this process, its children, the other ranks."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.processes: list[str] = []  # "SpawnProcess-1 (pid 12, rank 0)", ...
        self.notes: list[str] = []


def merged_report(w: Any, log_dir: str, run_id: str, job: dict[str, Any] | None) -> Merged:
    merged = Merged()
    parts: list[tuple[str | None, list[dict[str, Any]]]] = []
    try:
        parts.append(("main", w.distinct_anomalies()))
        merged.counts.update(w.counts)
    except Exception as exc:  # never hide the script's own outcome behind ours
        merged.notes.append(f"could not read this process's findings ({type(exc).__name__}: {exc})")
    if job is not None:
        _other_ranks(log_dir, job, parts, merged)
    _children_parts(log_dir, run_id, parts, merged)
    merged.rows = sorted(merge_processes(parts), key=worst_first)
    if not merged.processes:  # no child: no process labels in the table
        for row in merged.rows:
            row["processes"] = []
    return merged


def _other_ranks(log_dir: str, job: dict[str, Any], parts: list[Any], merged: Merged) -> None:
    """Rank 0 of a torchrun job: wait for this node's other ranks, then read every rank's file."""
    first = job["rank"] - job["local"]
    waiting = {r for r in range(first, first + job["local_world"]) if r != job["rank"]}
    deadline = time.monotonic() + RANK_WAIT_S
    while waiting and time.monotonic() < deadline:
        waiting = {r for r in waiting
                   if not os.path.exists(os.path.join(log_dir, f"gradwatch.rank{r}.done"))}
        if waiting:
            time.sleep(0.1)
    for r in sorted(waiting):
        merged.notes.append(f"rank {r} did not finish within {RANK_WAIT_S:.0f} s: its findings "
                            "may be missing or incomplete")
    for r in range(job["world"]):
        path = os.path.join(log_dir, f"gradwatch.rank{r}.jsonl")
        if r == job["rank"] or not os.path.isfile(path):
            continue
        data = _load_quietly(path, merged)
        if data is not None:
            parts.append((None, data.distinct))
            merged.counts.update(data.counts)


def _children_parts(log_dir: str, run_id: str, parts: list[Any], merged: Merged) -> None:
    """The processes this run's script started (their own directories, see ``_children``)."""
    root = os.path.join(log_dir, PROCESS_DIR)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    found = []
    for name in names:
        try:
            with open(os.path.join(root, name, STATUS_FILE)) as f:
                status = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(status, dict) or status.get("run_id") != run_id:
            continue  # (a previous run's, in a reused --log-dir)
        found.append((float(status.get("time") or 0), name, status))
    for _, name, status in sorted(found, key=lambda item: (str(item[2].get("name")), item[0])):
        label = str(status.get("name") or name)
        rank = status.get("rank")
        merged.processes.append(f"{label} (pid {status.get('pid')}"
                                f"{f', rank {rank}' if rank is not None else ''})")
        if status.get("error"):
            merged.notes.append(f"{label}: {status['error']}")
        elif not status.get("closed"):
            merged.notes.append(f"{label} (pid {status.get('pid')}) did not close its watch "
                                "(still running, or killed): its findings may be incomplete")
        path = os.path.join(root, name)
        if not any(n.endswith(".jsonl") for n in os.listdir(path)):
            continue
        data = _load_quietly(path, merged)
        if data is not None:
            parts.append((label, data.distinct))
            merged.counts.update(data.counts)


def _load_quietly(path: str, merged: Merged) -> RunData | None:
    try:
        data = load_run(path)
    except ReadError as exc:
        merged.notes.append(str(exc))
        return None
    merged.notes.extend(data.warnings)
    return data


def fail_on(merged: Merged, severity: str) -> str | None:
    """Why ``--fail-on severity`` fails the run (its findings of that severity or worse, in
    every process), or None. A run whose findings could not be read fails too (a CI gate must
    not pass what it could not check)."""
    floor = SEVERITY_RANK[severity]
    if any(note.startswith("could not read") for note in merged.notes):
        return "could not read the run's findings"
    findings = [d for d in merged.rows
                if SEVERITY_RANK.get(d["event"].severity, floor) >= floor]
    if not findings:
        return None
    n = len(findings)
    return (f"{n} finding{'s' if n != 1 else ''} of severity {severity}"
            f"{' or worse' if severity != 'error' else ''}")


# Several processes of one run (``gradwatch run``: the script, the processes it started, the
# ranks of a torchrun job) merged into one report: one row per finding, with its ranks and the
# processes it came from.

def merge_processes(parts: list[tuple[str | None, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Merge finding rows of several processes of one run. ``parts``: (process label or None,
    rows like ``Watch.distinct_anomalies()`` or ``RunData.distinct``). Returns one row per
    finding (``run`` ``"."``) with ``ranks`` (every rank it was seen on) and ``processes`` (the
    labels of the processes it came from, in the order given; None labels are left out)."""
    findings = Findings()
    labels: dict[tuple[Any, ...], list[str]] = {}
    for label, rows in parts:
        for row in rows:
            f, _ = findings.merge_event(row["event"], row)
            for rank in row.get("ranks", ()):
                if rank not in f.ranks:
                    f.ranks = sorted([*f.ranks, rank])
            names = labels.setdefault(f.key, [])
            if label is not None and label not in names:
                names.append(label)
    return [{**f.to_dict(), "run": ".", "ranks": f.ranks, "processes": labels.get(f.key, [])}
            for f in findings]


def fold_processes(data: RunData) -> None:
    """``gradwatch report`` of a ``gradwatch run`` log dir: the rows of its child processes
    (``<run>/processes/<name>.<pid>``) are merged into their run's rows (one row per finding,
    with ``processes``), instead of one run per child."""
    parent_of: dict[str, tuple[str, str]] = {}
    for run in data.runs:
        head, _, name = run.rpartition("/")
        parent, _, folder = head.rpartition("/")
        if folder == PROCESS_DIR or (head == PROCESS_DIR and not parent):
            parent_of[run] = (parent or ".", name)
    if not parent_of:
        return
    groups: dict[str, list[tuple[str | None, list[dict[str, Any]]]]] = {}
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in data.distinct:
        by_run.setdefault(row.get("run", "."), []).append(row)
    for run in sorted(set(by_run) | {p for p, _ in parent_of.values()}):
        parent, label = parent_of.get(run, (run, "main"))
        groups.setdefault(parent, []).append((label, by_run.get(run, [])))
    merged: list[dict[str, Any]] = []
    for parent, parts in groups.items():
        merged += [{**row, "run": parent} for row in merge_processes(parts)]
    data.distinct = merged
    data.runs = sorted({parent_of.get(r, (r, ""))[0] for r in data.runs})
