"""The overhead benchmark's machinery: variants, runners, probes, statistics, one model's run.

A *variant* is the context a loop runs in (``unwatched``, ``empty_mode``, gradwatch ``full`` /
``light``, torch's anomaly modes). A *runner* drives one model through ``warmup + steps`` steps
of a variant and returns the timed steps (a hand-written loop, or Lightning's ``Trainer.fit``).
A *probe* is an untimed pass that counts torch calls per step and the peak memory. ``run_model``
does the probe pass, then the interleaved timed repetitions; ``ModelResult.summary`` turns them
into paired ratios. The protocol is described in ``overhead.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import math
import os
import shutil
import statistics
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

from gradwatch.errors import GradWatchWarning

from ._models import Spec, build_mlp

VARIANTS = ("unwatched", "empty_mode", "full", "light", "anomaly", "anomaly_nan")


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


def lightning_callback() -> type | None:
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
        outer = self.spec.context() if self.spec.context else contextlib.nullcontext()
        watched = (None, None) if self.spec.anonymous else (model, opt)
        with outer, variant_context(variant, *watched, session, empty_mode):
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

        if spec.context is not None or spec.count_mode is not None:
            raise ValueError(f"{spec.name}: context / count_mode are for hand-written loops")

        for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.pl, self.spec, self.dev = pl, spec, dev
        self.callback_cls = lightning_callback()
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


def _func_name(func: Any) -> str:
    """``Tensor.grad.__get__`` for a property's getter (a method-wrapper of a descriptor), else
    the function's qualified name."""
    owner = getattr(func, "__self__", None)
    objclass = getattr(owner, "__objclass__", None)
    if objclass is not None and hasattr(owner, "__name__"):
        return f"{objclass.__name__}.{owner.__name__}.{getattr(func, '__name__', '?')}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


@contextlib.contextmanager
def count_mode_calls(mode_cls: type) -> Iterator[dict[str, int]]:
    """Count the calls of ``mode_cls.__torch_function__`` by torch function (patched on the
    class, undone)."""
    calls: dict[str, int] = {}
    original = mode_cls.__dict__["__torch_function__"]

    def counting(self: Any, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = _func_name(func)
        calls[name] = calls.get(name, 0) + 1
        return original(self, func, types, args, kwargs)

    mode_cls.__torch_function__ = counting  # type: ignore[attr-defined]
    try:
        yield calls
    finally:
        mode_cls.__torch_function__ = original  # type: ignore[attr-defined]


def probe(runner: Any, variant: str, warmup: int, steps: int, dev: torch.device) -> dict[str, Any]:
    """Untimed pass: torch calls per step, calls that reached the variant's mode, peak memory;
    for a spec with ``count_mode``, the calls of that mode per step (mean over up to 10 steps,
    so that a statistics step is counted at its rate)."""
    out: dict[str, Any] = {}
    spec = getattr(runner, "spec", None)
    mode_cls = spec.count_mode() if spec is not None and spec.count_mode else None
    mode_window = 10  # (a statistics step every 10 optimizer steps)
    mode_ctx: list[Any] = []
    mode_calls: dict[str, int] = {}
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
        if mode_cls is not None:
            if i == count_at:
                cm = count_mode_calls(mode_cls)
                mode_calls.clear()
                mode_ctx[:] = [cm, cm.__enter__()]
            elif i == count_at + mode_window and mode_ctx:
                mode_calls.update(mode_ctx[1])
                mode_ctx[0].__exit__(None, None, None)
                mode_ctx.clear()
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
        runner.run(variant, warmup, max(steps, 2, mode_window + 1 if mode_cls else 0), session,
                   on_step=on_step, empty_mode=CountingEmpty)
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
    if mode_cls is not None:
        out["count_mode"] = mode_cls.__name__
        out["count_mode_calls"] = sum(mode_calls.values()) / mode_window
        out["count_mode_by_func"] = {k: v / mode_window for k, v in
                                     sorted(mode_calls.items(), key=lambda kv: -kv[1])}
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
            deltas = [1e6 * (v - b) for v, b in zip(reps, base)]  # µs per step, paired
            row: dict[str, Any] = {
                "step_ms": 1e3 * statistics.median(reps) if reps else math.nan,
                "step_ms_rep_means": [1e3 * r for r in reps],
                "ratio_median": statistics.median(ratios) if ratios else math.nan,
                "ratio_q25": _quantile(ratios, 0.25),
                "ratio_q75": _quantile(ratios, 0.75),
                "ratios": ratios,
                "delta_us_median": statistics.median(deltas) if deltas else math.nan,
                "delta_us_q25": _quantile(deltas, 0.25),
                "delta_us_q75": _quantile(deltas, 0.75),
            }
            row["overhead_pct"] = 100 * (row["ratio_median"] - 1)
            row["spread_pct"] = 100 * (row["ratio_q75"] - row["ratio_q25"])
            p = self.probes.get(variant, {})
            row["intercepted_per_step"] = p.get("intercepted")
            row["peak_rss_mb"] = p.get("peak_rss_mb")
            if "count_mode_calls" in p:
                row["count_mode"] = p["count_mode"]
                row["count_mode_calls_per_step"] = p["count_mode_calls"]
                row["count_mode_by_func"] = p["count_mode_by_func"]
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
    try:
        from gradwatch._stats import _stride
    except ImportError:  # gradwatch before its refactor
        from gradwatch.session import _stride  # type: ignore[attr-defined,no-redef]

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
