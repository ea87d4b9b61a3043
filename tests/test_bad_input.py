"""Bad input: clear errors naming the argument, refused at entry with nothing installed; a disk
that fills up or a log file that vanishes while logging warns once and training continues."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"model": 42}, TypeError, "model"),
        ({"model": "resnet"}, TypeError, "model"),
        ({"model": [nn.Linear(2, 2), 3]}, TypeError, "model"),
        ({"model": nn.Parameter(torch.ones(2))}, TypeError, "model"),
        ({"optimizer": "adam"}, TypeError, "optimizer"),
        ({"optimizer": nn.Linear(2, 2)}, TypeError, "optimizer"),
        ({"on_anomaly": "explode"}, ValueError, "on_anomaly"),
        ({"on_anomaly": None}, ValueError, "on_anomaly"),
        ({"level": "x"}, ValueError, "level"),
        ({"level": None}, ValueError, "level"),
        ({"max_events": 0}, ValueError, "max_events"),
        ({"max_events": 2.5}, ValueError, "max_events"),
        ({"stats_every": -1}, ValueError, "stats_every"),
        ({"change_stats": "yes"}, TypeError, "change_stats"),
        ({"check_nonfinite": 1}, TypeError, "check_nonfinite"),
        ({"log_dir": 42}, TypeError, "log_dir"),
        ({"writer": 42}, TypeError, "writer"),
        ({"writer": object()}, TypeError, "writer"),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__,
)
def test_wrong_argument_is_named(kwargs, error, names, clean) -> None:
    with pytest.raises(error, match=names) as info, gradwatch.watch(**kwargs):
        pytest.fail("the body must not run")
    assert names in str(info.value)
    assert clean() == {}


def test_model_options_that_are_fine(clean) -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for model in (a, [a, b], (a, b), nn.ModuleList([a, b])):
        with gradwatch.watch(model, torch.optim.SGD(a.parameters(), lr=0.1)):
            pass
    assert clean() == {}


def _unwritable(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root ignores permission bits: use a place nobody can create in
        return "/proc/gradwatch-cannot-live-here"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "sub")


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_unusable_log_dir_refused_at_entry(where: str, tmp_path: Path, clean) -> None:
    f = tmp_path / "file.txt"
    f.write_text("not a directory")
    path = {"a file": str(f), "under a file": str(f / "sub"),
            "unwritable": _unwritable(tmp_path)}[where]
    with pytest.raises(ValueError, match="log_dir") as info, gradwatch.watch(log_dir=path):
        pytest.fail("the body must not run")
    assert path in str(info.value)
    assert clean() == {}
    assert f.read_text() == "not a directory"


def test_closed_summary_writer_refused(tmp_path: Path, clean) -> None:
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(str(tmp_path))
    sw.close()
    with pytest.raises(ValueError, match="writer") as info, gradwatch.watch(writer=sw):
        pytest.fail("the body must not run")
    assert "closed" in str(info.value)
    assert clean() == {}


# ----------------------------------------------------------------------------- faults while logging
def _train(log_dir: str | None, sabotage=None, steps: int = 6):
    torch.manual_seed(0)
    m = nn.Linear(3, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = gradwatch.watch(m, opt, log_dir=log_dir, on_anomaly="log") if log_dir else None
        w = ctx.__enter__() if ctx else None
        try:
            for i in range(steps):
                if i == 2 and sabotage is not None:
                    sabotage(w)
                loss = m(torch.randn(2, 3)).pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    m.weight.mul_(0.9)
                losses.append(loss.detach())
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    internal = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)
                and "internal error" in str(c.message)]
    return [p.detach().clone() for p in m.parameters()], losses, internal, w


def _same(a, b) -> None:
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def _jsonl(w):
    return next(s for s in w._runtime.emit.sinks if type(s).__name__ == "JsonlSink")


def test_disk_full_while_logging(tmp_path: Path, clean) -> None:
    """gradwatch.jsonl on a full disk (/dev/full: every write fails with ENOSPC)."""
    ref = _train(None)
    os.symlink("/dev/full", tmp_path / "gradwatch.jsonl")
    got = _train(str(tmp_path))
    _same(ref, got)
    assert len(got[2]) == 1
    assert got[2][0].startswith("gradwatch: internal error in sink JsonlSink (OSError: [Errno 28]")
    assert got[3].counts["optimizer_update"] == 6  # in-memory monitoring goes on
    assert clean() == {}


def test_log_file_descriptor_vanishes_while_logging(tmp_path: Path, clean) -> None:
    ref = _train(None)
    got = _train(str(tmp_path), lambda w: os.close(_jsonl(w)._file.fileno()))
    _same(ref, got)
    assert len(got[2]) == 1
    assert got[2][0].startswith("gradwatch: internal error in sink JsonlSink (OSError: [Errno 9]")
    assert clean() == {}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def _remove_tree(path: Path) -> None:
    """rmtree that wins the race with TensorBoard's writer thread creating files meanwhile."""
    for _ in range(50):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # "Directory not empty": a file appeared while removing
            time.sleep(0.01)
    shutil.rmtree(path)


# TensorBoard's own writer thread dies with an exception when its directory vanishes (its
# behaviour, outside gradwatch); the test asserts what gradwatch does about it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_log_dir_removed_while_logging(tmp_path: Path, clean) -> None:
    """The run directory is deleted mid-run (a cleanup job, a full scratch disk): training
    completes unchanged, each sink warns at most once."""
    ref = _train(None)
    log_dir = tmp_path / "run"
    got = _train(str(log_dir), lambda w: _remove_tree(log_dir))
    _same(ref, got)
    parts = [m.split("(")[0] for m in got[2]]
    assert len(parts) == len(set(parts)) <= 2, got[2]
    assert clean() == {}
