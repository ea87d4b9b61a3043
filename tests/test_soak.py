"""Soak: thousands of watched steps keep the live-object count and RSS flat (slow)."""

from __future__ import annotations

import gc
import itertools
import os
import warnings

import psutil
import pytest
import torch
from torch import nn

import gradwatch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _loop(model, opt, steps: int, i0: int) -> None:
    for i in range(i0, i0 + steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model[0].weight.mul_(0.9999)  # an inplace_no_grad event every step
            if i % 7 == 0:
                model[2].bias.add_(0.0)
        if i % 11 == 0:
            pending = model(x).sum()  # a graph never backwarded
            del pending
        if i % 13 == 0:
            h = model[0](x)
            with torch.no_grad():
                h.detach().mul_(1.0)  # a detach alias write (grad flow cut bookkeeping)


@pytest.mark.parametrize("level", ["full", "light"])
def test_soak_flat_objects_and_rss(level: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    proc = psutil.Process(os.getpid())
    warmup, chunk, chunks = 300, 800, 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)
        with gradwatch.watch(model, opt, level=level, max_events=500, stats_every=5,
                             log_dir=str(tmp_path)) as w:
            _loop(model, opt, warmup, 0)
            gc.collect()
            objects = [len(gc.get_objects())]
            rss = [proc.memory_info().rss]
            i = warmup
            for _ in range(chunks):
                _loop(model, opt, chunk, i)
                i += chunk
                gc.collect()
                objects.append(len(gc.get_objects()))
                rss.append(proc.memory_info().rss)
    total = warmup + chunk * chunks
    assert w.counts["optimizer_update"] == total
    assert w.counts["inplace_no_grad"] == total + len(range(0, total, 7))
    assert len(w.events) == 500
    # flat: no growth proportional to steps (a leak of one object per step would add >= 800)
    growth = [b - a for a, b in itertools.pairwise(objects)]
    assert max(growth) < 200, objects
    assert objects[-1] - objects[0] < 300, objects
    assert rss[-1] - rss[1] < 8 * 2**20, rss
    lines = (tmp_path / "gradwatch.jsonl").read_text().splitlines()
    assert len(lines) >= total  # one optimizer_update per step at least
