"""A ``torch.compile``d ``optimizer.step()``: dynamo breaks the graph at gradwatch's step hooks
(``torch.compiler.disable``) and runs them around the compiled update, so the step is counted
and checked like an eager one; results stay bit-identical."""

from __future__ import annotations

import warnings

import pytest

import gradwatch


def _run(level: str, forget_zero_grad: bool):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)

    @torch.compile(backend="eager")
    def step() -> None:
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: profiler record ignored by dynamo
        with gradwatch.watch(m, opt, level=level, on_anomaly="raise") as w:
            for _ in range(4):
                m(torch.randn(3, 4)).pow(2).sum().backward()
                step()
                if not forget_zero_grad:
                    opt.zero_grad()
    return w


@pytest.mark.parametrize("level", ["full", "light"])
def test_compiled_step_consumes_its_gradients(level: str) -> None:
    w = _run(level, forget_zero_grad=False)
    assert w.anomalies == []
    assert w.step == 4 and w.counts["optimizer_update"] == 4
    assert w.counts["grad_accumulated"] == 8
    assert "accumulated_grad_discarded" not in w.counts


@pytest.mark.parametrize("level", ["full", "light"])
def test_forgotten_zero_grad_around_a_compiled_step_is_still_stale(level: str) -> None:
    with pytest.raises(gradwatch.AnomalyError) as info:
        _run(level, forget_zero_grad=True)
    ev = info.value.event
    assert (ev.kind, ev.tensor, ev.location.code) == (
        "stale_grad_accumulation", "weight", "m(torch.randn(3, 4)).pow(2).sum().backward()")


# Watching must not import torch._dynamo (~1 s at a process's start): a script without a torch
# optimizer (creating one imports it) never pays for it. The hooks are made compile-safe once
# something has imported it: here the optimizer, created after the watch began (as in every
# script under ``gradwatch run``), then compiled. Fresh processes: in this one it is loaded.
SCRIPT = """\
import sys
import warnings

import torch

import gradwatch

torch.manual_seed(0)
m = torch.nn.Linear(4, 2)
meta_path = list(sys.meta_path)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # torch: profiler record ignored by dynamo
    with gradwatch.watch(m, level=LEVEL, on_anomaly="raise") as w:
        for _ in range(3):  # a hand-written update
            m(torch.randn(3, 4)).pow(2).sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        print("dynamo after a hand-written loop:", "torch._dynamo" in sys.modules)
        if PROBE:  # asked for without an import (what availability checks do)
            import importlib.util

            assert importlib.util.find_spec("torch._dynamo") is not None
            assert "torch._dynamo" not in sys.modules
        if COMPILE:
            opt = torch.optim.Adam(m.parameters(), lr=0.1)  # (imports torch._dynamo)
            step = torch.compile(opt.step, backend="eager")
            for _ in range(4):
                m(torch.randn(3, 4)).pow(2).sum().backward()
                step()
                if not FORGET:
                    opt.zero_grad()
print("steps:", w.step, w.counts.get("optimizer_update"), [a.kind.value for a in w.anomalies])
print("meta_path restored:", sys.meta_path == meta_path)
"""


def _fresh(tmp_path, level: str, compile_: bool, forget: bool = False, probe: bool = False):
    import subprocess
    import sys

    script = tmp_path / "later.py"
    script.write_text(f"LEVEL = {level!r}\nCOMPILE = {compile_}\nFORGET = {forget}\n"
                      f"PROBE = {probe}\n" + SCRIPT)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("level", ["full", "light"])
def test_watching_imports_no_compiler(tmp_path, level: str) -> None:
    proc = _fresh(tmp_path, level, compile_=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dynamo after a hand-written loop: False" in proc.stdout
    assert "steps: 0 None []" in proc.stdout
    assert "meta_path restored: True" in proc.stdout


@pytest.mark.parametrize(("level", "probe"), [("full", False), ("light", False), ("full", True)])
def test_a_step_compiled_after_the_watch_began_is_counted(tmp_path, level: str,
                                                          probe: bool) -> None:
    proc = _fresh(tmp_path, level, compile_=True, probe=probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dynamo after a hand-written loop: False" in proc.stdout
    assert "steps: 4 4 []" in proc.stdout
    assert "meta_path restored: True" in proc.stdout


def test_a_forgotten_zero_grad_around_a_step_compiled_later_is_stale(tmp_path) -> None:
    proc = _fresh(tmp_path, "light", compile_=True, forget=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "AnomalyError" in proc.stderr and "stale_grad_accumulation" in proc.stderr
