"""Errors gradwatch passes or raises never look like gradwatch crashed: their traceback holds at
most one gradwatch frame (the boundary that added the note or raised), never the innermost."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch import nn

import gradwatch

OWN = os.path.dirname(os.path.abspath(gradwatch.__file__)) + os.sep


def _ours(exc: BaseException) -> tuple[int, bool]:
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if f.filename.startswith(OWN)]
    return len(own), bool(frames) and frames[-1].filename.startswith(OWN)


@pytest.mark.parametrize("level", ["full", "light"])
def test_torchs_version_error_shows_at_most_one_gradwatch_frame(level: str) -> None:
    torch.manual_seed(0)
    G, D = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    with gradwatch.watch([G, D], level=level, on_anomaly="log"):
        fake = G(torch.randn(8, 4))
        loss_g = -D(fake).mean()
        D(fake.detach()).mean().backward()
        opt_d.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss_g.backward()
    assert info.value.__notes__[0].startswith("gradwatch:")
    count, innermost = _ours(info.value)
    assert count <= 1 and not innermost


@pytest.mark.parametrize("level", ["full", "light"])
def test_raise_shows_at_most_one_gradwatch_frame(level: str) -> None:
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(gradwatch.AnomalyError) as info, \
            gradwatch.watch(m, opt, level=level, on_anomaly="raise"):
        for _ in range(3):  # zero_grad forgotten: a stale sum, raised at the step using it
            m(torch.randn(2, 3)).sum().backward()
            opt.step()
    assert info.value.event.kind == "stale_grad_accumulation"
    count, _ = _ours(info.value)
    assert count <= 1


class UserError(Exception):
    pass


@pytest.mark.parametrize("level", ["full", "light"])
def test_a_users_error_inside_watched_calls_shows_at_most_one_gradwatch_frame(level: str) -> None:
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            raise UserError("in my backward")

    x = torch.ones(3, requires_grad=True)
    with gradwatch.watch(level=level, on_anomaly="log"):
        with pytest.raises(UserError) as info:
            Boom.apply(x).sum().backward()
        with pytest.raises(UserError) as in_zero_grad:
            class Opt(torch.optim.SGD):
                def zero_grad(self, set_to_none: bool = True) -> None:
                    raise UserError("in my zero_grad")

            Opt([x], lr=0.1).zero_grad()
    for exc in (info.value, in_zero_grad.value):
        count, innermost = _ours(exc)
        assert count <= 1 and not innermost


class _NoGradStep(torch.optim.Optimizer):
    """A user optimizer whose @torch.no_grad() step calls the closure without enable_grad."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure()  # <closure call>
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


@pytest.mark.parametrize("level", ["full", "light"])
def test_an_error_inside_a_closure_shows_one_gradwatch_frame_and_names_the_call(level: str
                                                                              ) -> None:
    from helpers import line_of

    model = nn.Linear(3, 1)
    opt = _NoGradStep(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        return loss

    with (gradwatch.watch(model, opt, level=level, on_anomaly="log"),
          pytest.raises(RuntimeError, match="does not require grad") as info):
        opt.step(closure)
    count, innermost = _ours(info.value)
    assert count <= 1 and not innermost
    [note] = info.value.__notes__
    assert f"_NoGradStep.step calls the closure at {__file__}:{line_of('closure call')}" in note
