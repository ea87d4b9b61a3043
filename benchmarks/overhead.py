"""gradwatch overhead benchmark: one process, interleaved variants, paired ratios.

    python benchmarks/overhead.py                      # full suite (~6-9 min on 2 CPU cores)
    python benchmarks/overhead.py --quick              # smoke run (tiny sizes, a few steps)
    python benchmarks/overhead.py --device cuda --json runs/bench_cuda.json
    python benchmarks/overhead.py --models mlp,gpt --reps 9 --update-readme

For every model the same model, optimizer and batch are driven through each *variant*:

    unwatched    plain training step
    empty_mode   an always-on TorchFunctionMode that only forwards (the naive floor)
    full         gradwatch.watch(model, opt, level="full", on_anomaly="log")
    light        gradwatch.watch(model, opt, level="light", on_anomaly="log")
    anomaly      torch.autograd.set_detect_anomaly(True, check_nan=False)
    anomaly_nan  torch.autograd.detect_anomaly()                 (check_nan=True)

One training step = forward, backward, clip_grad_norm_, optimizer.step, zero_grad.

Timing: ``--reps`` repetitions; in each, every variant runs once (round-robin, the order
rotated per rep). A run enters its context once, does ``warmup`` untimed steps, then ``steps``
timed ones (steady state). Per rep and variant we take the mean step time (so that work done
only on some steps, gradwatch's statistics steps, is paid for at its real rate); the overhead is
the median over reps of ``mean(variant) / mean(unwatched)`` of the *same* rep (paired), and the
spread is the inter-quartile range of those per-rep ratios. Noise from other processes hits
neighbouring runs alike, so paired ratios are far steadier than absolute times.

A separate untimed probe pass per variant counts torch calls per step (a counting
TorchFunctionMode; for gradwatch the calls that reached its own mode) and the peak memory
(process RSS sampled every ms, glibc arenas trimmed first; on CUDA ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import gradwatch
from gradwatch.errors import GradWatchWarning

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

VARIANTS = ("unwatched", "empty_mode", "full", "light", "anomaly", "anomaly_nan")
VARIANT_TITLES = {
    "unwatched": "unwatched",
    "empty_mode": "empty TorchFunctionMode",
    "full": 'gradwatch level="full"',
    "light": 'gradwatch level="light"',
    "anomaly": "set_detect_anomaly(check_nan=False)",
    "anomaly_nan": "detect_anomaly() (check_nan)",
}
# Targets of issue 6 (overhead in % vs unwatched). "full" must also be at most a third of
# set_detect_anomaly(check_nan=False) on the same model.
TARGETS = {
    "full": {"mlp": 25.0, "cnn": 5.0, "gpt": 3.0},
    "light": {"mlp": 5.0, "cnn": 1.0, "gpt": 1.0},
}


# ----------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A GPT-2 block (pre-norm, causal self-attention, GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + idt, inplace=True)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (11.2 M parameters with 100 classes), no torchvision."""

    def __init__(self, classes: int = 100, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        chans = [w, 2 * w, 4 * w, 8 * w]
        blocks: list[nn.Module] = []
        cin = w
        for i, c in enumerate(chans):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------- specs
@dataclass
class Spec:
    """One benchmark model: how to build it, its batch and its run lengths."""

    name: str
    title: str
    build: Callable[[bool, torch.device], tuple[nn.Module, Any, tuple, Callable]]
    steps: int  # timed steps per rep
    warmup: int
    lightning: bool = False
    default: bool = True
    notes: str = ""


def _classify_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> None:
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def build_mlp(quick: bool, dev: torch.device) -> tuple:
    model = MLP().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = (torch.randn(64, 256, device=dev), torch.randint(0, 10, (64,), device=dev))
    return model, opt, batch, _classify_step


def build_cnn(quick: bool, dev: torch.device) -> tuple:
    model = SmallCNN().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n = 8 if quick else 64
    batch = (torch.randn(n, 3, 32, 32, device=dev), torch.randint(0, 10, (n,), device=dev))
    return model, opt, batch, _classify_step


def _gpt(vocab: int, d: int, layers: int, heads: int, seq: int, bs: int, dev: torch.device) -> tuple:
    model = GPT(vocab, d, layers, heads, seq).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (bs, seq), device=dev)
    y = torch.randint(0, vocab, (bs, seq), device=dev)
    return model, opt, (x, y), _lm_step


