"""One bug, one finding (issue 16): the anomaly events of one kind at one culprit line are one
finding with every tensor they touched, in warnings, ``report()``, ``distinct_anomalies()``,
TensorBoard and ``gradwatch report``; ``w.anomalies`` and ``gradwatch.jsonl`` keep one event
per tensor. ``records.findings`` alone: test_findings.py."""

from __future__ import annotations

import glob
import json
import os
import shutil
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import main
from gradwatch.events import Event, EventKind, Location
from gradwatch.report import format_report, load_run
from helpers import line_of

HERE = __file__


def _ev(tensor: str, step: int = 0, lineno: int | None = 10, kind: str = "stale_grad_accumulation",
        rank: int = 0) -> Event:
    k = EventKind(kind)
    loc = Location("train.py", lineno, "main", "loss.backward()") if lineno is not None else None
    return Event(kind=k, severity=k.severity, step=step, op="backward", tensor=tensor,
                 location=loc, message=f"`{tensor}.grad` is stale", hint="zero it", rank=rank)


# ------------------------------------------------------------------------------ a real model
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _forgotten_zero_grad(steps: int = 3, **options: Any) -> tuple[gradwatch.Watch, list[Any], nn.Module]:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, **options) as w:
            for _ in range(steps):
                loss = model(torch.randn(2, 5, 8)).pow(2).mean()
                loss.backward()  # <transformer-backward>
                opt.step()
    ours = [c for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    return w, ours, model


def test_a_forgotten_zero_grad_on_a_transformer_is_one_finding_one_warning_one_line() -> None:
    w, ours, model = _forgotten_zero_grad()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 72
    line = line_of("transformer-backward")
    # events stay one per tensor
    assert len(w.anomalies) == 2 * 72  # steps 1 and 2
    assert {a.tensor for a in w.anomalies} == set(names)
    # one finding, with every tensor, in the order first seen
    (d,) = w.distinct_anomalies()
    assert (d["event"].kind, d["event"].location.lineno, d["count"], d["first_step"],
            d["last_step"]) == ("stale_grad_accumulation", line, 144, 1, 2)
    assert d["tensors"] == names and d["tensor_count"] == 72
    assert d["event"] is w.anomalies[0]
    # one warning, at the backward line, naming the tensors compressed
    assert len(ours) == 1
    assert (ours[0].filename, ours[0].lineno) == (HERE, line)
    assert str(ours[0].message).startswith(
        f"[gradwatch] stale_grad_accumulation on encoder.layers.0..5.* (72 tensors) at {HERE}:{line}")
    # one report line naming them, with their number
    report = w.report()
    assert report.splitlines()[0] == "gradwatch: 1 finding"
    named = [ln for ln in report.splitlines() if "encoder.layers" in ln]
    assert len(named) == 1
    assert "stale_grad_accumulation" in named[0] and "encoder.layers.0..5.* (72 tensors)" in named[0]
    assert f"{HERE}:{line}  x144 (steps 1-2)" in named[0]
    assert len(report.splitlines()) == 5  # header, the finding, its source line, hint, counts


def test_the_warning_comes_when_the_backward_is_over_not_at_the_end() -> None:
    """The warning waits for the rest of the batch (the tensors of one backward), then comes at
    the next boundary: here the next backward (no optimizer, so no step boundary)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model) as w:
            for i in range(3):
                model(torch.randn(2, 3)).sum().backward()  # <manual-backward>
                if i == 1:  # the stale sums of this backward: their warning waits
                    assert w.counts["stale_grad_accumulation"] == 4 and not caught
                if i == 2:  # ... until the next backward
                    assert len(caught) == 1
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad  # the update, but .grad is never zeroed
    assert len(caught) == 1  # one finding, warned once
    assert caught[0].lineno == line_of("manual-backward")
    assert "stale_grad_accumulation on {0,2}.weight, {0,2}.bias (4 tensors)" in str(
        caught[0].message)
    assert len(w.distinct_anomalies()) == 1 and len(w.anomalies) == 8


def test_raise_still_raises_at_the_first_event() -> None:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(gradwatch.AnomalyError) as info, gradwatch.watch(model, opt,
                                                                          on_anomaly="raise") as w:
        for _ in range(3):
            model(torch.randn(2, 5, 8)).pow(2).mean().backward()
            opt.step()
    assert info.value.event.tensor == "encoder.layers.0.self_attn.in_proj_weight"
    assert len(w.anomalies) == 1


def test_a_gan_with_two_culprit_lines_gives_two_findings() -> None:
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.SGD(G.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch([G, D], [opt_g, opt_d]) as w:
            for _ in range(3):
                real = torch.randn(16, 2) + 1
                fake = G(torch.randn(16, 4))
                loss_d = D(fake.detach()).mean() - D(real).mean()
                loss_d.backward()  # <gan-d-backward>
                opt_d.step()
                D.requires_grad_(False)
                loss_g = -D(fake).mean()
                loss_g.backward()  # <gan-g-backward>
                D.requires_grad_(True)
                opt_g.step()
    findings = sorted(w.distinct_anomalies(), key=lambda d: d["event"].location.lineno)
    assert [(d["event"].kind, d["event"].location.lineno, d["tensors"]) for d in findings] == [
        ("stale_grad_accumulation", line_of("gan-d-backward"),
         ["D.0.weight", "D.0.bias", "D.2.weight", "D.2.bias"]),
        ("stale_grad_accumulation", line_of("gan-g-backward"),
         ["G.0.weight", "G.0.bias", "G.2.weight", "G.2.bias"]),
    ]
    ours = [c for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert sorted(c.lineno for c in ours) == [line_of("gan-d-backward"), line_of("gan-g-backward")]
    report = w.report()
    assert report.splitlines()[0] == "gradwatch: 2 findings"
    assert "  D.{0,2}.weight, D.{0,2}.bias (4 tensors) " in report
    assert "  G.{0,2}.weight, G.{0,2}.bias (4 tensors) " in report


def test_format_report_of_rows_without_tensors_names_the_event_tensor() -> None:
    """A caller's own rows (as ``distinct_anomalies()`` gave before findings) still render."""
    ev = _ev("fc.weight", step=2)
    text = format_report([{"event": ev, "count": 3, "first_step": 2, "last_step": 4}], {})
    assert "fc.weight" in text and "train.py:10  x3 (steps 2-4)" in text


# ------------------------------------------------------------------------------ read back
@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir = str(tmp_path_factory.mktemp("transformer"))
    w, _, model = _forgotten_zero_grad(log_dir=log_dir, on_anomaly="log")
    return {"log_dir": log_dir, "watch": w, "names": [n for n, _ in model.named_parameters()]}


def _finding_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "encoder.layers.0..5" in ln]


