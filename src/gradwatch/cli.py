"""The ``gradwatch`` command line (also ``python -m gradwatch``).

Example usage::

    gradwatch run train.py --epochs 3          # run an unmodified script under watch()
    gradwatch run --log-dir runs/a train.py    # choose where the logs go
    gradwatch run --fail-on warning train.py   # exit 1 if the run had a warning or an error
    gradwatch report runs/a                    # table of findings; exit 1 on an error
    gradwatch report runs/a/gradwatch.jsonl    # one file
    gradwatch report runs/ --json              # the same, for machines

Exit status of ``report``: 0 (no anomaly of severity error), 1 (at least one), 2 (the path is
missing, unreadable, not a directory or a regular file, or holds no readable gradwatch data).
``run`` passes the script's own exit status through (an uncaught exception gives 1, after the
traceback and the report), except that ``--fail-on SEVERITY`` gives 1 when the run had a
finding of that severity or worse.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

from ._run_merge import (
    Merged,
    default_log_dir,
    fail_on,
    fold_processes,
    join_children,
    launcher_job,
    mark_rank_done,
    merged_report,
)
from .events import SEVERITY, SEVERITY_RANK, Event, EventKind
from .records.findings import compress_names, row_label, row_tensors
from .report import (
    MAX_TOTAL_BYTES,
    ReadError,
    RunData,
    load_run,
)

__all__ = ["format_table", "main"]

EXIT_OK = 0
EXIT_ANOMALY = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "report":
            return _cmd_report(args)
        return _cmd_run(args)
    except BrokenPipeError:  # `gradwatch report runs | head`: stop quietly, like cat
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Name the line that silently corrupts your gradients.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,report}")
    rep = sub.add_parser(
        "report",
        help="summarise the anomalies found in a log dir or a gradwatch file",
        description="Print the findings in PATH (one per kind and culprit line, with the "
        "tensors it touched), worst first: a log dir "
        "(gradwatch*.jsonl of every rank and TensorBoard event files, searched recursively) or "
        "one such file. Only regular files are read; over-long lines and records are skipped "
        "with a warning. Exit status 1 when an anomaly of severity error is present, 2 when "
        "PATH is missing or unreadable (a named pipe, a device), or holds no readable "
        "gradwatch data, else 0.",
    )
    rep.add_argument("logdir", metavar="PATH",
                     help="a log dir written by gradwatch.watch(log_dir=...), or one "
                     "gradwatch.jsonl or TensorBoard event file in it")
    rep.add_argument("--json", action="store_true", help="print one JSON object instead")
    rep.add_argument("--max-bytes", type=_size, default=MAX_TOTAL_BYTES, metavar="N",
                     help="read at most N bytes over all files (suffixes K, M, G, T; default: "
                     f"{MAX_TOTAL_BYTES >> 30}G); past it the report is partial, with a warning")
    run = sub.add_parser(
        "run",
        help="run a training script under gradwatch.watch()",
        description="Run an unmodified Python script as __main__ under gradwatch.watch(), then "
        "print the report. The script's exit status is passed through; with --fail-on, a run "
        "that had a finding of that severity or worse exits with status 1.",
    )
    run.add_argument("--log-dir", default=None,
                     help="where to write gradwatch.jsonl and TensorBoard event files "
                     "(default: runs/gradwatch-<timestamp>)")
    run.add_argument("--level", choices=("full", "light"), default="full",
                     help="interception level (default: full)")
    run.add_argument("--on-anomaly", choices=("log", "warn", "raise"), default="log",
                     help="what to do at an anomaly (default: log)")
    run.add_argument("--fail-on", choices=("error", "warning"), default=None,
                     help="exit with status 1 when the run had a finding of this severity or "
                     "worse (default: the script's own exit status)")
    run.add_argument("script", help="the Python script to run")
    rest = run.add_argument("args", nargs=argparse.REMAINDER,
                            help="arguments passed to the script (optional)")
    rest.required = False  # argparse makes REMAINDER required: "required: script, args"
    return parser


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """``--max-bytes``: a positive number of bytes, with an optional K, M, G or T suffix."""
    raw = text.strip().upper().removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _SUFFIXES else ""
    try:
        value = int(raw[: len(raw) - len(unit)]) * _SUFFIXES[unit]
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return value


# ------------------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    try:
        data = load_run(args.logdir, max_total_bytes=args.max_bytes)
    except ReadError as exc:
        print(f"gradwatch report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in data.warnings:
        print(f"gradwatch report: warning: {line}", file=sys.stderr)
    fold_processes(data)  # a `gradwatch run` dir: its child processes' rows join its own
    if not data.found:
        print(
            f"gradwatch report: error: no gradwatch data under {args.logdir!r} (looked for "
            "gradwatch*.jsonl and TensorBoard event files with gradwatch/ tags)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not data.readable:
        print(f"gradwatch report: error: no readable gradwatch data in {args.logdir!r}: every "
              "line or record was skipped (see the warnings above)", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_ANOMALY if data.has_error else EXIT_OK
    if args.json:  # ASCII only: lone surrogates from a crafted file are escaped
        json.dump(_as_json(data, status), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        text = format_table(data.sorted_distinct(), data.counts, title=_title(data))
        sys.stdout.write(_printable(text, sys.stdout))
    return status


def _printable(text: str, stream: TextIO) -> str:
    """``text`` with what ``stream`` cannot encode (undecodable path bytes, lone surrogates
    from a crafted file) as backslash escapes, instead of a UnicodeEncodeError."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "surrogateescape").decode(encoding, "backslashreplace")
    except (UnicodeError, LookupError):
        return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def _title(data: RunData) -> str:
    runs = len(data.runs)
    files = len(data.files)
    return (f"gradwatch report: {data.logdir}  ({runs} run{'s' if runs != 1 else ''}, "
            f"{files} file{'s' if files != 1 else ''})")