def build_gpt(quick: bool, dev: torch.device) -> tuple:
    if quick:
        return _gpt(512, 64, 1, 4, 32, 2, dev)
    return _gpt(256, 256, 4, 4, 128, 8, dev)


def build_gpt2s(quick: bool, dev: torch.device) -> tuple:
    if quick:
        return _gpt(512, 96, 1, 12, 32, 2, dev)
    return _gpt(8192, 768, 2, 12, 128, 2, dev)


def build_resnet18(quick: bool, dev: torch.device) -> tuple:
    model = ResNet18(width=16 if quick else 64).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    n, r = (2, 32) if quick else (8, 64)
    batch = (torch.randn(n, 3, r, r, device=dev), torch.randint(0, 100, (n,), device=dev))
    return model, opt, batch, _classify_step


SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec("mlp", "MLP 3×256, batch 64, SGD momentum", build_mlp, steps=60, warmup=10),
        Spec("cnn", "CNN 2 conv+BN, 32×32, batch 64, SGD momentum", build_cnn, steps=10, warmup=3),
        Spec("gpt", "GPT 4 layers d=256, seq 128, batch 8, vocab 256, AdamW (for-loop)", build_gpt,
             steps=5, warmup=2),
        Spec("resnet18", "ResNet-18 (11.2 M params), 64×64, batch 8, SGD momentum+wd",
             build_resnet18, steps=4, warmup=2),
        Spec("lightning", "Lightning Trainer.fit: MLP 3×256, batch 64, SGD momentum, "
             "gradient_clip_val=1", build_mlp, steps=40, warmup=10, lightning=True),
        Spec("gpt2s", "GPT-2-small blocks (d=768, 12 heads) ×2, seq 128, batch 2, vocab 8192, "
             "AdamW", build_gpt2s, steps=4, warmup=2, default=False),
    ]
}


# ----------------------------------------------------------------------------------- variants
class EmptyMode(TorchFunctionMode):
    """The naive floor: an always-on function mode that only forwards."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class CountingMode(TorchFunctionMode):
    """Counts torch calls (all, and those with grad mode off)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.no_grad = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        self.calls += 1
        if not torch.is_grad_enabled():
            self.no_grad += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_gradwatch_mode() -> Iterator[list[int]]:
    """Count calls that reach gradwatch's own function mode (patched on the class, undone)."""
    from gradwatch._intercept.mode import WatchMode

    box = [0]
    original = WatchMode.__torch_function__

    def counting(self: Any, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        box[0] += 1
        return original(self, func, types, args, kwargs)

    WatchMode.__torch_function__ = counting  # type: ignore[method-assign]
    try:
        yield box
    finally:
        WatchMode.__torch_function__ = original  # type: ignore[method-assign]


def _watch_fn() -> Callable[..., Any]:
    """``gradwatch.watch``, taken from its module: after ``import gradwatch.lightning`` (or any
    ``gradwatch.watch`` submodule import) the package attribute ``gradwatch.watch`` is the
    submodule, not the function (lazy ``__getattr__`` exports; reported as a core bug)."""
    import importlib

    return importlib.import_module("gradwatch.session").watch


def _lightning_callback() -> type | None:
    try:
        from gradwatch.lightning import GradWatchCallback
    except Exception:
        return None
    return GradWatchCallback


class Session:
    """What a variant's context leaves behind: the watch (to read anomalies back)."""

    def __init__(self) -> None:
        self.watch: Any = None
        self.callback: Any = None

    def anomalies(self) -> list[Any]:
        for owner in (self.watch, self.callback, getattr(self.callback, "watch", None),
                      getattr(self.callback, "_watch", None)):
            found = getattr(owner, "anomalies", None) if owner is not None else None
            if isinstance(found, (list, tuple)):
                return list(found)
        return []


def variant_context(variant: str, model: nn.Module | None, opt: Any, session: Session,
                    empty_mode: type = EmptyMode) -> contextlib.AbstractContextManager:
    if variant == "unwatched":
        return contextlib.nullcontext()
    if variant == "empty_mode":
        return empty_mode()
    if variant in ("full", "light"):
        w = _watch_fn()(model, opt, level=variant, on_anomaly="log")
        session.watch = w
        return w
    if variant == "anomaly":
        return torch.autograd.set_detect_anomaly(True, check_nan=False)
    if variant == "anomaly_nan":
        return torch.autograd.detect_anomaly(check_nan=True)
    raise ValueError(f"unknown variant {variant!r}")


# ----------------------------------------------------------------------------------- runners
# The step clock: wall time (default), or the process's CPU time (``--clock cpu``: steadier on a
# shared machine, where waiting for a core shows up in wall time but not in CPU time).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class PlainRunner:
    """A hand-written loop: enter the variant once, warm up, time each step."""

    def __init__(self, spec: Spec, quick: bool, dev: torch.device) -> None:
        self.spec, self.dev = spec, dev
        self.model, self.opt, self.batch, self.step_fn = spec.build(quick, dev)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, variant: str, warmup: int, steps: int, session: Session,
            on_step: Callable[[int], None] | None = None, empty_mode: type = EmptyMode
            ) -> list[float]:
        model, opt, (x, y), step_fn, dev = self.model, self.opt, self.batch, self.step_fn, self.dev
        times: list[float] = []
        clock = CLOCK[0]
        with variant_context(variant, model, opt, session, empty_mode):
            for i in range(warmup + steps):
                if on_step is not None:
                    on_step(i)
                t0 = clock()
                step_fn(model, opt, x, y)
                _sync(dev)
                if i >= warmup:
                    times.append(clock() - t0)
        if on_step is not None:
            on_step(warmup + steps)
        return times


