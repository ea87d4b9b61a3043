"""Correct code near the gradient-window rules (found by a false-alarm hunt): gradients set on
purpose, running sums logged then rescaled, dropped or frozen, nested optimizer steps. Silent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def _silent(w: gradwatch.Watch) -> None:
    assert [(f["event"].kind.value, f["event"].location.lineno)
            for f in w.distinct_anomalies()] == []


@pytest.mark.parametrize("level", ["full", "light"])
def test_running_sums_logged_then_rescaled_clamped_or_frozen_are_silent(level: str) -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    norms = []
    with gradwatch.watch(on_anomaly="log", level=level) as w:
        for step in range(4):
            opt.zero_grad()
            for _ in range(2):
                F.mse_loss(m(torch.randn(8, 4)), torch.randn(8, 1)).backward()
                norms.append(m.weight.grad.norm())  # the running sum, logged
            for p in m.parameters():
                p.grad = p.grad / 2 if step % 2 else p.grad.clamp(-0.5, 0.5)
            opt.step()
        m.bias.grad = None  # frozen during warm-up
    _silent(w)


class _SAM(torch.optim.Optimizer):
    """SAM in closure form (davda54/sam): the base optimizer steps inside this step."""

    def __init__(self, params, base=torch.optim.SGD, rho=0.05, **kw) -> None:
        super().__init__(params, dict(rho=rho, **kw))
        self.base_optimizer = base(self.param_groups, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups
                                       for p in g["params"] if p.grad is not None]))
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                e = p.grad * g["rho"] / (norm + 1e-12)
                p.add_(e)
                self.state[p]["e"] = e
        self.zero_grad()
        with torch.enable_grad():
            closure()
        for g in self.param_groups:
            for p in g["params"]:
                if "e" in self.state[p]:
                    p.sub_(self.state[p]["e"])
        self.base_optimizer.step()


@pytest.mark.parametrize("level", ["full", "light"])
def test_sam_in_closure_form_is_one_step_silent(level: str) -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    opt = _SAM(m.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure():
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss

    with gradwatch.watch(on_anomaly="log", level=level) as w:
        for _ in range(3):
            closure()
            opt.step(closure)
            opt.zero_grad()
    _silent(w)
    assert w.step == 3


@pytest.mark.parametrize("level", ["full", "light"])
def test_passes_run_for_a_non_parameters_gradient_leave_by_products(level: str) -> None:
    """MGDA (Sener & Koltun's code: each task's gradient of the shared representation from a
    per-task pass, heads' gradients zeroed unused) and FGSM adversarial training (the clean
    pass is for the input's gradient): what such a pass leaves on parameters is a by-product,
    dropping it is no discard and no stale sum."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 8)
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])
    opt = torch.optim.SGD(list(shared.parameters()) + list(heads.parameters()), lr=0.1)
    m = nn.Linear(4, 1)
    opt_m = torch.optim.SGD(m.parameters(), lr=0.1)
    with gradwatch.watch(on_anomaly="log", level=level) as w:
        for _ in range(3):
            x, ys = torch.randn(16, 4), [torch.randn(16, 1) for _ in range(2)]
            with torch.no_grad():
                rep = shared(x)
            grads = []
            for t in range(2):
                opt.zero_grad()
                rep_variable = rep.detach().clone().requires_grad_()
                F.mse_loss(heads[t](rep_variable), ys[t]).backward()
                grads.append(rep_variable.grad.clone())
            opt.zero_grad()
            rep = shared(x)
            sum(0.5 * F.mse_loss(heads[t](rep), ys[t]) for t in range(2)).backward()
            opt.step()
        for _ in range(3):
            x, y = torch.randn(8, 4, requires_grad=True), torch.randn(8, 1)
            F.mse_loss(m(x), y).backward()
            x_adv = (x + 0.1 * x.grad.sign()).detach()
            opt_m.zero_grad()
            F.mse_loss(m(x_adv), y).backward()
            opt_m.step()
    _silent(w)