def _as_json(data: RunData, status: int) -> dict[str, Any]:
    return {
        "logdir": data.logdir,
        "runs": data.runs,
        "files": data.files,
        "status": status,
        "has_error": data.has_error,
        "anomalies": [
            {
                "run": d["run"],
                "ranks": d["ranks"],
                **({"processes": d["processes"]} if d.get("processes") else {}),
                "kind": d["event"].kind.value,
                "severity": d["event"].severity,
                **_tensors(d),
                "where": _where(d["event"], relative=False),
                "count": d["count"],
                "first_step": d["first_step"],
                "last_step": d["last_step"],
                "event": d["event"].to_dict(),
            }
            for d in data.sorted_distinct()
        ],
        "counts": dict(sorted(data.counts.items())),
        "warnings": data.warnings,
    }


def _tensors(d: dict[str, Any]) -> dict[str, Any]:
    """A finding's tensors for ``--json``: ``tensor`` (compressed, e.g. ``layers.0..5.*``),
    ``tensors`` (the names, in order; the first 1,000) and ``tensor_count``."""
    names, count = row_tensors(d, d["event"].tensor)
    count = len(names) if count is None else count
    return {"tensor": compress_names(names, count), "tensors": names, "tensor_count": count}


def _where(ev: Event, relative: bool = True) -> str:
    loc = ev.location
    if loc is None:
        return "?"
    name = loc.filename
    if relative and os.path.isabs(name):
        try:
            rel = os.path.relpath(name)
        except ValueError:  # another drive (Windows)
            rel = name
        if not rel.startswith(".."):
            name = rel
    return f"{name}:{loc.lineno}"


def format_table(distinct: list[dict[str, Any]], counts: dict[str, int], *,
                 title: str | None = None) -> str:
    """Render findings (already sorted) as a terminal table (one row per finding: its tensors
    compressed, culprit line, anomaly events, first and last step), then per-row details
    (source line, message of the first event, hint) and the number of events per kind."""
    out: list[str] = []
    if title:
        out.append(title)
    n_err = sum(1 for d in distinct if d["event"].severity == "error")
    n_warn = len(distinct) - n_err
    if not distinct:
        out.append("no anomalies")
    else:
        noun = "finding" if len(distinct) == 1 else "findings"
        out.append(f"{len(distinct)} {noun}: {n_err} error{'s' if n_err != 1 else ''}, "
                   f"{n_warn} warning{'s' if n_warn != 1 else ''}")
        show_run = len({d.get("run", ".") for d in distinct}) > 1
        show_ranks = any(d.get("ranks", [0]) != [0] for d in distinct)
        show_procs = any(d.get("processes") for d in distinct)
        header = ["#", "SEVERITY", "KIND", "TENSOR", "FILE:LINE", "COUNT", "FIRST", "LAST"]
        if show_run:
            header.append("RUN")
        if show_ranks:
            header.append("RANKS")
        if show_procs:
            header.append("PROCESSES")
        rows = [header]
        for i, d in enumerate(distinct, 1):
            ev: Event = d["event"]
            row = [str(i), ev.severity, ev.kind.value, row_label(d), _where(ev), str(d["count"]),
                   str(d["first_step"]), str(d["last_step"])]
            if show_run:
                row.append(d.get("run", "."))
            if show_ranks:
                row.append(",".join(str(r) for r in d.get("ranks", [0])))
            if show_procs:
                row.append(",".join(d.get("processes") or ["-"]))
            rows.append(row)
        right = {0, 5, 6, 7}
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        out.append("")
        for r in rows:
            cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c])
                     for c in range(len(r))]
            out.append("  ".join(cells).rstrip())
        out.append("")
        for i, d in enumerate(distinct, 1):
            ev = d["event"]
            out.append(f"{str(i).rjust(widths[0])}  {_where(ev)}  {ev.kind.value} ({ev.severity})")
            pad = " " * (widths[0] + 2)
            if ev.location is not None and ev.location.code:
                out.append(f"{pad}    {ev.location.code}")
            if ev.message:
                several = row_tensors(d, ev.tensor)[0][1:]
                out.append(f"{pad}{'first: ' if several else ''}{ev.message}")
            if ev.hint:
                out.append(f"{pad}hint: {ev.hint}")
    if counts:
        out.append("")
        out.append("events per kind:")
        width = max(len(k) for k in counts)
        for kind, n in sorted(counts.items(), key=_kind_order):
            sev = _severity_of(kind)
            out.append(f"  {kind.ljust(width)}  {str(n).rjust(7)}  {sev}")
    return "\n".join(out) + "\n"


