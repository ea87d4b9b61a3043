"""``level="light"`` does not see ``.grad`` read with grad on, so a window zeroed after such
reads looked discarded. Such discards are held until a step of an optimizer holding the leaf:
a gradient the user made since (built from the reads) drops them, what backward or the zeroing
left confirms them. Correct per-task / per-sample loops are silent at both levels; the real
discards are reported at both levels with the same lines and counts."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import AnomalyError
from helpers import line_of

LEVELS = ("full", "light")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _model_and_sgd(make: nn.Module) -> tuple[nn.Module, torch.optim.SGD]:
    return make, torch.optim.SGD(make.parameters(), lr=0.1)


def _findings(w: gradwatch.Watch) -> list[tuple[str, str, int]]:
    return sorted((a.kind.value, a.tensor, a.location.lineno) for a in w.anomalies)


def _pcgrad(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Pytorch-PCGrad's ``pc_backward``: per task, zero, backward, ``p.grad.clone()``
    (``_retrieve_grad``); the merged gradient is set back (``_set_grad``); one step."""
    out = model(torch.randn(8, 4))
    losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean()]
    grads = []
    for loss in losses:
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for p, g1, g2 in zip(model.parameters(), *grads):
        p.grad = (g1 + g2) / 2
    opt.step()


def _dp_sgd(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """pyvacy's DPOptimizer (ChrisWaites/pyvacy, optim.py): per micro-batch, zero, backward,
    the clipped gradient summed into a buffer through ``p.grad.data`` (grad on); at the step
    the sum plus noise becomes ``p.grad.data``."""
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    params = list(model.parameters())
    accum = [torch.zeros_like(p) for p in params]
    for i in range(4):
        opt.zero_grad()
        F.mse_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        norm = torch.stack([p.grad.data.norm(2) for p in params]).norm(2).item()
        coef = min(1.0, 1.0 / (norm + 1e-6))
        for a, p in zip(accum, params):
            a.add_(p.grad.data.mul(coef))
    for a, p in zip(accum, params):
        p.grad.data = a.clone() + 0.01 * torch.randn_like(a)
        p.grad.data.mul_(1 / 4)
    opt.step()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loop", [_pcgrad, _dp_sgd])
def test_per_task_and_per_sample_gradients_built_by_the_user_are_silent(level, loop) -> None:
    model, opt = _model_and_sgd(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise") as w:
        for _ in range(3):
            loop(model, opt)
    assert w.anomalies == []
    assert w.step == 3


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zeroing_between_backward_and_step_is_reported_at_the_zeroing(level, set_to_none) -> None:
    model, opt = _model_and_sgd(nn.Linear(3, 1))
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
        for _ in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            opt.zero_grad(set_to_none=set_to_none)  # <between>
            opt.step()
    line = line_of("between")
    assert _findings(w) == [("accumulated_grad_discarded", "bias.grad", line)] * 3 + [
        ("accumulated_grad_discarded", "weight.grad", line)] * 3
    assert {a.step for a in w.anomalies} == {0, 1, 2}  # the step of the zeroing, not a later one


@pytest.mark.parametrize("level", LEVELS)
def test_a_discard_no_step_decides_is_reported_when_the_watch_ends(level) -> None:
    model, opt = _model_and_sgd(nn.Linear(3, 1))
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.zero_grad()  # <last>
    assert _findings(w) == [("accumulated_grad_discarded", "bias.grad", line_of("last")),
                            ("accumulated_grad_discarded", "weight.grad", line_of("last"))]


def test_another_optimizers_step_does_not_decide_a_held_discard() -> None:
    """Two models, each with its PCGrad loop; the second one's step comes between the first
    one's zeroing and its step (its gradient is the merged one by then): silent."""
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    b = nn.Linear(4, 2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    with gradwatch.watch([a, b], [opt_a, opt_b], level="light", on_anomaly="log") as w:
        for _ in range(3):
            out = a(torch.randn(8, 4))
            grads = []
            for loss in (out[:, 0].pow(2).mean(), out[:, 1].abs().mean()):
                opt_a.zero_grad()
                loss.backward(retain_graph=True)
                grads.append([p.grad.clone() for p in a.parameters()])
            opt_b.zero_grad()
            b(torch.randn(8, 4)).pow(2).mean().backward()
            opt_b.step()
            for p, g1, g2 in zip(a.parameters(), *grads):
                p.grad = g1 + g2
            opt_a.step()
    assert w.anomalies == []


def test_light_raises_a_held_discard_at_the_step_that_confirms_it() -> None:
    model, opt = _model_and_sgd(nn.Linear(3, 1))
    with (pytest.raises(AnomalyError) as info,
          gradwatch.watch(model, opt, level="light", on_anomaly="raise")):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.zero_grad()  # <zeroed>
        opt.step()  # <confirmed>
    ev = info.value.event
    assert (ev.kind.value, ev.location.lineno) == ("accumulated_grad_discarded", line_of("zeroed"))
    frames = [f for f in traceback.extract_tb(info.value.__traceback__) if f.filename == __file__]
    assert frames[-1].lineno == line_of("confirmed")


# -- the norm clip_grad_norm_ returns is a read ------------------------------------------------
def _spiky_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    """A step skipped on a gradient spike (a speech-recognition hook's ``skip_step_norm``):
    ``clip_grad_norm_`` returns the norm before clipping; above the limit the batch is zeroed,
    unused, and the loop goes on."""
    for i in range(steps):
        F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1) * (50 if i % 3 == 0 else 1)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if norm > 20:
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("level", LEVELS)
def test_a_step_skipped_on_a_gradient_spike_is_silent(level) -> None:
    model, opt = _model_and_sgd(nn.Linear(4, 1))
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise") as w:
        _spiky_loop(model, opt)
    assert w.anomalies == []
    assert w.step == 4  # (i = 0 and 3 skipped)


@pytest.mark.parametrize("level", LEVELS)
def test_a_clipped_window_zeroed_right_before_the_step_is_reported(level) -> None:
    model, opt = _model_and_sgd(nn.Linear(3, 1))
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
        for _ in range(2):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.zero_grad()  # <misordered>
            opt.step()
    line = line_of("misordered")
    assert _findings(w) == [("accumulated_grad_discarded", "bias.grad", line)] * 2 + [
        ("accumulated_grad_discarded", "weight.grad", line)] * 2


@pytest.mark.parametrize("level", LEVELS)
def test_an_accumulation_window_zeroed_inside_is_reported_with_clipping_before_the_step(
        level) -> None:
    """Clipping scales the last pass's gradient in place: the step still applies what backward
    left (not a gradient the user made), so the discards inside the window are confirmed."""
    model, opt = _model_and_sgd(nn.Linear(3, 1))
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
        for i in range(8):
            opt.zero_grad()  # <inside>
            model(torch.randn(4, 3)).pow(2).mean().backward()
            if i % 4 == 3:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
                opt.step()
    line = line_of("inside")
    assert _findings(w) == [("accumulated_grad_discarded", "bias.grad", line)] * 6 + [
        ("accumulated_grad_discarded", "weight.grad", line)] * 6
