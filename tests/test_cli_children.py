"""``gradwatch run`` follows the processes a script starts (issue 16, item 5): children of
``torch.multiprocessing.spawn`` and fork-started ``multiprocessing.Process`` are watched, each
into its own directory, and the run prints one merged report naming each finding's ranks and
processes; ``--fail-on`` counts the children's findings; DataLoader workers are not watched;
under torchrun exactly one report is printed (rank 0's, merged from every rank's file).

Real processes: ``python -m gradwatch run`` in a subprocess, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed not built"
)

SPAWN_SCRIPT = """\
import os, socket, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BUG = sys.argv[1]  # "stale", "stale+saved" or "clean"


def worker(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        if BUG == "clean":
            opt.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).mean()
        if BUG == "stale+saved" and rank == 1 and step == 1:
            model[2].weight.data.mul_(0.5)  # edits a weight the pending graph saved
        loss.backward()  # zero_grad is forgotten (unless clean)
        opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port), nprocs=2)
    print("spawned run done")
"""

FORK_SCRIPT = """\
import multiprocessing as mp
import torch


def train():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()  # zero_grad is forgotten
        opt.step()


if __name__ == "__main__":
    model = torch.nn.Linear(3, 1)  # the parent trains correctly, then forks a child
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    p = mp.get_context("fork").Process(target=train)
    p.start()
    p.join()
    print("child exit", p.exitcode)
"""

LOADER_SCRIPT = """\
import torch
from torch.utils.data import DataLoader, TensorDataset

if __name__ == "__main__":
    data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in DataLoader(data, batch_size=8, num_workers=2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    print("loader run done")
"""

TORCHRUN_SCRIPT = """\
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()  # zero_grad is forgotten
    opt.step()
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    return env


def gradwatch_run(tmp_path: Path, name: str, text: str, *args: str, flags: tuple[str, ...] = ()
                  ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    script = tmp_path / name
    script.write_text(text)
    log_dir = tmp_path / f"logs-{name}-{'-'.join(flags + args) or 'plain'}"
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", "--log-dir", str(log_dir), *flags,
         str(script), *args],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=str(tmp_path),
    )
    return proc, script, log_dir


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def table(report: str) -> list[dict[str, str]]:
    """The report's table rows as dicts keyed by the header's columns."""
    lines = report.splitlines()
    i = next(k for k, line in enumerate(lines) if line.lstrip().startswith("#  SEVERITY"))
    header = lines[i].split()
    rows = []
    for line in lines[i + 1:]:
        if not line.strip():
            break
        cells = line.split("  ")
        cells = [c.strip() for c in cells if c.strip()]
        rows.append(dict(zip(header, cells)))
    return rows


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def n_events(rows: list[dict[str, Any]], kind: str) -> int:
    """Events of ``kind`` (an info line may stand for several: its ``count``)."""
    return sum(r.get("count", 1) for r in rows if r["kind"] == kind)


# -------------------------------------------------------------------------------- mp.spawn
def test_spawned_ranks_are_followed_and_merged_into_one_report(tmp_path) -> None:
    proc, _, log_dir = gradwatch_run(tmp_path, "spawn_train.py", SPAWN_SCRIPT, "stale+saved")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("spawned run done\n")
    assert out.count("gradwatch: report") == 1
    assert "processes: main, SpawnProcess-1 (pid " in out and ", rank 0), SpawnProcess-2" in out
    rows = table(out)
    stale_line = line_of(SPAWN_SCRIPT, "zero_grad is forgotten")
    saved_line = line_of(SPAWN_SCRIPT, "edits a weight the pending graph saved")
    assert [(r["KIND"], r["TENSOR"], r["FILE:LINE"], r["RANKS"], r["PROCESSES"]) for r in rows] == [
        ("saved_tensor_mutated", "2.weight", f"spawn_train.py:{saved_line}", "1",
         "SpawnProcess-2"),
        ("stale_grad_accumulation", "{0,2}.weight, {0,2}.bias (4 tensors)",
         f"spawn_train.py:{stale_line}", "0,1", "SpawnProcess-1,SpawnProcess-2"),
    ]
    # each child wrote its own records, tagged with its rank; the parent's file has none of them
    children = sorted((log_dir / "processes").iterdir())
    assert [c.name.split(".")[0] for c in children] == ["SpawnProcess-1", "SpawnProcess-2"]
    for rank, child in enumerate(children):
        status = json.loads((child / "gradwatch.process.json").read_text())
        assert status["closed"] is True and status["rank"] == rank and status["exitcode"] == 0
        events = jsonl_rows(child / "gradwatch.jsonl")
        assert {e["rank"] for e in events} == {rank}
        assert n_events(events, "optimizer_update") == 3
    assert jsonl_rows(log_dir / "gradwatch.jsonl") == []
    # `gradwatch report` of the run's directory gives the same merged rows
    rep = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(log_dir)],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert rep.returncode == 1  # the saved-tensor write is an error
    assert [(r["KIND"], r["RANKS"]) for r in table(rep.stdout)] == [
        ("saved_tensor_mutated", "1"), ("stale_grad_accumulation", "0,1")]


