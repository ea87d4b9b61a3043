"""TensorBoardSink: the tag layout of docs/INTERNALS.md, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch import Watch, watch
from gradwatch.config import Config
from gradwatch.sinks.tensorboard import ANOMALY_KINDS, KINDS, TensorBoardSink

HERE = os.path.abspath(__file__)
COUNT_TAGS = {f"gradwatch/count/{k}" for k in KINDS}
DEFAULT_SCALARS = COUNT_TAGS | {
    "gradwatch/anomalies", "gradwatch/overhead_ms", "gradwatch/update_ratio/max",
    "gradwatch/update_ratio/median", "gradwatch/update_ratio/min",
}
PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]


def read(log_dir: str) -> EventAccumulator:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def texts(ea: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(f"{tag}/text_summary")]


def line_of(marker: str) -> int:
    with open(HERE) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# {marker}") and "def line_of" not in line:
                return i
    raise AssertionError(marker)


def net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, bug_at: int | None = None,
          on_step=None) -> None:
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        x = torch.randn(3, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        if i == bug_at:
            model[2].weight.data.mul_(0.5)  # BUG-SILENT
        loss.backward()
        opt.step()


def test_tag_layout_of_a_watched_loop(tmp_path):
    d = str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with watch(m, opt, log_dir=d, on_anomaly="log", stats_every=2) as w:
        train(m, opt, steps=5, bug_at=3)
    assert [(a.kind, a.tensor, a.location.lineno) for a in w.anomalies] == [
        ("saved_tensor_mutated", "2.weight", line_of("BUG-SILENT"))
    ]
    ea = read(d)
    tags = ea.Tags()
    assert set(tags["scalars"]) == DEFAULT_SCALARS
    assert tags["histograms"] == ["gradwatch/update_ratios"]
    assert set(tags["tensors"]) == {
        "custom_scalars__config__", "gradwatch/anomaly/text_summary",
        "gradwatch/anomaly_json/text_summary", "gradwatch/summary_json/text_summary",
        "gradwatch/update_ratios_json",
    }
    # per step counts, at the step the events belong to (0-based, as the events' own step)
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(s, 1.0) for s in range(5)]
    assert scalars(ea, "gradwatch/count/grad_accumulated") == [(s, 4.0) for s in range(5)]
    assert scalars(ea, "gradwatch/anomalies") == [(0, 0), (1, 0), (2, 0), (3, 1.0), (4, 0)]
    assert scalars(ea, "gradwatch/count/saved_tensor_mutated") == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 0)]
    for kind in set(ANOMALY_KINDS) - {"saved_tensor_mutated"}:
        assert scalars(ea, f"gradwatch/count/{kind}") == [(s, 0.0) for s in range(5)]
    assert all(v >= 0 for _, v in scalars(ea, "gradwatch/overhead_ms"))
    # statistics steps 0, 2, 4 (stats_every=2)
    assert [s for s, _ in scalars(ea, "gradwatch/update_ratio/max")] == [0, 2, 4]
    per_step = {e.step: json.loads(e.tensor_proto.string_val[0])
                for e in ea.Tensors("gradwatch/update_ratios_json")}
    assert sorted(per_step) == [0, 2, 4]
    assert ea.SummaryMetadata("gradwatch/update_ratios_json").plugin_data.plugin_name == "gradwatch"
    for s, mx in scalars(ea, "gradwatch/update_ratio/max"):
        assert list(per_step[s]["ratios"]) == PARAMS
        per_param = [per_step[s]["ratios"][p] for p in PARAMS]
        assert mx == pytest.approx(max(per_param))
        assert dict(scalars(ea, "gradwatch/update_ratio/min"))[s] == pytest.approx(min(per_param))
    assert [h.step for h in ea.Histograms("gradwatch/update_ratios")] == [0, 2, 4]
    assert ea.Histograms("gradwatch/update_ratios")[0].histogram_value.num == len(PARAMS)
    # the anomaly as markdown and as JSON, at the anomaly's step
    (step, md), = texts(ea, "gradwatch/anomaly")
    assert step == 3
    assert md.startswith(f"**saved_tensor_mutated** (error) on `2.weight` at `{HERE}:"
                         f"{line_of('BUG-SILENT')}`")
    assert "model[2].weight.data.mul_(0.5)" in md and "*hint:*" in md
    (step, js), = texts(ea, "gradwatch/anomaly_json")
    assert step == 3
    assert gradwatch.Event.from_dict(json.loads(js)) == w.anomalies[0]
    (step, summary), = texts(ea, "gradwatch/summary_json")
    rows = json.loads(summary)
    assert [(r["event"]["kind"], r["event"]["tensor"], r["count"], r["first_step"], r["last_step"])
            for r in rows] == [("saved_tensor_mutated", "2.weight", 1, 3, 3)]
    # the custom-scalars layout, with a "gradwatch" category
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "gradwatch"
    charted = {tag for chart in category.chart for tag in chart.multiline.tag}
    assert COUNT_TAGS | {"gradwatch/anomalies", "gradwatch/overhead_ms"} <= charted


def test_every_n_steps_sums_counts_between_logged_steps(tmp_path):
    d = str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sink = TensorBoardSink(log_dir=d, every_n_steps=3)
    with Watch(Config.build(m, opt, on_anomaly="log"), sinks=[sink]):
        train(m, opt, steps=7)
    ea = read(d)
    # steps 0..6: written at 0, 3 (steps 1-3) and 6 (steps 4-6); nothing is lost in between
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(0, 1.0), (3, 3.0), (6, 3.0)]
    assert scalars(ea, "gradwatch/count/grad_accumulated") == [(0, 4.0), (3, 12.0), (6, 12.0)]
    assert scalars(ea, "gradwatch/anomalies") == [(0, 0.0), (3, 0.0), (6, 0.0)]


def test_every_n_steps_writes_the_rest_at_close(tmp_path):
    d = str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sink = TensorBoardSink(log_dir=d, every_n_steps=3)
    with Watch(Config.build(m, opt, on_anomaly="log"), sinks=[sink]):
        train(m, opt, steps=5)
    # steps 0..4: 0 and 3 are logged steps; step 4 is written at close, at its own step
    assert scalars(read(d), "gradwatch/count/optimizer_update") == [(0, 1.0), (3, 3.0), (4, 1.0)]


def test_given_writer_is_used_flushed_and_not_closed(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with watch(m, opt, writer=writer, on_anomaly="log"):
        train(m, opt, steps=2)
    assert writer.file_writer is not None  # still open: the caller owns it
    writer.add_scalar("user/after", 1.0, 5)
    writer.flush()
    ea = read(str(tmp_path))
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(0, 1.0), (1, 1.0)]
    assert scalars(ea, "user/after") == [(5, 1.0)]
    assert os.listdir(tmp_path) == [os.path.basename(writer.file_writer.event_writer._file_name)]
    writer.close()


def test_anomaly_is_on_disk_before_the_watch_closes(tmp_path):
    """An anomaly often precedes a crash: its text must be flushed at once."""
    d = str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen: list[list[tuple[int, str]]] = []

    def peek(i: int) -> None:
        if i == 2:
            seen.append([(s, json.loads(t)["kind"]) for s, t in texts(read(d), "gradwatch/anomaly_json")])

    with watch(m, opt, log_dir=d, on_anomaly="log"):
        train(m, opt, steps=3, bug_at=1, on_step=peek)
        assert seen == [[(1, "saved_tensor_mutated")]]


@pytest.mark.parametrize(("rank", "world", "subdir"), [(0, 1, ""), (0, 2, ""), (1, 2, "rank1")])
def test_rank_runs(tmp_path, rank, world, subdir):
    sink = TensorBoardSink(log_dir=str(tmp_path), rank=rank, world=world)
    assert sink.log_dir == os.path.join(str(tmp_path), subdir) if subdir else str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with Watch(Config.build(m, opt), sinks=[sink]):
        train(m, opt, steps=2)
    ea = read(os.path.join(str(tmp_path), subdir))
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(0, 1.0), (1, 1.0)]
    if subdir:  # rank R > 0 never writes into rank 0's run
        assert not [f for f in os.listdir(tmp_path) if f.startswith("events.")]


def test_rank_above_zero_with_a_writer_gets_its_own_run(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer=writer, rank=1, world=2)
    assert sink.log_dir == os.path.join(str(tmp_path), "rank1")
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with Watch(Config.build(m, opt), sinks=[sink]):
        train(m, opt, steps=1)
    writer.close()
    assert scalars(read(os.path.join(str(tmp_path), "rank1")), "gradwatch/anomalies") == [(0, 0.0)]
    assert "gradwatch/anomalies" not in read(str(tmp_path)).Tags()["scalars"]


def test_sink_without_writer_or_dir_writes_nothing(tmp_path):
    sink = TensorBoardSink()
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with Watch(Config.build(m, opt), sinks=[sink]):
        train(m, opt, steps=1)
    assert sink.log_dir is None


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_every_n_steps_must_be_positive(every):
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        TensorBoardSink(every_n_steps=every)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_vanished_log_dir_does_not_break_training(tmp_path):
    d = str(tmp_path / "run")

    def vanish(i: int) -> None:
        if i == 2:  # TensorBoard's writer thread may be writing in it: retry until it is gone
            for _ in range(50):
                shutil.rmtree(d, ignore_errors=True)
                if not os.path.exists(d):
                    break
                time.sleep(0.01)

    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(m, opt, log_dir=d, on_anomaly="log") as w:
            train(m, opt, steps=6, bug_at=4, on_step=vanish)
    messages = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert any("internal error in sink TensorBoardSink" in msg for msg in messages), messages
    assert [a.kind for a in w.anomalies] == ["saved_tensor_mutated"]  # still diagnosed
    assert w.counts["optimizer_update"] == 6
    # and the training itself is bit-identical to an unwatched run
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    train(ref, ref_opt, steps=6, bug_at=4)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_imports_stay_lazy_and_follow_the_imported_lightning():
    """Importing gradwatch (and this sink) imports neither TensorBoard nor Lightning; with only
    pytorch_lightning imported, gradwatch.lightning subclasses its Callback and does not import
    lightning.pytorch. One subprocess (a fresh interpreter) for both."""
    code = (
        "import importlib.util, sys, gradwatch, gradwatch.sinks.tensorboard\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorboard', 'tensorboardX', 'lightning', 'pytorch_lightning')"
        " or m.startswith('torch.utils.tensorboard')]\n"
        "print(bad)\n"
        "if importlib.util.find_spec('pytorch_lightning') is not None:\n"
        "    import pytorch_lightning as pl\n"
        "    from gradwatch.lightning import GradWatchCallback\n"
        "    print(issubclass(GradWatchCallback, pl.Callback), 'lightning.pytorch' in sys.modules)\n"
        "else:\n"
        "    print('True False')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True False"]


def test_per_parameter_scalars_are_opt_in_and_the_default_set_stays_small(tmp_path):
    """A 76-parameter model writes the same small set of scalars as a 4-parameter one; its
    per-parameter ratios are one JSON tensor per statistics step (not in Time Series)."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(38):
        layers += [torch.nn.Linear(3, 3), torch.nn.Tanh()]
    m = torch.nn.Sequential(*layers)
    assert len(list(m.parameters())) == 76
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    d = str(tmp_path / "default")
    with watch(m, opt, log_dir=d, on_anomaly="log", stats_every=1):
        for _ in range(2):
            opt.zero_grad()
            m(torch.randn(2, 3)).sum().backward()
            opt.step()
    ea = read(d)
    tags = ea.Tags()
    assert set(tags["scalars"]) == DEFAULT_SCALARS and len(DEFAULT_SCALARS) == 16
    assert tags["histograms"] == ["gradwatch/update_ratios"]
    assert set(tags["tensors"]) == {
        "custom_scalars__config__", "gradwatch/summary_json/text_summary",
        "gradwatch/update_ratios_json",
    }
    docs = [json.loads(e.tensor_proto.string_val[0]) for e in ea.Tensors("gradwatch/update_ratios_json")]
    assert len(docs) == 2 and all(len(doc["ratios"]) == 76 for doc in docs)
    # opt in: one scalar per parameter as well
    d2 = str(tmp_path / "opt_in")
    m2 = net()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    sink = TensorBoardSink(log_dir=d2, per_parameter_scalars=True)
    with Watch(Config.build(m2, opt2, on_anomaly="log", stats_every=1), sinks=[sink]):
        train(m2, opt2, steps=2)
    assert set(read(d2).Tags()["scalars"]) == DEFAULT_SCALARS | {
        f"gradwatch/param_update_ratio/{p}" for p in PARAMS}