class LightningRunner:
    """``Trainer.fit`` on an MLP; step time = interval between ``on_train_batch_end`` calls."""

    def __init__(self, spec: Spec, quick: bool, dev: torch.device) -> None:
        import pytorch_lightning as pl

        for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.pl, self.spec, self.dev = pl, spec, dev
        self.callback_cls = _lightning_callback()
        net, _, (x, y), _ = build_mlp(quick, torch.device("cpu"))
        self.net = net
        self.x, self.y = x, y

        class LitMLP(pl.LightningModule):
            def __init__(self, net: nn.Module) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

        self.module = LitMLP(net)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def run(self, variant: str, warmup: int, steps: int, session: Session,
            on_step: Callable[[int], None] | None = None, empty_mode: type = EmptyMode
            ) -> list[float]:
        pl, dev = self.pl, self.dev
        total = warmup + steps
        ds = torch.utils.data.TensorDataset(self.x.repeat(total, 1), self.y.repeat(total))
        loader = torch.utils.data.DataLoader(ds, batch_size=self.x.shape[0], shuffle=False)
        stamps: list[float] = []

        class Clock(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any,
                                     batch_idx: int) -> None:
                if not stamps:  # the first step starts here (setup excluded)
                    _sync(dev)
                    stamps.append(CLOCK[0]())
                if on_step is not None:
                    on_step(batch_idx)

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                _sync(dev)
                stamps.append(CLOCK[0]())

        class AnomalyOn(pl.Callback):
            """Lightning runs fit under set_detect_anomaly(trainer.detect_anomaly): a context
            around fit would be switched off, so anomaly mode is set inside the fit loop."""

            def __init__(self, check_nan: bool) -> None:
                self.check_nan = check_nan
                self.prev = (False, True)

            def on_train_start(self, trainer: Any, module: Any) -> None:
                self.prev = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
                torch.set_anomaly_enabled(True, self.check_nan)

            def on_train_end(self, trainer: Any, module: Any) -> None:
                torch.set_anomaly_enabled(*self.prev)

        callbacks: list[Any] = [Clock()]
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if variant in ("anomaly", "anomaly_nan"):
            callbacks.append(AnomalyOn(check_nan=variant == "anomaly_nan"))
        elif variant in ("full", "light") and self.callback_cls is not None:
            session.callback = self.callback_cls(level=variant, on_anomaly="log")
            callbacks.append(session.callback)
        else:
            ctx = variant_context(variant, self.module, None, session, empty_mode)
        # The callback's default sinks (TensorBoard + gradwatch.jsonl under
        # <default_root_dir>/gradwatch) are part of what a Lightning user pays: kept, in a temp dir.
        root = tempfile.mkdtemp(prefix="gradwatch-bench-")
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, max_steps=total,
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            gradient_clip_val=1.0, callbacks=callbacks,
        )
        try:
            with ctx:
                trainer.fit(self.module, loader)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if on_step is not None:
            on_step(total)
        deltas = [b - a for a, b in itertools.pairwise(stamps)]
        return deltas[warmup:]


