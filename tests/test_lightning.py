"""GradWatchCallback with real Trainers of both packages (lightning.pytorch, pytorch_lightning)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from functools import cache
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.sinks.tensorboard import ANOMALY_KINDS

lightning_module = pytest.importorskip("gradwatch.lightning")
GradWatchCallback = lightning_module.GradWatchCallback

HERE = os.path.abspath(__file__)
PARAMS = 6  # l1.weight, l1.bias, bn.weight, bn.bias, l2.weight, l2.bias


def line_of(marker: str) -> int:
    with open(HERE) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# {marker}") and "def line_of" not in line:
                return i
    raise AssertionError(marker)


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def L(request: pytest.FixtureRequest) -> Any:
    return pytest.importorskip(request.param)


@cache
def net_class(L: Any) -> type:
    """A tiny LightningModule for package ``L`` (modules are not interchangeable)."""

    class Net(L.LightningModule):
        def __init__(self, bug: str | None = None, bug_steps: tuple[int, ...] = (), manual: bool = False,
                     optimizer: str = "sgd") -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(4, 8)
            self.bn = torch.nn.BatchNorm1d(8)
            self.l2 = torch.nn.Linear(8, 1)
            self.bug, self.bug_steps, self.done = bug, bug_steps, set()
            self.automatic_optimization = not manual
            self.optimizer = optimizer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.relu(self.bn(self.l1(x))))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x).float(), y)
            step = self.global_step
            if step in self.bug_steps and step not in self.done:
                self.done.add(step)
                if self.bug == "no_grad":
                    with torch.no_grad():
                        self.l2.weight.mul_(0.9)  # BUG-NO-GRAD
                elif self.bug == "data":
                    self.l2.weight.data.mul_(0.9)  # BUG-DATA
            self.log("loss", loss)
            if not self.automatic_optimization:  # manual, accumulating over 2 batches
                opt = self.optimizers()
                self.manual_backward(loss / 2)
                if batch_idx % 2 == 1:
                    self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
                    opt.step()
                    opt.zero_grad()
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x).float(), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=0.01)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Net


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    return DataLoader(data, batch_size=4)


def make_trainer(L: Any, tmp_path: Any, callbacks: list[Any], logger: Any = "tb", **kw: Any) -> Any:
    if logger == "tb":
        logger = L.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    options = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, limit_val_batches=0,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), logger=logger,
        callbacks=callbacks, deterministic=True,
    )
    options.update(kw)
    return L.Trainer(**options)


def fit(L: Any, tmp_path: Any, model_kw: dict[str, Any] | None = None, *, callback: Any = None,
        fit_kw: dict[str, Any] | None = None, **trainer_kw: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    cb = callback if callback is not None else GradWatchCallback(on_anomaly="log")
    trainer = make_trainer(L, tmp_path, [cb], **trainer_kw)
    trainer.fit(net_class(L)(**(model_kw or {})), loader(), loader(), **(fit_kw or {}))
    return trainer, cb


def read(log_dir: str) -> EventAccumulator:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def texts(ea: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(f"{tag}/text_summary")]


def jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_clean(cb: Any, steps: int, backward_passes: int) -> None:
    assert cb.anomalies == []
    assert not set(cb.counts) & set(ANOMALY_KINDS), cb.counts
    assert cb.counts["optimizer_update"] == steps
    assert cb.counts["grad_accumulated"] == backward_passes * PARAMS
    assert cb.watch._closed
    with gradwatch.watch():  # nothing is left active: a new watch can start
        pass
    assert cb.report().startswith("gradwatch: no anomalies")


# ---------------------------------------------------------------------- clean fits
def test_clean_fit_accumulation_clipping_bf16_validation(L, tmp_path):
    trainer, cb = fit(L, tmp_path, max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.5,
                      precision="bf16-mixed", limit_val_batches=2)
    assert trainer.global_step == 4
    assert_clean(cb, steps=4, backward_passes=8)
    # written into the TensorBoardLogger's own run (one event file, next to Lightning's scalars)
    log_dir = trainer.logger.log_dir
    assert cb.output_dir == log_dir == os.path.join(str(tmp_path), "tb", "version_0")
    assert len([f for f in os.listdir(log_dir) if f.startswith("events.")]) == 1
    ea = read(log_dir)
    assert "loss" in ea.Tags()["scalars"]
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(s, 1.0) for s in range(4)]
    assert scalars(ea, "gradwatch/count/grad_accumulated") == [(s, 2.0 * PARAMS) for s in range(4)]
    assert scalars(ea, "gradwatch/anomalies") == [(s, 0.0) for s in range(4)]
    assert texts(ea, "gradwatch/summary_json") == [(3, "[]")]  # at the last step
    rows = jsonl(os.path.join(log_dir, "gradwatch.jsonl"))
    assert {r["severity"] for r in rows} == {"info"}
    assert {r["rank"] for r in rows} == {0}


def test_clean_fit_manual_optimization_bf16(L, tmp_path):
    trainer, cb = fit(L, tmp_path, {"manual": True}, max_epochs=2, precision="bf16-mixed",
                      limit_val_batches=2)
    assert trainer.global_step == 4  # 8 batches, one step per 2
    assert_clean(cb, steps=4, backward_passes=8)
    ea = read(trainer.logger.log_dir)
    assert scalars(ea, "gradwatch/anomalies") == [(s, 0.0) for s in range(4)]


# ---------------------------------------------------------------------- a crash, diagnosed
def test_saved_weight_edited_under_no_grad_crashes_fit_with_a_note(L, tmp_path):
    bug_line = line_of("BUG-NO-GRAD")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            fit(L, tmp_path, {"bug": "no_grad", "bug_steps": (1,)},
                callback=GradWatchCallback())  # on_anomaly="warn"
    notes = [n for n in getattr(info.value, "__notes__", []) if n.startswith("gradwatch:")]
    assert len(notes) == 1
    assert f"{HERE}:{bug_line}" in notes[0] and "l2.weight" in notes[0]
    gw_warnings = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert [(w.filename, w.lineno) for w in gw_warnings] == [(HERE, bug_line)]

    log_dir = os.path.join(str(tmp_path), "tb", "version_0")
    expected = ("saved_tensor_mutated", "l2.weight", "mul_", HERE, bug_line, 1, 0)
    # on_exception closed the watch: everything is on disk
    rows = [r for r in jsonl(os.path.join(log_dir, "gradwatch.jsonl")) if r["severity"] != "info"]
    assert [(r["kind"], r["tensor"], r["op"], r["location"]["filename"], r["location"]["lineno"],
             r["step"], r["rank"]) for r in rows] == [expected]
    ea = read(log_dir)
    (step, js), = texts(ea, "gradwatch/anomaly_json")
    r = json.loads(js)
    assert (r["kind"], r["tensor"], r["op"], r["location"]["filename"], r["location"]["lineno"],
            r["step"], r["rank"]) == expected
    assert step == 1
    (_, md), = texts(ea, "gradwatch/anomaly")
    assert f"{HERE}:{bug_line}" in md and "self.l2.weight.mul_(0.9)" in md
    summary = json.loads(texts(ea, "gradwatch/summary_json")[-1][1])
    assert [(d["event"]["kind"], d["count"]) for d in summary] == [("saved_tensor_mutated", 1)]


def test_after_a_crash_nothing_stays_installed(L, tmp_path, clean):
    cb = GradWatchCallback(on_anomaly="log")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fit(L, tmp_path, {"bug": "no_grad", "bug_steps": (0,)}, callback=cb)
    # only on_exception ran: it closed the watch, and the callback kept its results
    assert clean() == {}
    assert cb.watch._closed
    assert [(a.kind, a.step) for a in cb.anomalies] == [("saved_tensor_mutated", 0)]
    with gradwatch.watch():  # a new watch can start
        pass


# ---------------------------------------------------------------------- steps and cadence
def test_step_is_global_step_and_scalars_follow_log_every_n_steps(L, tmp_path):
    trainer, cb = fit(L, tmp_path, {"bug": "data", "bug_steps": (2,)}, max_steps=5,
                      limit_train_batches=10, accumulate_grad_batches=2, log_every_n_steps=2)
    assert [(a.kind, a.tensor, a.location.lineno, a.step) for a in cb.anomalies] == [
        ("saved_tensor_mutated", "l2.weight", line_of("BUG-DATA"), 2)
    ]
    ea = read(trainer.logger.log_dir)
    # logged steps 0, 2, 4; the steps in between are summed in, not dropped
    assert scalars(ea, "gradwatch/count/optimizer_update") == [(0, 1.0), (2, 2.0), (4, 2.0)]
    assert scalars(ea, "gradwatch/count/grad_accumulated") == [
        (0, 2.0 * PARAMS), (2, 4.0 * PARAMS), (4, 4.0 * PARAMS)]
    assert scalars(ea, "gradwatch/anomalies") == [(0, 0.0), (2, 1.0), (4, 0.0)]
    assert scalars(ea, "gradwatch/count/saved_tensor_mutated") == [(0, 0.0), (2, 1.0), (4, 0.0)]
    assert [s for s, _ in texts(ea, "gradwatch/anomaly")] == [2]


# ---------------------------------------------------------------------- where it writes
@pytest.fixture
def rank_zero_messages(L: Any):
    """Messages of Lightning's rank_zero_info (its logger does not propagate to the root)."""
    records: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    loggers = [logging.getLogger(f"{pkg}.utilities.rank_zero")
               for pkg in ("lightning.pytorch", "pytorch_lightning")]
    handler = Handler(level=logging.INFO)
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_other_logger_gets_our_own_writer_in_trainer_log_dir(L, tmp_path, rank_zero_messages):
    csv = L.loggers.CSVLogger(save_dir=str(tmp_path), name="csv", version=0)
    trainer, cb = fit(L, tmp_path, {"bug": "data", "bug_steps": (1,)}, logger=csv)
    log_dir = os.path.join(str(tmp_path), "csv", "version_0")
    assert cb.output_dir == trainer.log_dir == log_dir
    assert [m for m in rank_zero_messages if "GradWatchCallback" in m] == [
        f"GradWatchCallback: writing TensorBoard event files and gradwatch.jsonl to {log_dir}"
    ]
    ea = read(log_dir)
    assert scalars(ea, "gradwatch/anomalies") == [(0, 0.0), (1, 1.0), (2, 0.0), (3, 0.0)]
    assert [json.loads(t)["kind"] for _, t in texts(ea, "gradwatch/anomaly_json")] == [
        "saved_tensor_mutated"]
    assert [r["kind"] for r in jsonl(os.path.join(log_dir, "gradwatch.jsonl"))
            if r["severity"] != "info"] == ["saved_tensor_mutated"]


