"""Records wait for an optimizer step before they are flushed; a hand-written update loop has
none: its records are flushed once as many wait as the buffer holds (memory stays bounded),
and nothing is lost (counts exact, the jsonl has them all)."""

from __future__ import annotations

import json

import torch

import gradwatch


def test_a_loop_without_an_optimizer_keeps_its_waiting_records_bounded(tmp_path) -> None:
    torch.manual_seed(0)
    w_, b = torch.randn(3, requires_grad=True), torch.randn(1, requires_grad=True)
    x, y = torch.randn(16, 3), torch.randn(16)
    most = 0
    with gradwatch.watch(on_anomaly="log", max_events=50, log_dir=str(tmp_path)) as w:
        for _ in range(200):
            loss = (x @ w_ + b - y).pow(2).mean()
            loss.backward()
            with torch.no_grad():
                w_ -= 0.01 * w_.grad
                b -= 0.01 * b.grad
            w_.grad = None
            b.grad = None
            most = max(most, w._runtime.emit.buffer.pending)
    assert most <= 50 + 4  # one pass's records over the bound at most
    assert w.counts["grad_accumulated"] == 400 and w.counts["inplace_no_grad"] == 400
    lines = [json.loads(line) for line in (tmp_path / "gradwatch.jsonl").read_text().splitlines()]
    written = sum(r.get("count", 1) for r in lines if r.get("kind") == "inplace_no_grad")
    assert written == 400


def test_module_discovery_retires_in_a_loop_without_optimizer_steps() -> None:
    """The global forward pre-hook of module discovery costs a call per module call; without
    optimizer steps it retires after 64 backward passes without a new module."""
    from torch import nn

    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with gradwatch.watch(on_anomaly="log") as w:
        for i in range(70):
            m(torch.randn(8, 4)).pow(2).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.01 * p.grad
            m.zero_grad()
            if i == 10:
                assert w._runtime.modules._hook is not None
        assert w._runtime.modules._hook is None
    assert w.distinct_anomalies() == []