def make_runner(spec: Spec, quick: bool, dev: torch.device) -> PlainRunner | LightningRunner:
    return LightningRunner(spec, quick, dev) if spec.lightning else PlainRunner(spec, quick, dev)


# ----------------------------------------------------------------------------------- probes
def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class RssSampler:
    """Peak RSS over a region, sampled every millisecond in a thread (probe pass only)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self) -> RssSampler:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def probe(runner: Any, variant: str, warmup: int, steps: int, dev: torch.device) -> dict[str, Any]:
    """Untimed pass: torch calls per step, calls that reached the variant's mode, peak memory."""
    out: dict[str, Any] = {}
    counter = CountingMode() if variant == "unwatched" else None
    count_at = warmup  # count during this step (steady state)
    gw_box: list[int] = [0]
    gw_ctx: list[Any] = []
    empty_counts: list[CountingMode] = []

    class CountingEmpty(CountingMode):  # the empty mode, counting what it sees
        def __init__(self) -> None:
            super().__init__()
            self.active = False
            empty_counts.append(self)

        def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            if self.active:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    def on_step(i: int) -> None:
        if i == count_at:
            if counter is not None:
                counter.__enter__()
            if empty_counts:
                empty_counts[0].active = True
            if variant in ("full", "light"):
                cm = count_gradwatch_mode()
                gw_ctx.append(cm)
                gw_box[:] = [0]
                box = cm.__enter__()
                gw_ctx.append(box)
        elif i == count_at + 1:
            if counter is not None:
                counter.__exit__(None, None, None)
            if empty_counts:
                empty_counts[0].active = False
            if gw_ctx:
                gw_box[0] = gw_ctx[1][0]
                gw_ctx[0].__exit__(None, None, None)
                gw_ctx.clear()

    _trim()
    session = Session()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        cuda0 = torch.cuda.memory_allocated(dev)
    rss0 = _rss()
    with RssSampler() as sampler, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.run(variant, warmup, max(steps, 2), session, on_step=on_step,
                   empty_mode=CountingEmpty)
    out["peak_rss_mb"] = (sampler.peak - rss0) / 2**20
    if dev.type == "cuda":
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated(dev) - cuda0) / 2**20
    if counter is not None:
        out["torch_calls"] = counter.calls
        out["torch_calls_no_grad"] = counter.no_grad
    if variant == "empty_mode" and empty_counts:
        out["intercepted"] = empty_counts[0].calls
    elif variant in ("full", "light"):
        out["intercepted"] = gw_box[0]
    else:
        out["intercepted"] = 0
    out["problems"] = _problems(variant, session, caught)
    return out


def _problems(variant: str, session: Session, caught: list[Any]) -> list[str]:
    """Anything gradwatch reported on a clean loop: an anomaly is a false positive."""
    problems = []
    for ev in session.anomalies():
        text = ev.describe() if hasattr(ev, "describe") else str(ev)
        problems.append(f"false anomaly under {variant}: {text}")
    for w in caught:
        if issubclass(w.category, GradWatchWarning) or "gradwatch" in str(w.message):
            problems.append(f"warning under {variant}: {w.category.__name__}: {w.message}")
    return problems


