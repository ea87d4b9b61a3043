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


def test_writes_without_backward_or_step_keep_their_records_bounded(tmp_path) -> None:
    """A loop of no_grad writes with no backward pass and no optimizer step (gradient-free
    training: evolution strategies, Hebbian rules; a weight-editing loop) has no boundary: its
    records are flushed once as many wait as the buffer holds, and nothing is lost."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    noise = torch.randn_like(model.weight)
    most = 0
    with (gradwatch.watch(model, on_anomaly="log", max_events=50, log_dir=str(tmp_path)) as w,
          torch.no_grad()):
        for _ in range(500):
            model.weight.add_(noise, alpha=1e-3)
            most = max(most, w._runtime.emit.buffer.pending)
    assert most == 49  # flushed on the 50th
    assert w.counts["inplace_no_grad"] == 500
    assert len(w.events) == 50
    # (the weight is at version 1 from its initialisation: the last 50 writes, each one bump)
    assert [(e.version_before, e.version_after) for e in w.events] == [
        (v, v + 1) for v in range(451, 501)]
    assert {e.tensor for e in w.events} == {"weight"}
    assert w.distinct_anomalies() == []
    lines = [json.loads(line) for line in (tmp_path / "gradwatch.jsonl").read_text().splitlines()]
    written = sum(r.get("count", 1) for r in lines if r.get("kind") == "inplace_no_grad")
    assert written == 500


def test_a_statistics_pass_measures_each_lines_first_write_into_a_tensor() -> None:
    """Change statistics of a statistics pass come from each line's first write into a tensor:
    a loop writing one tensor many times between backward passes pays for one sample per pass
    (each holds two copies until the flush), not one per write; another line is measured."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    noise = torch.randn_like(model.weight)
    with gradwatch.watch(model, on_anomaly="log", stats_every=2) as w:
        with torch.no_grad():
            for _ in range(30):  # pass 0: a statistics pass
                model.weight.add_(noise, alpha=1e-3)
        model(torch.randn(4, 8)).sum().backward()  # pass 1: none
        with torch.no_grad():
            for _ in range(5):
                model.weight.add_(noise, alpha=1e-3)
        model(torch.randn(4, 8)).sum().backward()  # pass 2: a statistics pass
        with torch.no_grad():
            for _ in range(5):
                model.weight.add_(noise, alpha=1e-3)
            model.weight.mul_(0.5)  # another line: measured too
    writes = [e for e in w.events if e.kind == "inplace_no_grad"]
    assert len(writes) == 41
    measured = [i for i, e in enumerate(writes) if e.change is not None]
    assert measured == [0, 35, 40]
    assert writes[0].change.max_abs > 0