def test_no_logger_writes_under_default_root_dir(L, tmp_path):
    _, cb = fit(L, tmp_path, logger=False)
    out = os.path.join(str(tmp_path), "gradwatch")
    assert cb.output_dir == out
    assert sorted(f.split(".")[0] for f in os.listdir(out)) == ["events", "gradwatch"]
    assert scalars(read(out), "gradwatch/count/optimizer_update") == [(s, 1.0) for s in range(4)]


def test_user_writer_and_log_dir(L, tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "mine"))
    cb = GradWatchCallback(writer=writer, log_dir=str(tmp_path / "gw"))
    trainer, _ = fit(L, tmp_path, callback=cb)
    assert writer.file_writer is not None  # ours to use, the user's to close
    writer.close()
    assert scalars(read(str(tmp_path / "mine")), "gradwatch/anomalies") == [(s, 0.0) for s in range(4)]
    assert os.listdir(tmp_path / "gw") == ["gradwatch.jsonl"]
    assert "gradwatch/anomalies" not in read(trainer.logger.log_dir).Tags()["scalars"]


def test_per_parameter_scalars_pass_through_the_callback(L, tmp_path):
    """Opt-in: one update-ratio scalar per parameter in the logger's run; none by default."""
    on = GradWatchCallback(on_anomaly="log", stats_every=1, per_parameter_scalars=True)
    trainer, _ = fit(L, tmp_path / "on", callback=on)
    tags = set(read(trainer.logger.log_dir).Tags()["scalars"])
    assert {t for t in tags if t.startswith("gradwatch/param_update_ratio/")} == {
        f"gradwatch/param_update_ratio/{p}" for p in (
            "l1.weight", "l1.bias", "bn.weight", "bn.bias", "l2.weight", "l2.bias")}
    trainer, _ = fit(L, tmp_path / "off", callback=GradWatchCallback(stats_every=1))
    tags = set(read(trainer.logger.log_dir).Tags()["scalars"])
    assert not {t for t in tags if t.startswith("gradwatch/param_update_ratio/")}
    with pytest.raises(TypeError, match=r"^per_parameter_scalars must be a bool"):
        GradWatchCallback(per_parameter_scalars="yes")


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_state_survives_a_checkpoint(L, tmp_path):
    model_kw = {"bug": "data", "bug_steps": (1, 5), "optimizer": "adam"}
    trainer, cb = fit(L, tmp_path, model_kw, enable_checkpointing=True)
    assert cb.counts["saved_tensor_mutated"] == 1
    ckpt = trainer.checkpoint_callback.best_model_path
    assert os.path.isfile(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]["GradWatchCallback"]
    assert json.loads(json.dumps(state)) == state  # plain values only
    assert state["counts"]["optimizer_update"] == 4

    resumed = GradWatchCallback(on_anomaly="log")
    trainer2, _ = fit(L, tmp_path, model_kw, callback=resumed, max_epochs=2,
                      enable_checkpointing=True, fit_kw={"ckpt_path": ckpt})
    assert trainer2.global_step == 8
    assert resumed.watch.counts["optimizer_update"] == 4  # this run only
    assert resumed.counts["optimizer_update"] == 8  # with the checkpoint's
    assert resumed.counts["saved_tensor_mutated"] == 2
    (d,) = resumed.distinct_anomalies()
    assert (d["event"].kind, d["event"].location.lineno, d["count"], d["first_step"],
            d["last_step"]) == ("saved_tensor_mutated", line_of("BUG-DATA"), 2, 1, 5)
    assert "x2 (steps 1-5)" in resumed.report()