@pytest.mark.parametrize(("bug", "fail_on", "status"), [
    ("stale+saved", "error", 1),  # rank 1's error, found in a child process only
    ("stale", "error", 0),  # warnings only
    ("stale", "warning", 1),
    ("clean", "warning", 0),
])
def test_fail_on_counts_the_childrens_findings(tmp_path, bug, fail_on, status) -> None:
    proc, _, _ = gradwatch_run(tmp_path, "spawn_train.py", SPAWN_SCRIPT, bug,
                               flags=("--fail-on", fail_on))
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = proc.stderr if status else proc.stdout
    assert report.count("gradwatch: report") == 1
    if bug == "clean":
        assert "no anomalies" in report and "processes: main, SpawnProcess-1" in report
    if status:
        assert f"gradwatch run: exit status 1 (--fail-on {fail_on}): " in proc.stderr


# ------------------------------------------------------------------------------------ fork
def test_a_fork_started_child_is_followed(tmp_path) -> None:
    proc, _, log_dir = gradwatch_run(tmp_path, "fork_train.py", FORK_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("child exit 0\n")
    line = line_of(FORK_SCRIPT, "zero_grad is forgotten")
    assert [(r["KIND"], r["TENSOR"], r["FILE:LINE"], r["PROCESSES"]) for r in table(proc.stdout)
            ] == [("stale_grad_accumulation", "weight, bias (2 tensors)", f"fork_train.py:{line}",
                   "ForkProcess-1")]
    # the parent's own file holds the parent's training only (the child dropped the inherited
    # watch: before, its records went into the parent's file, and the report said no anomalies)
    parent = jsonl_rows(log_dir / "gradwatch.jsonl")
    assert n_events(parent, "optimizer_update") == 2
    assert all(e["severity"] == "info" for e in parent)
    (child,) = (log_dir / "processes").iterdir()
    assert n_events(jsonl_rows(child / "gradwatch.jsonl"), "optimizer_update") == 3


# ------------------------------------------------------------------------- DataLoader workers
def test_dataloader_workers_are_not_watched(tmp_path) -> None:
    proc, _, log_dir = gradwatch_run(tmp_path, "loader_train.py", LOADER_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no anomalies" in proc.stdout and "processes:" not in proc.stdout
    assert not (log_dir / "processes").exists()
    rows = jsonl_rows(log_dir / "gradwatch.jsonl")
    assert {r["kind"] for r in rows} == {"grad_accumulated", "optimizer_update"}
    assert (n_events(rows, "grad_accumulated"), n_events(rows, "optimizer_update")) == (8, 4)


# --------------------------------------------------------------------------------- torchrun
def test_torchrun_prints_one_report_merged_from_every_rank(tmp_path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("no torchrun next to this Python")
    script = tmp_path / "ddp_train.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "gradwatch", "run",
         str(script)],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("gradwatch: report") == 1  # before: one full report per rank
    line = line_of(TORCHRUN_SCRIPT, "zero_grad is forgotten")
    (row,) = table(proc.stdout)
    assert (row["KIND"], row["TENSOR"], row["FILE:LINE"], row["COUNT"], row["RANKS"]) == (
        "stale_grad_accumulation", "weight, bias (2 tensors)", f"ddp_train.py:{line}", "8", "0,1")
    (log_dir,) = (tmp_path / "runs").iterdir()  # one directory for every rank
    assert sorted(p.name for p in log_dir.glob("gradwatch.rank*.jsonl")) == [
        "gradwatch.rank0.jsonl", "gradwatch.rank1.jsonl"]