def test_zero_initialised_parameters_are_named_in_the_ratio_json(tmp_path):
    d = str(tmp_path)
    m = net()
    with torch.no_grad():
        m[0].bias.zero_()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with watch(m, opt, log_dir=d, on_anomaly="log", stats_every=1):
        train(m, opt, steps=3)
    docs = [json.loads(e.tensor_proto.string_val[0]) for e in read(d).Tensors("gradwatch/update_ratios_json")]
    assert docs[0]["ratios"]["0.bias"] == 1.0  # measured against its value after the update
    assert docs[1]["ratios"]["0.bias"] > 0.1  # still "large" while it grows from zero
    assert all(doc["zero_init"] == ["0.bias"] for doc in docs)


def _events(n: int, step: int) -> list[gradwatch.Event]:
    """``n`` distinct findings (distinct kinds and lines) at one step."""
    from gradwatch.events import SEVERITY, EventKind, Location

    kinds = [EventKind.SAVED_TENSOR_MUTATED, EventKind.STALE_GRAD_ACCUMULATION,
             EventKind.NONFINITE_INTRODUCED, EventKind.GRAD_FLOW_CUT]
    return [gradwatch.Event(kind=kinds[i], severity=SEVERITY[kinds[i]], step=step,
                            tensor=f"layer{i}.weight", op="mul_",
                            message=f"finding number {i}", hint=f"fix number {i}",
                            location=Location(filename="train.py", lineno=10 + i,
                                              function="main", code=f"line_{i}()"))
            for i in range(n)]