def _severity_of(kind: str) -> str:
    try:
        return SEVERITY[EventKind(kind)]
    except ValueError:
        return "?"


def _kind_order(item: tuple[str, int]) -> tuple[int, str]:
    sev = _severity_of(item[0])
    return (-SEVERITY_RANK.get(sev, -1), item[0])


# ---------------------------------------------------------------------------------------- run
def _cmd_run(args: argparse.Namespace) -> int:
    script = args.script
    if not os.path.isfile(script):
        print(f"gradwatch run: error: cannot find script {script!r}", file=sys.stderr)
        return EXIT_USAGE
    job = launcher_job()
    log_dir = args.log_dir or default_log_dir(job)
    from . import _children, watch

    try:
        w = watch(log_dir=log_dir, level=args.level, on_anomaly=args.on_anomaly)
        w.shared = True  # a watch() or GradWatchCallback in the script joins this one
    except (ValueError, TypeError) as exc:
        print(f"gradwatch run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_id = job["id"] if job else uuid.uuid4().hex
    _children.follow(log_dir, args.level, args.on_anomaly, run_id)
    try:
        status = _run_script(w, script, list(args.args))
        join_children()
    finally:
        _children.unfollow()
    if job and job["rank"] != 0:  # rank 0 prints the one report, merged from every rank's files
        mark_rank_done(log_dir, job["rank"], status)
        return status
    merged = merged_report(w, log_dir, run_id, job)
    failing = fail_on(merged, args.fail_on) if args.fail_on else None
    _print_run_report(merged, log_dir, sys.stderr if status or failing else sys.stdout)
    if failing:
        print(f"gradwatch run: exit status {EXIT_ANOMALY} (--fail-on {args.fail_on}): {failing}",
              file=sys.stderr)
        return EXIT_ANOMALY
    return status


def _run_script(w: Any, script: str, script_args: list[str]) -> int:
    """Run ``script`` as ``__main__`` under ``w``; return its exit status."""
    path = os.path.abspath(script)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(path))
    status = EXIT_OK
    try:
        with w:
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        status = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:
        # The script's own traceback; gradwatch's diagnosis is in the exception's notes.
        etype, value, tb = sys.exc_info()
        # Drop our frames (this function and runpy) so the traceback starts in the script.
        while tb is not None and not _is_script_frame(tb, path):
            tb = tb.tb_next
        traceback.print_exception(etype, value, tb)
        status = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        sys.stdout.flush()
    return status


def _is_script_frame(tb: Any, path: str) -> bool:
    return os.path.abspath(tb.tb_frame.f_code.co_filename) == path


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1, like python
    return 1


def _print_run_report(merged: Merged, log_dir: str, stream: TextIO) -> None:
    try:
        text = format_table(merged.rows, dict(merged.counts), title="gradwatch: report")
        if merged.processes:
            text = text.replace("gradwatch: report\n", "gradwatch: report\nprocesses: main, "
                                + ", ".join(merged.processes) + "\n", 1)
    except Exception as exc:  # never hide the script's own outcome behind ours
        text = f"gradwatch: could not build the report ({type(exc).__name__}: {exc})\n"
    stream.write("\n" + text)
    for note in merged.notes:
        stream.write(f"gradwatch run: warning: {note}\n")
    stream.write(f"logs: {log_dir}  (gradwatch report {log_dir}; "
                 f"tensorboard --logdir {log_dir})\n")
    stream.flush()
