"""The overhead benchmark must keep running: a --quick pass in a subprocess, no timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"
VARIANTS = ("unwatched", "empty_mode", "full", "light", "anomaly", "anomaly_nan")
MODELS = ("mlp", "cnn", "gpt", "resnet18", "lightning")


@pytest.mark.timeout(300)
def test_overhead_quick_runs_every_model_and_variant(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
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
    # The markdown table is printed.
    assert "| model | variant |" in proc.stdout
    assert "Targets (issue 6)" in proc.stdout
