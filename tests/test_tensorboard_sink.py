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
    expected = COUNT_TAGS | {
        "gradwatch/anomalies", "gradwatch/overhead_ms", "gradwatch/update_ratio/max",
        "gradwatch/update_ratio/median", "gradwatch/update_ratio/min",
    } | {f"gradwatch/param_update_ratio/{p}" for p in PARAMS}
    assert set(tags["scalars"]) == expected
    assert tags["histograms"] == ["gradwatch/update_ratios"]
    assert set(tags["tensors"]) == {
        "custom_scalars__config__", "gradwatch/anomaly/text_summary",
        "gradwatch/anomaly_json/text_summary", "gradwatch/summary_json/text_summary",
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
    for s, mx in scalars(ea, "gradwatch/update_ratio/max"):
        per_param = [dict(scalars(ea, f"gradwatch/param_update_ratio/{p}"))[s] for p in PARAMS]
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