# ----------------------------------------------------------------------------------- stats
def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class ModelResult:
    spec: Spec
    param_bytes: int = 0
    stats_bytes: int = 0  # the two sample copies a statistics step holds (analytic)
    per_rep: dict[str, list[float]] = field(default_factory=dict)  # mean step time per rep
    all_steps: dict[str, list[float]] = field(default_factory=dict)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, dict[str, Any]]:
        base = self.per_rep.get("unwatched", [])
        base_probe = self.probes.get("unwatched", {})
        out: dict[str, dict[str, Any]] = {}
        for variant, reps in self.per_rep.items():
            ratios = [v / b for v, b in zip(reps, base) if b > 0]
            row: dict[str, Any] = {
                "step_ms": 1e3 * statistics.median(reps) if reps else math.nan,
                "step_ms_rep_means": [1e3 * r for r in reps],
                "ratio_median": statistics.median(ratios) if ratios else math.nan,
                "ratio_q25": _quantile(ratios, 0.25),
                "ratio_q75": _quantile(ratios, 0.75),
                "ratios": ratios,
            }
            row["overhead_pct"] = 100 * (row["ratio_median"] - 1)
            row["spread_pct"] = 100 * (row["ratio_q75"] - row["ratio_q25"])
            p = self.probes.get(variant, {})
            row["intercepted_per_step"] = p.get("intercepted")
            row["peak_rss_mb"] = p.get("peak_rss_mb")
            if p.get("peak_rss_mb") is not None and base_probe.get("peak_rss_mb") is not None:
                row["peak_rss_delta_mb"] = p["peak_rss_mb"] - base_probe["peak_rss_mb"]
                row["peak_rss_delta_pct_params"] = (
                    100 * row["peak_rss_delta_mb"] * 2**20 / self.param_bytes
                    if self.param_bytes else None)
            if "peak_cuda_mb" in p:
                row["peak_cuda_mb"] = p["peak_cuda_mb"]
                if "peak_cuda_mb" in base_probe:
                    row["peak_cuda_delta_mb"] = p["peak_cuda_mb"] - base_probe["peak_cuda_mb"]
            out[variant] = row
        return out