# ---------------------------------------------------------------------- misconfiguration
def test_invalid_options_fail_at_construction():
    with pytest.raises(ValueError, match="on_anomaly must be one of"):
        GradWatchCallback(on_anomaly="explode")
    with pytest.raises(ValueError, match="stats_every must be a positive int"):
        GradWatchCallback(stats_every=0)


def test_two_callbacks_are_refused(L, tmp_path):
    # Lightning itself refuses two stateful callbacks with the same state_key ...
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GradWatchCallback`"):
        make_trainer(L, tmp_path, [GradWatchCallback(), GradWatchCallback()])

    # ... and setup refuses any two (here with distinct keys), saying how to fix it
    class Renamed(GradWatchCallback):
        @property
        def state_key(self) -> str:
            return "Renamed"

    trainer = make_trainer(L, tmp_path, [GradWatchCallback(), Renamed()])
    with pytest.raises(L.utilities.exceptions.MisconfigurationException,  # the Trainer's own class
                       match="Pass a single GradWatchCallback"):
        trainer.fit(net_class(L)(), loader(), loader())


def test_fit_inside_an_active_watch_is_refused_in_setup(L, tmp_path):
    trainer = make_trainer(L, tmp_path, [GradWatchCallback()])
    with gradwatch.watch(), pytest.raises(L.utilities.exceptions.MisconfigurationException,
                                          match=r"already active around trainer\.fit"):
        trainer.fit(net_class(L)(), loader(), loader())


def test_closed_writer_and_unwritable_log_dir_are_refused_in_setup(L, tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "w"))
    writer.close()
    trainer = make_trainer(L, tmp_path, [GradWatchCallback(writer=writer)])
    misconfigured = L.utilities.exceptions.MisconfigurationException
    with pytest.raises(misconfigured, match=r"writer is closed.*Pass an open"):
        trainer.fit(net_class(L)(), loader(), loader())
    (tmp_path / "file").write_text("")
    trainer = make_trainer(L, tmp_path, [GradWatchCallback(log_dir=str(tmp_path / "file"))])
    with pytest.raises(misconfigured,
                       match=r"log_dir '.*file' cannot be created.*Pass GradWatchCallback\(log_dir"):
        trainer.fit(net_class(L)(), loader(), loader())


# ---------------------------------------------------------------------- packaging
def test_watch_is_callable_after_importing_the_callback():
    """Regression: importing gradwatch.lightning (which imports the module defining ``watch``)
    must leave ``gradwatch.watch`` the function (it was the module while that was watch.py)."""
    code = (
        "from gradwatch.lightning import GradWatchCallback\n"
        "import gradwatch\n"
        "with gradwatch.watch():\n"
        "    pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
