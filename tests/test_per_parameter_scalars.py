"""``per_parameter_scalars`` passes through ``gradwatch.watch()`` (issue 16): one TensorBoard
scalar per parameter on statistics steps, opt-in, validated at the call."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch

PER_PARAM = "gradwatch/param_update_ratio/"


def scalar_tags(log_dir: str) -> set[str]:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    ea.Reload()
    return set(ea.Tags()["scalars"])


def train(log_dir: str, **options: object) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, log_dir=log_dir, on_anomaly="log", stats_every=1,
                         **options):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()


def test_watch_writes_one_scalar_per_parameter_only_when_asked(tmp_path) -> None:
    train(str(tmp_path / "on"), per_parameter_scalars=True)
    train(str(tmp_path / "off"))
    on, off = scalar_tags(str(tmp_path / "on")), scalar_tags(str(tmp_path / "off"))
    assert {t for t in on if t.startswith(PER_PARAM)} == {
        PER_PARAM + p for p in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert not {t for t in off if t.startswith(PER_PARAM)}
    assert on - off == {t for t in on if t.startswith(PER_PARAM)}


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_non_bool_is_refused_naming_the_argument(value) -> None:
    with pytest.raises(TypeError, match=r"^per_parameter_scalars must be a bool, got "):
        gradwatch.watch(per_parameter_scalars=value)
