"""Interrupts while a watch closes, and odd input that must not break a run."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.api import active_watch


def _loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()


@pytest.mark.parametrize("level", ["full", "light"])
def test_second_interrupt_while_closing_leaves_the_process_clean(clean, level: str) -> None:
    """Ctrl-C during the final flush, then again during the removal of the hooks: every hook is
    still removed, the watch is no longer active, and a new watch() is accepted."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, level=level, on_anomaly="log")
    w.__enter__()
    _loop(model, opt)
    rt = w._runtime
    calls = {"n": 0}
    real_end_step = rt._end_step

    def interrupted_end_step(step, final):  # type: ignore[no-untyped-def]
        real_end_step(step, final)
        raise KeyboardInterrupt  # the first Ctrl-C, during the final flush

    def interrupted_undo_step() -> None:
        calls["n"] += 1
        raise KeyboardInterrupt  # the second, while the hooks are being removed

    rt._end_step = interrupted_end_step
    rt.installed.add(interrupted_undo_step)  # runs first (newest first)
    with pytest.raises(KeyboardInterrupt):
        w.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert calls["n"] == 2  # an interrupted undo step runs once more, then is given up
    assert active_watch() is None
    assert torch.is_grad_enabled()
    assert clean() == {}
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as again:
        _loop(model, opt)
    assert again.step == 2
    assert clean() == {}


def test_nul_byte_in_log_dir_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"log_dir .* contains a NUL byte"):
        gradwatch.watch(log_dir="runs/a\0b")


def test_directory_named_like_the_jsonl_file_switches_that_sink_off(tmp_path, clean) -> None:
    (tmp_path / "gradwatch.jsonl").mkdir()
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, log_dir=str(tmp_path)) as w:
            _loop(model, opt)
    ours = [str(c.message) for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1 and ours[0].startswith("gradwatch: internal error in sink JsonlSink")
    assert w.step == 2 and w.counts["optimizer_update"] == 2
    assert clean() == {}


@pytest.mark.parametrize("level", ["full", "light"])
def test_unhashable_callable_reaching_the_mode_runs_as_without_watch(level: str) -> None:
    """A user's __torch_function__-aware callable that is unhashable must run under watch
    exactly as without it (it used to raise TypeError from the mode's memo lookup)."""

    class Op:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.overrides.handle_torch_function(self, (x,), x) if \
                torch.overrides.has_torch_function((x,)) else x * 2

    op = Op()
    x = torch.ones(3)
    expected = op(x)
    with gradwatch.watch(level=level, on_anomaly="log"), torch.no_grad():
        got = op(x)
    assert torch.equal(got, expected)
