"""Two processes (gloo on CPU): only rank 1 has a bug; its anomaly is reported by rank 1, tagged
rank=1, in rank 1's outputs; DDP's own broadcasts and gradient averaging raise nothing.

The scripts run in a subprocess: Lightning's ``ddp`` launcher re-runs the command line for rank
1, which inside pytest would re-run the whole test selection.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.sinks.tensorboard import ANOMALY_KINDS

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed not built"
)

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ddp_scripts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(name: str, *args: str, timeout: float = 120) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "NODE_RANK", "PL_GLOBAL_SEED")}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def line_of(path: str, marker: str) -> int:
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# {marker}"):
                return i
    raise AssertionError(marker)


def jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def anomaly_rows(path: str) -> list[tuple[Any, ...]]:
    return [(r["kind"], r["tensor"], r["location"]["filename"], r["location"]["lineno"], r["step"],
             r["rank"]) for r in jsonl(path) if r["severity"] != "info"]


def read(log_dir: str) -> EventAccumulator:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def anomaly_texts(ea: EventAccumulator) -> list[dict[str, Any]]:
    return [json.loads(e.tensor_proto.string_val[0])
            for e in ea.Tensors("gradwatch/anomaly_json/text_summary")]


@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_plain_ddp_only_rank1_reports_its_bug(tmp_path, mode):
    """``inside``: the watch also sees DistributedDataParallel's construction (the initial
    broadcast of parameters and buffers, which differ between ranks here)."""
    script = os.path.join(SCRIPTS, "plain_ddp.py")
    run_script("plain_ddp.py", str(tmp_path), str(free_port()), mode)
    results = {r: json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)}
    bug = ("saved_tensor_mutated", "l2.weight", script, line_of(script, "BUG"), 2, 1)
    for rank, res in results.items():
        assert res["rank"] == rank
        assert res["counts"]["optimizer_update"] == 4
        assert res["counts"]["grad_accumulated"] == 4 * 6
        # rank 1's bug only: BatchNorm's num_batches_tracked update (grad on) and DDP's own
        # writes are not edits under no_grad
        assert res["counts"].get("inplace_no_grad", 0) == (rank == 1)
    assert results[0]["anomalies"] == []
    assert not set(results[0]["counts"]) & set(ANOMALY_KINDS)
    assert [(a["kind"], a["tensor"], a["location"]["filename"], a["location"]["lineno"], a["step"],
             a["rank"]) for a in results[1]["anomalies"]] == [bug]
    assert results[0]["same_weights"] and not results[1]["same_weights"]  # the bug is real
    # outputs: one jsonl per rank, rank 1's TensorBoard run under rank1/
    assert anomaly_rows(str(tmp_path / "gradwatch.rank0.jsonl")) == []
    assert anomaly_rows(str(tmp_path / "gradwatch.rank1.jsonl")) == [bug]
    assert not (tmp_path / "gradwatch.jsonl").exists()
    rank1 = read(str(tmp_path / "rank1"))
    assert [(a["kind"], a["rank"], a["location"]["lineno"]) for a in anomaly_texts(rank1)] == [
        ("saved_tensor_mutated", 1, bug[3])]
    assert [(e.step, e.value) for e in rank1.Scalars("gradwatch/anomalies")] == [
        (0, 0.0), (1, 0.0), (2, 1.0), (3, 0.0)]
    rank0 = read(str(tmp_path))
    assert "gradwatch/anomaly_json/text_summary" not in rank0.Tags()["tensors"]
    assert [e.value for e in rank0.Scalars("gradwatch/anomalies")] == [0.0] * 4


def lightning_package() -> str:
    """One package is enough here (both are tested in-process in test_lightning.py)."""
    for package in ("lightning", "pytorch_lightning"):
        if importlib.util.find_spec(package) is not None:
            return package
    pytest.skip("neither lightning nor pytorch_lightning is installed")


def test_lightning_ddp_only_rank1_reports_its_bug(tmp_path):
    package = lightning_package()
    script = os.path.join(SCRIPTS, "lightning_ddp.py")
    run_script("lightning_ddp.py", str(tmp_path), str(free_port()), package)
    results = {r: json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)}
    log_dir = str(tmp_path / "lightning_logs" / "version_0")
    bug = ("saved_tensor_mutated", "l2.weight", script, line_of(script, "BUG"), 2, 1)
    for rank, res in results.items():
        assert (res["rank"], res["watch_rank"], res["output_dir"]) == (rank, rank, log_dir)
        assert res["counts"]["optimizer_update"] == 4
        assert res["counts"]["grad_accumulated"] == 4 * 6
        assert res["counts"].get("inplace_no_grad", 0) == (rank == 1)  # the bug's edit only
    assert results[0]["anomalies"] == [] and not set(results[0]["counts"]) & set(ANOMALY_KINDS)
    assert [(a["kind"], a["tensor"], a["location"]["filename"], a["location"]["lineno"], a["step"],
             a["rank"]) for a in results[1]["anomalies"]] == [bug]
    assert anomaly_rows(os.path.join(log_dir, "gradwatch.rank0.jsonl")) == []
    assert anomaly_rows(os.path.join(log_dir, "gradwatch.rank1.jsonl")) == [bug]
    # rank 0 wrote into the TensorBoardLogger's run; rank 1 (whose experiment is a dummy) its own
    rank0 = read(log_dir)
    assert "gradwatch/anomaly_json/text_summary" not in rank0.Tags()["tensors"]
    assert [(e.step, e.value) for e in rank0.Scalars("gradwatch/anomalies")] == [
        (s, 0.0) for s in range(4)]
    rank1 = read(os.path.join(log_dir, "rank1"))
    assert [(a["kind"], a["rank"], a["step"], a["location"]["lineno"])
            for a in anomaly_texts(rank1)] == [("saved_tensor_mutated", 1, 2, bug[3])]
    assert [(e.step, e.value) for e in rank1.Scalars("gradwatch/anomalies")] == [
        (0, 0.0), (1, 0.0), (2, 1.0), (3, 0.0)]
    # and `gradwatch report`-style readers can rebuild the events
    assert gradwatch.Event.from_dict(results[1]["anomalies"][0]).rank == 1
