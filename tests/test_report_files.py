"""``gradwatch report`` on hostile or odd input (named pipes, devices, huge lines and records,
NUL bytes, crafted fields), ``gradwatch report FILE``, the usage text, and ``gradwatch run
--fail-on``.

Reads that could hang or exhaust memory run in a child process with a timeout and a capped
address space, so that a regression fails the test instead of blocking or eating the machine."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gradwatch.cli import main
from gradwatch.events import Event, EventKind, Location
from gradwatch.report import load_run

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")

# The child: `gradwatch` with its address space capped at what it uses plus 512 MiB once
# imported (Linux), so a reader that slurps a multi-GB line fails with MemoryError.
_CHILD = textwrap.dedent("""\
    import sys
    from gradwatch.cli import main
    from gradwatch import report
    import tensorboard.compat.proto.event_pb2
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20),) * 2)
    except (ImportError, OSError, StopIteration, ValueError):
        pass
    sys.exit(main(sys.argv[1:]))
""")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``gradwatch ARGS`` in a child process; a hang fails the test after ``timeout`` s."""
    return subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _event(kind: str = "saved_tensor_mutated", step: int = 3, tensor: str = "2.weight",
           lineno: int = 12, **fields: Any) -> Event:
    kind_ = EventKind(kind)
    fields = {"message": "changed in place", "hint": "compute the loss again", **fields}
    return Event(kind=kind_, severity=kind_.severity, step=step, op="mul_", tensor=tensor,
                 location=Location("train.py", lineno, "main", "w.mul_(0.9)"), **fields)


def _line(ev: Event) -> str:
    return json.dumps(ev.to_dict()) + "\n"


def _run_lines() -> list[str]:
    """A small run: an error, a warning on two tensors, and info events."""
    return [
        _line(_event("grad_accumulated", step=0, tensor="0.weight")),
        _line(_event("stale_grad_accumulation", step=1, tensor="0.weight", lineno=20)),
        _line(_event("stale_grad_accumulation", step=1, tensor="0.bias", lineno=20)),
        _line(_event("saved_tensor_mutated", step=3)),
        _line(_event("optimizer_update", step=3, tensor="optimizer")),
    ]