def test_gradwatch_report_shows_the_same_single_finding(transformer_run, capsys) -> None:
    log_dir, w = transformer_run["log_dir"], transformer_run["watch"]
    line = line_of("transformer-backward")
    # the jsonl keeps one event per tensor
    with open(os.path.join(log_dir, "gradwatch.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert sum(r["kind"] == "stale_grad_accumulation" for r in rows) == 144
    status, (out, err) = main(["report", log_dir]), capsys.readouterr()
    assert (status, err) == (0, "")  # a warning only
    assert "1 finding: 0 errors, 1 warning" in out
    (row,) = _finding_lines(out)
    assert row.split()[:3] == ["1", "warning", "stale_grad_accumulation"]
    assert "encoder.layers.0..5.* (72 tensors)" in row and f":{line}" in row
    assert row.split()[-3:] == ["144", "1", "2"]  # count, first, last
    assert "first: `encoder.layers.0.self_attn.in_proj_weight.grad`" in out
    status, (out, _) = main(["report", log_dir, "--json"]), capsys.readouterr()
    (a,) = json.loads(out)["anomalies"]
    assert (a["kind"], a["tensor"], a["tensor_count"], a["count"], a["first_step"],
            a["last_step"]) == ("stale_grad_accumulation", "encoder.layers.0..5.*", 72, 144, 1, 2)
    assert a["tensors"] == transformer_run["names"]
    assert a["where"] == f"{HERE}:{line}"
    (d,) = w.distinct_anomalies()
    assert a["event"] == d["event"].to_dict()


def test_gradwatch_report_from_the_event_files_alone_shows_the_same_finding(
        transformer_run, tmp_path, capsys) -> None:
    for f in glob.glob(os.path.join(transformer_run["log_dir"], "events.out.tfevents.*")):
        shutil.copy(f, tmp_path)
    data = load_run(tmp_path)
    assert data.files and not data.warnings
    (d,) = data.distinct
    assert (d["count"], d["first_step"], d["last_step"], d["tensors"], d["ranks"]) == (
        144, 1, 2, transformer_run["names"], [0])
    main(["report", str(tmp_path)])
    (row,) = _finding_lines(capsys.readouterr()[0])
    assert "encoder.layers.0..5.* (72 tensors)" in row


def test_tensorboard_text_is_written_once_per_finding(transformer_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(transformer_run["log_dir"], size_guidance={"tensors": 0})
    ea.Reload()

    def texts(tag: str) -> list[str]:
        return [t.tensor_proto.string_val[0].decode() for t in ea.Tensors(f"{tag}/text_summary")]

    (md,) = texts("gradwatch/anomaly")
    assert md.startswith("**stale_grad_accumulation** (warning) on "
                         "`encoder.layers.0.self_attn.in_proj_weight` at ")
    assert len(texts("gradwatch/anomaly_json")) == 1
    (summary,) = json.loads(texts("gradwatch/summary_json")[-1])
    assert (summary["count"], summary["tensors"], summary["tensor_count"]) == (
        144, transformer_run["names"], 72)


def test_a_summary_written_before_findings_is_grouped_on_reading(tmp_path) -> None:
    """summary_json rows of an older gradwatch (one per tensor, no "tensors"): merged into one
    finding per line when read back."""
    from torch.utils.tensorboard import SummaryWriter

    rows = [{"event": _ev(t, step=1).to_dict(), "count": 2, "first_step": 1, "last_step": 3}
            for t in ("a.weight", "a.bias")]
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_text("gradwatch/summary_json", json.dumps(rows), 3)
    (d,) = load_run(tmp_path).distinct
    assert (d["count"], d["first_step"], d["last_step"], d["tensors"]) == (
        4, 1, 3, ["a.weight", "a.bias"])