def stats_sample_bytes(runner: PlainRunner | LightningRunner) -> int:
    """Bytes of the two sample copies (before/after) gradwatch holds on a statistics step."""
    from gradwatch.session import _stride

    model = getattr(runner, "model", None) or runner.module
    total = 0
    for p in model.parameters():
        n = p.numel()
        total += -(-n // _stride(n)) * p.element_size()
    return 2 * total


# ----------------------------------------------------------------------------------- driver
def run_model(spec: Spec, variants: list[str], reps: int, warmup: int, steps: int, quick: bool,
              dev: torch.device, log: Callable[[str], None]) -> ModelResult:
    result = ModelResult(spec)
    torch.manual_seed(0)
    runner = make_runner(spec, quick, dev)
    result.param_bytes = runner.param_bytes()
    result.stats_bytes = stats_sample_bytes(runner)
    # Create optimizer state and warm allocator caches before anything is measured.
    runner.run("unwatched", 0, max(warmup, 2), Session())
    # Probe pass (untimed): unwatched first, it also counts all torch calls per step.
    for variant in variants:
        p = probe(runner, variant, warmup, 2 if quick else max(3, min(steps, 12)), dev)
        result.problems.extend(p.pop("problems"))
        result.probes[variant] = p
    # Timed pass: round-robin, order rotated per rep.
    for r in range(reps):
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        for variant in order:
            session = Session()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                times = runner.run(variant, warmup, steps, session)
            result.problems.extend(_problems(variant, session, caught))
            result.per_rep.setdefault(variant, []).append(statistics.fmean(times))
            result.all_steps.setdefault(variant, []).extend(times)
        log(f"  {spec.name} rep {r + 1}/{reps}: " + ", ".join(
            f"{v} {1e3 * result.per_rep[v][-1]:.2f} ms" for v in variants))
    result.problems = list(dict.fromkeys(result.problems))
    return result


def machine_info(dev: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gradwatch": gradwatch.__version__,
        "device": str(dev),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "lightning_callback": _lightning_callback() is not None,
    }
    try:
        import pytorch_lightning as pl

        info["pytorch_lightning"] = pl.__version__
    except Exception:
        pass
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    try:
        root = os.path.dirname(HERE)
        info["git"] = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
            text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return info


def _fmt_pct(x: float | None, spread: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    s = f"{x:+.1f}%"
    if spread is not None and not math.isnan(spread):
        s += f" ±{spread / 2:.1f}"
    return s


def markdown_tables(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = []
    mem_col = "peak CUDA Δ MB" if info.get("device", "").startswith("cuda") else "peak RSS Δ MB"
    lines.append(
        "| model | variant | step ms (mean; median of reps) | overhead vs unwatched (IQR/2) | "
        f"torch calls seen by the mode / step | {mem_col} vs unwatched |"
    )
    lines.append("|---|---|---:|---:|---:|---:|")
    for name, res in results.items():
        if res.get("error"):
            lines.append(f"| {name} | **error** | {res['error']} | | | |")
            continue
        summ = res["variants"]
        calls = res.get("torch_calls_per_step")
        for variant, row in summ.items():
            if variant == "unwatched":
                seen = f"0 (of {calls}, {res.get('torch_calls_no_grad_per_step')} no_grad)"
                over = "—"
            else:
                seen = "0" if not row.get("intercepted_per_step") else str(
                    row["intercepted_per_step"])
                over = _fmt_pct(row["overhead_pct"], row["spread_pct"])
            key = "peak_cuda_delta_mb" if mem_col.startswith("peak CUDA") else "peak_rss_delta_mb"
            mem = row.get(key)
            if variant == "unwatched":
                base = row.get("peak_cuda_mb" if key == "peak_cuda_delta_mb" else "peak_rss_mb")
                mem_s = f"({base:.1f} MB peak)" if base is not None else "–"
            else:
                mem_s = f"{mem:+.1f}" if mem is not None else "–"
            lines.append(f"| {name} | {VARIANT_TITLES.get(variant, variant)} | "
                         f"{row['step_ms']:.2f} | {over} | {seen} | {mem_s} |")
    return "\n".join(lines)


def target_table(results: dict[str, Any]) -> str:
    lines = ["| model | full target | full | full ≤ ⅓ anomaly | light target | light |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("mlp", "cnn", "gpt"):
        res = results.get(name)
        if not res or res.get("error"):
            continue
        v = res["variants"]

        def cell(variant: str, name: str = name, v: dict = v) -> str:
            row = v.get(variant)
            limit = TARGETS[variant][name]
            if row is None:
                return "–"
            ok = row["overhead_pct"] <= limit
            return f"{row['overhead_pct']:+.1f}% {'PASS' if ok else 'FAIL'}"

        third = "–"
        if "full" in v and "anomaly" in v:
            lim = v["anomaly"]["overhead_pct"] / 3
            ok = v["full"]["overhead_pct"] <= lim
            third = f"≤ {lim:+.1f}%: {'PASS' if ok else 'FAIL'}"
        lines.append(f"| {name} | ≤ +{TARGETS['full'][name]:g}% | {cell('full')} | {third} | "
                     f"≤ +{TARGETS['light'][name]:g}% | {cell('light')} |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    dev = info.get("gpu") or "CPU"
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads; load avg {info['load_avg_1m_at_start']} at start), "
            f"Python {info['python']}, "
            f"pytorch_lightning {info.get('pytorch_lightning', '–')}, device: {dev}, "
            f"gradwatch {info['gradwatch']} @ {info.get('git', '?')}")


def render(results: dict[str, Any], info: dict[str, Any], cfg: dict[str, Any]) -> str:
    parts = [f"Machine: {machine_line(info)}",
             f"Run: `{cfg['command']}` ({cfg['reps']} reps; per model: "
             + ", ".join(f"{m} {r['steps']}+{r['warmup']} warmup steps"
                         for m, r in results.items() if not r.get("error")) + ")",
             "",
             markdown_tables(results, info),
             "",
             "Targets (issue 6):",
             "",
             target_table(results)]
    parts.append("")
    for name, res in results.items():
        if not res.get("error"):
            share = 100 * res.get("stats_sample_bytes", 0) / max(res["param_bytes"], 1)
            parts.append(f"- `{name}`: {res['title']}; {res['param_bytes'] / 2**20:.1f} MB "
                         f"of parameters; {res.get('torch_calls_per_step')} torch calls/step; "
                         f"a statistics step holds {res.get('stats_sample_bytes', 0) / 2**10:.0f} KB "
                         f"of samples ({share:.1f}% of the parameter bytes)")
    problems = [p for res in results.values() for p in res.get("problems", [])]
    if problems:
        parts.append("\n**Problems seen (gradwatch on a clean loop):**\n")
        parts.extend(f"- {p}" for p in problems)
    return "\n".join(parts)


def update_readme(text: str, path: str = README, tag: str = "cpu") -> None:
    start, end = f"<!-- results:{tag}:start -->", f"<!-- results:{tag}:end -->"
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if start not in doc or end not in doc:
        doc = doc.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(s.name for s in SPECS.values() if s.default),
                    help=f"comma list of {', '.join(SPECS)} (default: all but gpt2s)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list; unwatched is always included")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per rep (per model default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after entering")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (smoke test)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch.set_num_threads (default 2, the issue's protocol; on a shared, "
                    "busy machine use 1: two OpenMP threads that lose a core stall 5-20x)")
    ap.add_argument("--json", dest="json_path", default=None, help="write all results here")
    ap.add_argument("--update-readme", action="store_true",
                    help="replace the results block of benchmarks/README.md (cpu or cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time steps by wall clock (default) or by the process's CPU time")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if dev.type == "cuda":
            print("--clock cpu: CPU time does not measure GPU work; use the wall clock",
                  file=sys.stderr)
            return 2
        CLOCK[0] = time.process_time
    torch.manual_seed(args.seed)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SPECS]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {list(SPECS)}", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    variants = ["unwatched"] + [v for v in variants if v != "unwatched"]
    reps = args.reps or (2 if args.quick else 7)
    warnings.filterwarnings("ignore", message=".*Anomaly Detection has been enabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = machine_info(dev)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"machine: {machine_line(info)}")
    load = os.getloadavg()[0]
    if dev.type == "cpu" and torch.get_num_threads() > 1 and load > 0.5:
        log(f"WARNING: load average {load:.1f} with {torch.get_num_threads()} torch threads: other "
            "processes compete for the cores and OpenMP steps stall; consider --threads 1")
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in models:
        spec = SPECS[name]
        steps = args.steps or (2 if args.quick else spec.steps)
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else spec.warmup)
        log(f"{name}: {spec.title} — {reps} reps × {len(variants)} variants × "
            f"({warmup} warmup + {steps} steps)")
        t0 = time.perf_counter()
        try:
            res = run_model(spec, variants, reps, warmup, steps, args.quick, dev, log)
        except Exception as exc:  # a crash is a result too (a core bug, usually)
            import traceback

            traceback.print_exc()
            results[name] = {"title": spec.title, "error": f"{type(exc).__name__}: {exc}",
                             "problems": [f"{name}: crashed: {type(exc).__name__}: {exc}"]}
            continue
        base = res.probes.get("unwatched", {})
        results[name] = {
            "title": spec.title,
            "steps": steps,
            "warmup": warmup,
            "reps": reps,
            "param_bytes": res.param_bytes,
            "stats_sample_bytes": res.stats_bytes,
            "torch_calls_per_step": base.get("torch_calls"),
            "torch_calls_no_grad_per_step": base.get("torch_calls_no_grad"),
            "variants": res.summary(),
            "problems": res.problems,
            "seconds": time.perf_counter() - t0,
        }
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        for p in res.problems:
            log(f"  PROBLEM: {p}")
    cfg = {"command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
           "reps": reps, "quick": args.quick, "variants": variants, "models": models,
           "seconds": time.perf_counter() - t_start}
    text = render(results, info, cfg)
    print(text)
    if args.json_path:
        d = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(d, exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "config": cfg, "results": results}, f, indent=1,
                      default=str)
    if args.update_readme:
        update_readme(text, tag="cuda" if dev.type == "cuda" else "cpu")
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