def _write_run(directory: Path, name: str = "gradwatch.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(_run_lines()), encoding="utf-8")
    return path


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["report", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _anomalies(out: str) -> list[tuple[Any, ...]]:
    """The findings of ``--json`` output: kind, tensors, count, first step."""
    return sorted((a["kind"], tuple(a["tensors"]), a["count"], a["first_step"])
                  for a in json.loads(out)["anomalies"])


EXPECTED = [("saved_tensor_mutated", ("2.weight",), 1, 3),
            ("stale_grad_accumulation", ("0.weight", "0.bias"), 2, 1)]  # one line: one finding


# ------------------------------------------------------------------------ named pipes, devices
@needs_fifo
def test_a_named_pipe_given_as_the_path_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "gradwatch.jsonl"
    os.mkfifo(fifo)
    proc = _cli("report", str(fifo), timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"gradwatch report: error: {str(fifo)!r} is a named pipe (FIFO), "
                           "not a directory or a regular file\n")


@needs_fifo
@pytest.mark.parametrize("name", ["gradwatch.jsonl", "gradwatch.rank1.jsonl",
                                  "events.out.tfevents.1700000000.host.1.0"])
def test_a_named_pipe_in_a_log_dir_is_skipped_with_a_warning(tmp_path, name) -> None:
    logdir = tmp_path / "logs"
    (logdir / "pipe").mkdir(parents=True)
    fifo = logdir / "pipe" / name
    os.mkfifo(fifo)
    proc = _cli("report", str(logdir), timeout=60)  # before: blocked in open() for ever
    assert proc.returncode == 2  # nothing else to read
    assert "Traceback" not in proc.stderr
    assert (f"gradwatch report: warning: {str(fifo)!r} is a named pipe (FIFO), not a regular "
            "file; skipped\n") in proc.stderr
    assert "gradwatch report: error: no gradwatch data under" in proc.stderr
    # beside a readable run, the run is reported and the pipe only warned about
    _write_run(logdir / "ok")
    proc = _cli("report", str(logdir), "--json", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert _anomalies(proc.stdout) == EXPECTED
    assert "named pipe" in proc.stderr


@needs_dev_zero
def test_a_symlink_to_dev_zero_is_refused_not_read(tmp_path) -> None:
    link = tmp_path / "gradwatch.jsonl"
    link.symlink_to("/dev/zero")
    proc = _cli("report", str(link), timeout=60)  # before: MemoryError traceback
    assert proc.returncode == 2
    assert proc.stderr == (f"gradwatch report: error: {str(link)!r} is a character device, "
                           "not a directory or a regular file\n")
    logdir = tmp_path / "logs"
    for run in ("a", "b"):
        (logdir / run).mkdir(parents=True)
    (logdir / "a" / "gradwatch.jsonl").symlink_to("/dev/zero")
    (logdir / "b" / "events.out.tfevents.1700000000.host.1.0").symlink_to("/dev/zero")
    proc = _cli("report", str(logdir), timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert proc.stderr.count("is a character device, not a regular file; skipped") == 2


def test_a_log_dir_that_is_not_a_directory_nor_a_gradwatch_file(tmp_path, capsys) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    status, out, err = _report(capsys, str(other))
    assert (status, out) == (2, "")
    assert err == (f"gradwatch report: error: {str(other)!r} is not a directory, nor a gradwatch "
                   "file (gradwatch*.jsonl or a TensorBoard event file)\n")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_an_error(tmp_path, capsys) -> None:
    path = _write_run(tmp_path)
    path.chmod(0)
    status, _out, err = _report(capsys, str(path))
    assert status == 2 and err.startswith(f"gradwatch report: error: cannot open {str(path)!r}")


# ------------------------------------------------------------------------ NUL bytes in a path
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_nul_byte_in_the_path_is_a_one_line_error(tmp_path, capsys, json_flag) -> None:
    _write_run(tmp_path)
    bad = str(tmp_path / "gradwatch.jsonl") + "\x00.txt"
    status, out, err = _report(capsys, bad, *json_flag)
    assert (status, out) == (2, "")
    assert err == (f"gradwatch report: error: {bad!r} is not a valid path (it contains a NUL "
                   "byte)\n")


# --------------------------------------------------------------------- huge lines and records
def test_a_multi_gigabyte_line_is_skipped_and_counted(tmp_path) -> None:
    """A crafted 1 GiB line (sparse: no disk space) between two runs' worth of good lines:
    the child's address space is capped below its size, so reading it whole fails."""
    lines = _run_lines()
    path = tmp_path / "gradwatch.jsonl"
    with open(path, "wb") as f:
        f.write("".join(lines[:2]).encode())
        f.write(b'{"kind": "saved_tensor_mutated", "message": "')
        f.truncate(f.tell() + (1 << 30))
        f.seek(0, os.SEEK_END)
        f.write(b'"}\n' + "".join(lines[2:]).encode())
    proc = _cli("report", str(tmp_path), "--json")  # before: MemoryError traceback
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert _anomalies(proc.stdout) == EXPECTED
    assert (f"gradwatch report: warning: {path}: skipped 1 over-long line (over 16777216 "
            "bytes)\n") in proc.stderr
    assert json.loads(proc.stdout)["counts"]["saved_tensor_mutated"] == 1


def test_over_long_lines_are_skipped_and_counted_at_any_limit(tmp_path) -> None:
    lines = _run_lines()
    long_line = json.dumps({**_event().to_dict(), "message": "x" * 5000}) + "\n"
    path = tmp_path / "gradwatch.jsonl"
    path.write_text(lines[0] + long_line + lines[1] + long_line[:-1] + "\n" + "".join(lines[2:])
                    + "y" * 3000)  # the last one has no newline
    data = load_run(tmp_path, max_line_bytes=1024)
    assert data.counts == {"grad_accumulated": 1, "stale_grad_accumulation": 2,
                           "saved_tensor_mutated": 1, "optimizer_update": 1}
    assert data.warnings == [f"{path}: skipped 3 over-long lines (over 1024 bytes)"]
    assert data.skipped == 3 and data.records == 5


def _record(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def _event_file(directory: Path, events: list[Event]) -> Path:
    """A TensorBoard event file with gradwatch's tags, written by tensorboard's own protos."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "events.out.tfevents.1700000000.host.1.0"
    records = [_record(event_pb2.Event(wall_time=1.0, file_version="brain.Event:2")
                       .SerializeToString())]
    for i, ev in enumerate(events):
        text = tensor_pb2.TensorProto(dtype=7, string_val=[json.dumps(ev.to_dict()).encode()])
        value = summary_pb2.Summary.Value(tag="gradwatch/anomaly_json/text_summary", tensor=text)
        records.append(_record(event_pb2.Event(
            wall_time=2.0 + i, step=ev.step, summary=summary_pb2.Summary(value=[value]))
            .SerializeToString()))
    path.write_bytes(b"".join(records))
    return path


def test_a_crafted_record_length_is_not_allocated(tmp_path) -> None:
    """A record header with a valid checksum that claims a terabyte: a truncated record, not a
    MemoryError."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    path = _event_file(tmp_path, [_event()])
    header = struct.pack("<Q", 1 << 40)
    with open(path, "ab") as f:
        f.write(header + struct.pack("<I", masked_crc32c(header)) + b"x" * 64)
    proc = _cli("report", str(tmp_path), "--json")
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert [a["kind"] for a in json.loads(proc.stdout)["anomalies"]] == ["saved_tensor_mutated"]
    assert f"{path}: truncated record after 2 records; the rest of the file is skipped" in (
        proc.stderr)


def test_over_long_records_are_skipped_and_counted(tmp_path) -> None:
    big = _event(tensor="big", message="x" * 4000)
    path = _event_file(tmp_path, [_event(), big, _event(tensor="1.weight")])
    data = load_run(tmp_path, max_record_bytes=2000)
    (finding,) = data.distinct  # one kind at one line: one finding
    assert sorted(finding["tensors"]) == ["1.weight", "2.weight"]
    assert data.warnings == [f"{path}: skipped 1 over-long record (over 2000 bytes)"]


def test_the_byte_budget_stops_reading_with_a_warning(tmp_path) -> None:
    path = _write_run(tmp_path)
    size = path.stat().st_size
    data = load_run(tmp_path, max_total_bytes=size // 2)
    assert data.records < len(_run_lines())
    assert data.warnings == [f"{path}: stopped at the read limit of {size // 2} bytes over all "
                             "files; the rest is not read (counts are partial)"]
    assert data.skipped == 0  # the line the budget cut is not counted as bad


def test_max_bytes_option(tmp_path, capsys) -> None:
    path = _write_run(tmp_path)
    size = path.stat().st_size
    status, out, err = _report(capsys, str(tmp_path), "--json", "--max-bytes", str(size))
    assert status == 1 and err == "" and _anomalies(out) == EXPECTED
    status, out, err = _report(capsys, str(tmp_path), "--json", "--max-bytes", str(size - 1))
    assert "stopped at the read limit" in err
    for bad in ("0", "-5", "lots", "1Q"):
        with pytest.raises(SystemExit) as exc:
            main(["report", str(tmp_path), "--max-bytes", bad])
        assert exc.value.code == 2
        assert "--max-bytes: expected a positive number of bytes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- crafted fields
def test_lines_with_crafted_fields_are_skipped_not_fatal(tmp_path, capsys) -> None:
    good = _run_lines()
    base = _event().to_dict()
    crafted = [
        {**base, "severity": "fatal"},  # before: KeyError in the sort, a traceback
        {**base, "step": "3"},
        {**base, "step": None},
        {**base, "tensor": 5},
        {**base, "location": "train.py:12"},
        {**base, "location": {**base["location"], "lineno": "12"}},
        {**base, "rank": [0]},
    ]
    path = tmp_path / "gradwatch.jsonl"
    path.write_text("".join(good) + "".join(json.dumps(c) + "\n" for c in crafted))
    status, out, err = _report(capsys, str(tmp_path), "--json")
    assert status == 1
    assert _anomalies(out) == EXPECTED
    assert f"{path}: skipped {len(crafted)} bad lines (first at line 6: ValueError: unknown " \
           "severity 'fatal')" in err
    status, out, err = _report(capsys, str(tmp_path))
    assert status == 1 and "Traceback" not in err


def test_lone_surrogates_in_a_file_are_printed_escaped(tmp_path, capsys) -> None:
    path = tmp_path / "gradwatch.jsonl"
    text = _line(_event(tensor="w")).replace('"tensor": "w"', '"tensor": "w\\ud800"')
    path.write_text(text)
    status, out, err = _report(capsys, str(tmp_path))  # before: UnicodeEncodeError
    assert status == 1 and err == ""
    assert "w\\ud800" in out
    status, out, _ = _report(capsys, str(tmp_path), "--json")
    assert json.loads(out)["anomalies"][0]["tensor"] == "w\ud800"


def test_a_file_whose_every_line_is_unreadable_is_an_error(tmp_path, capsys) -> None:
    (tmp_path / "gradwatch.jsonl").write_text("not json\n[1, 2]\n")
    status, out, err = _report(capsys, str(tmp_path))
    assert (status, out) == (2, "")
    assert err.splitlines()[-1] == (
        f"gradwatch report: error: no readable gradwatch data in {str(tmp_path)!r}: every line "
        "or record was skipped (see the warnings above)")
    (tmp_path / "gradwatch.jsonl").write_text("")  # empty: a run without events, not an error
    status, out, err = _report(capsys, str(tmp_path))
    assert (status, err) == (0, "") and "no anomalies" in out


# --------------------------------------------------------------------- gradwatch report FILE
@pytest.mark.parametrize("name", ["gradwatch.jsonl", "gradwatch.rank1.jsonl", "run1.jsonl"])
def test_report_accepts_one_jsonl_file(tmp_path, capsys, name) -> None:
    path = _write_run(tmp_path / "logs", name)
    status, out, err = _report(capsys, str(path), "--json")
    assert (status, err) == (1, "")
    data = json.loads(out)
    assert _anomalies(out) == EXPECTED
    assert data["files"] == [str(path)] and data["runs"] == ["."]
    assert data["counts"] == {"grad_accumulated": 1, "stale_grad_accumulation": 2,
                              "saved_tensor_mutated": 1, "optimizer_update": 1}
    status, out, err = _report(capsys, str(path))
    assert status == 1
    assert out.splitlines()[0] == f"gradwatch report: {path}  (1 run, 1 file)"
    assert "saved_tensor_mutated" in out


def test_report_accepts_one_tensorboard_event_file(tmp_path, capsys) -> None:
    path = _event_file(tmp_path / "logs", [_event(), _event(tensor="1.weight", step=5)])
    _write_run(tmp_path / "logs")  # beside it, ignored: only the named file is read
    status, out, err = _report(capsys, str(path), "--json")
    assert (status, err) == (1, "")
    data = json.loads(out)
    assert data["files"] == [str(path)]
    assert _anomalies(out) == [("saved_tensor_mutated", ("2.weight", "1.weight"), 2, 3)]


# -------------------------------------------------------------------------------- usage text
def test_usage_text_shows_no_false_requirement(capsys) -> None:
    for argv in (["--help"], ["run", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: gradwatch") and "required" not in out
    assert main([]) == 2  # no command: the help, on stderr
    err = capsys.readouterr().err
    assert err.startswith("usage: gradwatch") and "required" not in err
    with pytest.raises(SystemExit) as exc:
        main(["run"])  # before: "the following arguments are required: script, args"
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("gradwatch run: error: the following arguments are required: script\n")
    with pytest.raises(SystemExit):
        main(["report"])
    assert capsys.readouterr().err.endswith("the following arguments are required: PATH\n")


def test_help_documents_report_file_and_fail_on(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: gradwatch report [-h] [--json] [--max-bytes N] PATH" in out
    assert "or one gradwatch.jsonl or TensorBoard event file" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--fail-on {error,warning}" in out


# --------------------------------------------------------------------------- run --fail-on
ERROR_SCRIPT = """\
import torch

w = torch.randn(3, requires_grad=True)
loss = (w * w).sum()  # the graph saves w
with torch.no_grad():
    w -= 0.1 * torch.ones(3)  # the culprit: an update while the graph still needs w
try:
    loss.backward()
except RuntimeError:
    print("backward failed")  # the script itself carries on and exits 0
"""

STALE_SCRIPT = """\
import torch

model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()  # zero_grad is forgotten
    opt.step()
"""

CLEAN_SCRIPT = """\
import sys
import torch

model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(2):
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
print("argv:", sys.argv[1:])
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)
"""


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *options: str,
         script_args: tuple[str, ...] = ()) -> tuple[int, str, str]:
    script = tmp_path / "train.py"
    script.write_text(text)
    logs = tmp_path / f"logs{len(list(tmp_path.iterdir()))}"
    status = main(["run", "--log-dir", str(logs), *options, str(script), *script_args])
    out, err = capsys.readouterr()
    return status, out, err


def test_fail_on_error_fails_a_run_with_an_error_finding(tmp_path, capsys) -> None:
    status, out, _err = _run(tmp_path, capsys, ERROR_SCRIPT)
    assert status == 0  # the script's own status
    assert "backward failed" in out and "saved_tensor_mutated" in out
    for severity in ("error", "warning"):
        status, out, err = _run(tmp_path, capsys, ERROR_SCRIPT, "--fail-on", severity)
        assert status == 1
        assert "saved_tensor_mutated" in err  # the report goes with the failing status
        expected = "1 finding of severity error" if severity == "error" else \
            "1 finding of severity warning or worse"
        assert err.endswith(f"gradwatch run: exit status 1 (--fail-on {severity}): {expected}\n")


def test_fail_on_warning_fails_a_forgotten_zero_grad(tmp_path, capsys) -> None:
    status, out, err = _run(tmp_path, capsys, STALE_SCRIPT, "--fail-on", "warning")
    assert status == 1
    assert "stale_grad_accumulation" in err
    assert err.endswith("gradwatch run: exit status 1 (--fail-on warning): 1 finding of "
                        "severity warning or worse\n")  # weight and bias, at one line
    status, out, err = _run(tmp_path, capsys, STALE_SCRIPT, "--fail-on", "error")
    assert status == 0  # warnings only: the script's own status
    assert "stale_grad_accumulation" in out and "--fail-on" not in err


def test_fail_on_keeps_the_scripts_own_status_without_findings(tmp_path, capsys) -> None:
    status, out, err = _run(tmp_path, capsys, CLEAN_SCRIPT, "--fail-on", "warning",
                            script_args=("3",))
    assert status == 3 and "no anomalies" in err
    # after the script's name, --fail-on is the script's own argument
    status, out, err = _run(tmp_path, capsys, CLEAN_SCRIPT, script_args=("--fail-on", "error"))
    assert status == 0 and "argv: ['--fail-on', 'error']" in out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--fail-on", "info", str(tmp_path / "train.py")])
    assert exc.value.code == 2