def test_every_finding_of_a_step_is_readable_in_text(tmp_path):
    """Three findings first seen at one step: one markdown text at that step holds all three
    (TensorBoard's Text dashboard shows one text per tag and step); the JSON stays one object
    per finding; a finding of a later step gets its own text."""
    d = str(tmp_path)
    sink = TensorBoardSink(log_dir=d)
    from gradwatch.sinks import StepSummary

    for ev in _events(3, step=4):
        sink.anomaly(ev)
    sink.step(StepSummary(step=4, counts={"saved_tensor_mutated": 1,
                                          "stale_grad_accumulation": 1,
                                          "nonfinite_introduced": 1}, totals={}))
    (late,) = _events(4, step=5)[3:]
    sink.anomaly(late)
    sink.close()
    ea = read(d)
    md = texts(ea, "gradwatch/anomaly")
    assert [s for s, _ in md] == [4, 5]
    doc = md[0][1]
    assert doc.startswith("### 3 findings first seen at step 4")
    for i in range(3):
        assert f"finding number {i}" in doc and f"fix number {i}" in doc
        assert f"`layer{i}.weight` at `train.py:{10 + i}`" in doc
    assert "finding number 3" in md[1][1] and "finding number 0" not in md[1][1]
    js = [(s, json.loads(t)) for s, t in texts(ea, "gradwatch/anomaly_json")]
    assert [(s, o["tensor"]) for s, o in js] == [(4, f"layer{i}.weight") for i in range(3)] + [
        (5, "layer3.weight")]
    # and the summary (the tab's source) was written right after the step that brought them
    summaries = texts(ea, "gradwatch/summary_json")
    assert len(json.loads(summaries[0][1])) == 3 and len(json.loads(summaries[-1][1])) == 4


