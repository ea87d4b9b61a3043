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
