"""Same seed, with and without ``watch()``: parameters, buffers, optimizer state, losses and the
RNG stream are bit-identical (torch.equal) after N steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12  # crosses two statistics steps with stats_every=10 (and every step with 1)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
}


def _run(make_opt, watch_kwargs: dict | None, amp: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
    )
    opt = make_opt(model.parameters())
    losses: list[torch.Tensor] = []

    def body() -> None:
        for i in range(STEPS):
            x = torch.randn(8, 6)  # global RNG: any extra draw by gradwatch would shift it
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if i % 4 == 3:
                with torch.no_grad():  # an EMA-style user edit, seen by the mode
                    model[0].weight.mul_(0.999)
            losses.append(loss.detach())
        model.eval()
        with torch.no_grad():
            losses.append(model(torch.randn(3, 6)))
        model.train()

    if watch_kwargs is None:
        body()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", gradwatch.GradWatchWarning)  # a correct loop: silent
            with gradwatch.watch(model, opt, **watch_kwargs):
                body()
    state = [t.detach().clone() for t in model.state_dict().values()]
    opt_state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return state, opt_state, losses, torch.get_rng_state(), torch.rand(4)


def _assert_equal(a, b) -> None:
    for xs, ys in zip(a, b):
        if isinstance(xs, torch.Tensor):
            assert torch.equal(xs, ys)
            continue
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype
            assert torch.equal(x, y)


@pytest.mark.parametrize("level", ["full", "light"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_bit_identical(name: str, level: str) -> None:
    ref = _run(OPTIMIZERS[name], None)
    got = _run(OPTIMIZERS[name], {"level": level})
    _assert_equal(ref, got)
    assert len(got[1]) > 0 or name.startswith("sgd")


@pytest.mark.parametrize("level", ["full", "light"])
@pytest.mark.parametrize("name", ["sgd", "adam-foreach", "adamw-fused"])
def test_amp_bf16_autocast_bit_identical(name: str, level: str) -> None:
    ref = _run(OPTIMIZERS[name], None, amp=True)
    got = _run(OPTIMIZERS[name], {"level": level}, amp=True)
    _assert_equal(ref, got)


@pytest.mark.parametrize("level", ["full", "light"])
def test_statistics_every_step_bit_identical(level: str) -> None:
    """Change and update statistics sample tensors on statistics steps: still no effect."""
    ref = _run(OPTIMIZERS["adam"], None)
    got = _run(OPTIMIZERS["adam"], {"level": level, "stats_every": 1})
    _assert_equal(ref, got)


def test_zero_config_and_no_stats_bit_identical() -> None:
    ref = _run(OPTIMIZERS["adamw-foreach"], None)
    with gradwatch.watch(change_stats=False, check_nonfinite=False):
        pass
    got = _run(OPTIMIZERS["adamw-foreach"], {"change_stats": False, "check_nonfinite": False})
    _assert_equal(ref, got)


def test_dropout_rng_stream_unchanged_under_no_grad_edits() -> None:
    """Dropout masks drawn inside the watch equal those drawn outside (RNG consumption)."""

    def masks(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        drop = nn.Dropout(0.5)
        p = nn.Parameter(torch.ones(64))
        out = []

        def body() -> None:
            for _ in range(5):
                out.append(drop(p))
                out[-1].sum().backward()
                with torch.no_grad():
                    p.sub_(0.01 * p.grad)
                    p.grad = None

        if watched:
            with gradwatch.watch(stats_every=1):
                body()
        else:
            body()
        return [o.detach() for o in out] + [torch.rand(2)]

    for a, b in zip(masks(False), masks(True)):
        assert torch.equal(a, b)


def _distill(watch_kwargs: dict | None, zero_config: bool = False) -> list[torch.Tensor]:
    """A student trained on an eval-mode Transformer teacher's outputs (distillation)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    teacher = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    student = nn.Linear(16, 16)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def body() -> None:
        for _ in range(4):
            x = torch.randn(4, 6, 16)
            with torch.no_grad():
                target = teacher(x) + attention(x, x, x)[0]
            loss = (student(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    if watch_kwargs is None:
        body()
    else:
        args = () if zero_config else (student, opt)
        with gradwatch.watch(*args, on_anomaly="raise", **watch_kwargs) as w:
            body()
        assert w.anomalies == []
        for m in [*teacher.modules(), attention]:  # the per-module hooks are gone
            assert not m._forward_pre_hooks and not m._forward_hooks
    return [p.detach().clone() for p in student.parameters()]


@pytest.mark.parametrize("zero_config", [False, True])
@pytest.mark.parametrize("level", ["full", "light"])
def test_eval_transformer_fast_path_kept(level: str, zero_config: bool) -> None:
    """Attention and encoder modules in eval take a fused fast path only when no function mode
    is active; its outputs differ from the unfused ones in the last bits. The watch steps its
    mode aside for them, so training fed by them stays bit-identical."""
    ref = _distill(None)
    got = _distill({"level": level}, zero_config)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("level", ["full", "light"])
def test_watching_resumes_after_an_eval_attention_forward_raised(level: str) -> None:
    attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    w2 = nn.Parameter(torch.ones(3))
    with gradwatch.watch(attention, level=level, on_anomaly="log") as w, torch.no_grad():
        with pytest.raises((RuntimeError, AssertionError)):
            attention(torch.randn(2, 4, 16), torch.randn(2, 4, 7), torch.randn(2, 4, 16))
        w2.mul_(2.0)  # still seen: the mode is back
    assert w.counts.get("inplace_no_grad") == 1
