"""The benchmarks must keep running: ``python -m benchmarks.overhead --quick`` (the default models,
and the loop shapes of issue 18), a one-rep ``python -m benchmarks.structure`` and
``python -m benchmarks.calls`` in subprocesses, no timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unwatched", "empty_mode", "full", "light", "anomaly", "anomaly_nan")
MODELS = ("mlp", "cnn", "gpt", "resnet18", "lightning")
TARGET_HEADER = "| model | full target | full | full ≤ ⅓ anomaly | light target | light |"


def _run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ARGS`` from ``cwd`` (the repository root on the path)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=280)


@pytest.mark.timeout(300)
def test_overhead_quick_runs_every_model_and_variant(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    out = tmp_path / "bench.json"
    proc = _run_module("overhead", ["--quick", "--threads", "1", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["quick"] is True
    assert set(data["results"]) == set(MODELS)
    for model, res in data["results"].items():
        assert res.get("error") is None, (model, res.get("error"))
        assert set(res["variants"]) == set(VARIANTS), model
        assert res["torch_calls_per_step"] > 0, model
        for variant, row in res["variants"].items():
            assert row["step_ms"] > 0, (model, variant)
            assert len(row["ratios"]) == data["config"]["reps"], (model, variant)
            assert row["peak_rss_mb"] is not None, (model, variant)
        # Every mode-based variant saw torch calls; the others none.
        assert res["variants"]["empty_mode"]["intercepted_per_step"] == res["torch_calls_per_step"]
        assert res["variants"]["full"]["intercepted_per_step"] > 0, model
        # light pushes its mode only for no_grad blocks in user code: none in these loops
        assert res["variants"]["light"]["intercepted_per_step"] >= 0, model
        assert res["variants"]["anomaly"]["intercepted_per_step"] == 0, model
    # A clean loop: gradwatch must not report anything (an anomaly here is a false positive).
    problems = [p for res in data["results"].values() for p in res["problems"]]
    assert problems == []
    # The markdown tables are printed: the results and the targets.
    assert "| model | variant |" in proc.stdout
    assert TARGET_HEADER in proc.stdout


SHAPES = ("nograd_sgd", "data_sgd", "lbfgs", "gan", "default_device", "default_device_nograd",
          "tutorial", "accum")
SHAPE_VARIANTS = ("unwatched", "empty_mode", "full", "light", "anomaly")


@pytest.fixture(scope="module")
def shapes_quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """The loop shapes of issue 18 (Lightning's is in the run above), ``--quick``: ~15 s."""
    tmp = tmp_path_factory.mktemp("shapes")
    out = tmp / "shapes.json"
    proc = _run_module("overhead", ["--quick", "--threads", "1", "--models", ",".join(SHAPES),
                                    "--variants", ",".join(SHAPE_VARIANTS), "--json", str(out)],
                       tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.timeout(300)
def test_overhead_quick_runs_every_loop_shape(shapes_quick: tuple[dict, str]) -> None:
    data, stdout = shapes_quick
    assert set(data["results"]) == set(SHAPES)
    for model, res in data["results"].items():
        assert res.get("error") is None, (model, res.get("error"))
        assert set(res["variants"]) == set(SHAPE_VARIANTS), model
        assert res["torch_calls_per_step"] > 0, model
        for variant, row in res["variants"].items():
            assert row["step_ms"] > 0, (model, variant)
            assert len(row["ratios"]) == data["config"]["reps"], (model, variant)
        assert res["variants"]["empty_mode"]["intercepted_per_step"] == res["torch_calls_per_step"]
        assert res["variants"]["full"]["intercepted_per_step"] > 0, model
    # no false positives on these clean loops (a hand-written update, L-BFGS's closure, a GAN)
    assert [p for res in data["results"].values() for p in res["problems"]] == []
    assert "| model | unwatched ms/step | full | light | empty mode |" in stdout
    assert "`DeviceContext.__torch_function__` calls per step" in stdout


@pytest.mark.timeout(300)
def test_default_device_mode_sees_no_gradwatch_call(shapes_quick: tuple[dict, str]) -> None:
    """Under ``torch.set_default_device`` every torch call goes through torch's DeviceContext
    mode; gradwatch's own tensor work must not (counted over 10 steps, a statistics step
    included): the MLP loop with an optimizer."""
    rows = shapes_quick[0]["results"]["default_device"]["variants"]
    base = rows["unwatched"]["count_mode_calls_per_step"]
    assert base == rows["empty_mode"]["count_mode_calls_per_step"] > 0
    for variant in ("full", "light", "anomaly"):
        assert rows[variant]["count_mode_calls_per_step"] == base, variant


@pytest.mark.timeout(300)
def test_default_device_mode_sees_no_gradwatch_call_in_a_handwritten_update(
        shapes_quick: tuple[dict, str]) -> None:
    """gradwatch's own reads in its write handlers run with torch functions disabled: the
    user's mode (here torch.set_default_device's) sees exactly the calls of the loop."""
    rows = shapes_quick[0]["results"]["default_device_nograd"]["variants"]
    base = rows["unwatched"]["count_mode_calls_per_step"]
    assert base > 0
    for variant in ("full", "light"):
        assert rows[variant]["count_mode_calls_per_step"] == base, variant


@pytest.mark.timeout(300)
def test_structure_benchmark_runs_every_model(tmp_path: Path) -> None:
    """``python -m benchmarks.structure`` (the shrunk-structure absolute cost): 1 rep, 10 steps."""
    full_size = tmp_path / "full.json"
    full_size.write_text(json.dumps({"results": {
        "gpt": {"variants": {"unwatched": {"step_ms": 100.0}}}}}))
    out = tmp_path / "structure.json"
    proc = _run_module("structure", ["--reps", "1", "--steps", "10", "--warmup", "1",
                                     "--full-size", str(full_size), "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"mlp", "mlp@full", "cnn", "gpt", "resnet18"}
    for row in rows.values():
        assert row["problems"] == []
        assert row["unwatched_ms"] > 0
        assert set(row) >= {"empty_mode", "light", "full"}
    assert rows["gpt"]["full_size_step_ms"] == 100.0
    assert rows["cnn"]["full_size_step_ms"] is None
    # the estimate column is Δ µs / (10 × full-size ms), in percent, for the model given
    gpt_line = next(line for line in proc.stdout.splitlines() if line.startswith("| gpt |"))
    assert gpt_line.endswith(f"| {rows['gpt']['full']['delta_us'] / 1000:+.2f}% |")


@pytest.mark.timeout(300)
def test_calls_per_step_finds_the_boundaries(tmp_path: Path) -> None:
    """``python -m benchmarks.calls`` (deterministic entries into gradwatch per step): the
    boundaries are found from what the watch installs, and counting them perturbs nothing."""
    rows = {}
    for level in ("full", "light"):
        out = tmp_path / f"calls_{level}.json"
        proc = _run_module("calls", ["--model", "mlp", "--level", level, "--steps", "10",
                                     "--warmup", "10", "--json", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        data = json.loads(out.read_text())
        assert data["perturbed"] == {} and data["anomalies"] == []
        rows[level] = {label: row["per_step"] for label, row in data["boundaries"].items()}
        assert data["functions"], level
    full, light = rows["full"], rows["light"]
    mode = [label for label in full if label.startswith("mode ")]
    assert mode and sum(full[label] for label in mode) > 0
    assert sum(light[label] for label in mode) == 0  # light pushes its mode only in user no_grad
    assert full["saved tensors pack"] == full["saved tensors unpack"] > 0
    for level in ("full", "light"):
        step_hooks = [v for label, v in rows[level].items()
                      if label.startswith("hook torch.optim.optimizer._global_optimizer_")]
        assert step_hooks == [1.0, 1.0], level
        assert sum(v for label, v in rows[level].items() if label.startswith("wrapt ")) >= 3, level


@pytest.mark.timeout(300)
def test_calls_summary_counts_the_users_mode(tmp_path: Path) -> None:
    """``python -m benchmarks.calls --models ... --levels ...``: one process per run, one table;
    under ``torch.set_default_device`` the DeviceContext's calls per step are counted, and the
    MLP loop's are the same watched as unwatched."""
    out = tmp_path / "summary.json"
    proc = _run_module("calls", ["--models", "default_device", "--levels", "none,full",
                                 "--steps", "10", "--warmup", "10", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["level"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "full"}
    assert rows["none"]["entries"] == 0 < rows["full"]["entries"]
    assert rows["none"]["user_mode"]["name"] == "DeviceContext.__torch_function__"
    assert rows["none"]["user_mode"]["per_step"] == rows["full"]["user_mode"]["per_step"] > 0
    assert "| default_device | full |" in proc.stdout


@pytest.mark.timeout(300)
def test_process_runs_the_tutorial_plain_and_under_gradwatch_run(tmp_path: Path) -> None:
    """``python -m benchmarks.process``: the published tutorial as a whole process, plain and
    under ``gradwatch run`` at both levels (one round)."""
    proc = _run_module("process", ["--runs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["plain", "full", "light"]
    assert "polynomial_autograd.py" in proc.stdout


def test_writes_benchmark_runs_both_loops_at_every_level(tmp_path: Path) -> None:
    """``python -m benchmarks.writes``: loops of no_grad writes without backward passes."""
    proc = _run_module("writes", ["--writes", "300", "--steps", "5", "--rounds", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "one line (µs per write)", "es (µs per step, 24 writes)"]
