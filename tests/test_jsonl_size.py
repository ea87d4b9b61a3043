"""``gradwatch.jsonl`` stays small (issue 17, item 7): info events are aggregated per step, kind,
op and line (a ``count`` per line), every anomaly keeps its own line, and ``gradwatch report``
counts exactly from the aggregated lines (and still reads files written one event a line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.report import load_run

STEPS = 2000
BUDGET = 1500  # bytes per step for the loop below (one event a line: ~6,700)


def _loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        x = torch.randn(4, 8, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if i % 100 == 50:  # a pass no step uses, zeroed: accumulated_grad_discarded
            opt.zero_grad()
            model(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 1)]
    return nn.Sequential(*layers)


def _report_json(path: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "gradwatch", "report", "--json", path],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


def test_a_long_run_stays_small_and_reports_exact_counts(tmp_path, clean) -> None:
    model = _model(16, 3)  # 6 tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.watch(model, opt, log_dir=str(tmp_path)) as w:
            _loop(model, opt, STEPS)
    size = os.path.getsize(tmp_path / "gradwatch.jsonl")
    assert size / STEPS < BUDGET, f"{size / STEPS:.0f} bytes per step"
    distinct = w.distinct_anomalies()
    assert distinct and sum(d["count"] for d in distinct) == 20 * 6  # 6 tensors, 20 times
    report = _report_json(str(tmp_path))
    got = {(a["kind"], a["where"], a["count"], a["first_step"], a["last_step"])
           for a in report["anomalies"]}
    want = {(d["event"].kind.value, f"{d['event'].location.filename}:"
             f"{d['event'].location.lineno}", d["count"], d["first_step"], d["last_step"])
            for d in distinct}
    assert got == want
    assert report["counts"] == w.counts  # info counts exact too, from the `count` fields
    lines = [json.loads(x) for x in (tmp_path / "gradwatch.jsonl").read_text().splitlines()]
    anomalies = [x for x in lines if x["severity"] != "info"]
    assert len(anomalies) == sum(w.counts[k] for k in w.counts
                                 if k == "accumulated_grad_discarded") == 120  # each its line
    assert all("count" not in x for x in anomalies)
    assert clean() == {}


def test_the_size_per_step_does_not_grow_with_the_number_of_tensors(tmp_path) -> None:
    sizes = []
    for depth in (3, 30):  # 6 and 60 tensors
        model = _model(4, depth)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        d = tmp_path / str(depth)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradwatch.watch(model, opt, log_dir=str(d), stats_every=1000) as w:
                _loop(model, opt, 40)
        assert load_run(str(d)).counts == w.counts
        sizes.append(os.path.getsize(d / "gradwatch.jsonl"))
    assert sizes[1] < 1.3 * sizes[0], sizes


def test_report_still_reads_files_written_one_event_a_line(tmp_path) -> None:
    event = {"kind": "grad_accumulated", "severity": "info", "step": 0, "op": "backward",
             "tensor": "w", "message": "", "hint": "", "rank": 0}
    lines = [dict(event, step=s) for s in range(3)]
    lines.append(dict(event, step=3, count=5))
    lines.append({**event, "kind": "accumulated_grad_discarded", "severity": "warning",
                  "count": 99})  # an anomaly is one event, whatever a crafted line says
    (tmp_path / "gradwatch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = load_run(str(tmp_path))
    assert data.counts == {"grad_accumulated": 8, "accumulated_grad_discarded": 1}
    assert [d["count"] for d in data.distinct] == [1]


@pytest.mark.parametrize("count", [0, -1, 1.5, "2", None])
def test_a_malformed_count_skips_its_line(tmp_path, count) -> None:
    line = {"kind": "grad_accumulated", "severity": "info", "step": 0, "op": "backward",
            "tensor": "w", "count": count}
    (tmp_path / "gradwatch.jsonl").write_text(json.dumps(line) + "\n")
    data = load_run(str(tmp_path))
    assert data.counts == {} and data.skipped == 1