def test_a_late_finding_of_a_written_step_rewrites_that_steps_text(tmp_path):
    """A finding arriving for a step whose text was written already: the step's text is written
    again with every finding (the newest text of a step supersedes the older)."""
    d = str(tmp_path)
    sink = TensorBoardSink(log_dir=d)
    from gradwatch.sinks import StepSummary

    a, b = _events(2, step=2)
    sink.anomaly(a)
    sink.step(StepSummary(step=2, counts={"saved_tensor_mutated": 1}, totals={}))
    sink.anomaly(b)
    sink.close()
    md = texts(read(d), "gradwatch/anomaly")
    assert [s for s, _ in md] == [2, 2]
    assert "finding number 0" in md[-1][1] and "finding number 1" in md[-1][1]


def test_a_step_with_an_anomaly_ends_the_window(tmp_path):
    """With every_n_steps > 1 the counts of a step with an anomaly are written at that step (the
    step its finding names), never summed into a later logged step."""
    d = str(tmp_path)
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sink = TensorBoardSink(log_dir=d, every_n_steps=3)
    with Watch(Config.build(m, opt, on_anomaly="log"), sinks=[sink]) as w:
        train(m, opt, steps=7, bug_at=1)
    ((first, last),) = [(r["first_step"], r["last_step"]) for r in w.distinct_anomalies()]
    ea = read(d)
    assert scalars(ea, "gradwatch/count/saved_tensor_mutated") == [(0, 0.0), (1, 1.0), (3, 0.0),
                                                                   (6, 0.0)]
    assert first == last == 1
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(0, 1.0), (1, 1.0), (3, 2.0),
                                                               (6, 3.0)]
