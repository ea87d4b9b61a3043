"""gradwatch's added time per step at each benchmark model's *structure*, with its tensors shrunk.

    python -m benchmarks.structure                       # all models, 21 reps
    python -m benchmarks.structure --models gpt --reps 41
    python -m benchmarks.structure --full-size benchmarks/results/cpu_latest.json

Why: on a shared 2-core machine the full-size CNN/GPT/ResNet steps (40-150 ms) scatter by
±5-10 % between repetitions, far more than the 1-3 % targets. What gradwatch adds to a step
depends on the model's structure -- how many torch calls, saved tensors, parameters, grad-mode
switches and hooks a step has -- not on the sizes of its tensors (statistics samples are capped
at 1024 elements per tensor; only the statistics step's NaN probe reads every parameter byte).
So each model is rebuilt with the same layers, parameters, optimizer and step, but tiny widths
and batches: the step takes ~0.5-10 ms, and the paired difference ``watched - unwatched`` (in
µs per step, statistics steps included) is measured to a few percent of itself.

``--full-size JSON`` (the output of ``overhead.py --json``) divides that difference by the
full-size model's unwatched step time: an *estimate* of the overhead at full size. It is a lower
bound in one respect: at full size the caches are colder between gradwatch's hooks, so each
entry costs more. The script measures that factor on the MLP, whose full size is cheap to run
(``mlp@full``: the same difference at the real MLP size), and prints it beside the estimates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import gradwatch

from ._harness import EmptyMode
from ._models import MLP, ResNet18, SmallCNN, build_mlp, classify_step, make_gpt

# name -> (builder of (model, optimizer, batch, step function), what was shrunk)
_CPU = torch.device("cpu")


def _mlp() -> tuple:
    model = MLP(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, opt, (torch.randn(4, 16), torch.randint(0, 10, (4,))), classify_step


def _cnn() -> tuple:
    model = SmallCNN()
    model.fc = torch.nn.Linear(64 * 2 * 2, 10)  # for 8×8 images
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return (model, opt, (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))),
            classify_step)


def _gpt() -> tuple:
    return make_gpt(256, 32, 4, 4, 16, 2, _CPU)


def _resnet18() -> tuple:
    model = ResNet18(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return (model, opt, (torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))),
            classify_step)


SHRUNK: dict[str, tuple[Callable[[], tuple], str]] = {
    "mlp": (_mlp, "width 16, batch 4"),
    "mlp@full": (lambda: build_mlp(False, _CPU), "the real MLP (calibration)"),
    "cnn": (_cnn, "8×8 images, batch 2"),
    "gpt": (_gpt, "d=32, seq 16, batch 2 (4 layers, 4 heads, AdamW as at full size)"),
    "resnet18": (_resnet18, "width 4, 32×32, batch 2 (all 18 layers)"),
}
VARIANTS = ("unwatched", "empty_mode", "light", "full")


def _context(variant: str, model: Any, opt: Any) -> Any:
    if variant == "unwatched":
        return contextlib.nullcontext()
    if variant == "empty_mode":  # the naive floor: an always-on pass-through function mode
        return EmptyMode()
    return gradwatch.watch(model, opt, level=variant, on_anomaly="log")


def measure(name: str, reps: int, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, opt, (x, y), step = SHRUNK[name][0]()
    means: dict[str, list[float]] = {v: [] for v in VARIANTS}
    problems: list[str] = []  # anomalies reported on these clean loops: false positives
    for r in range(reps):
        k = r % len(VARIANTS)
        order = VARIANTS[k:] + VARIANTS[:k]
        for variant in order:
            with _context(variant, model, opt) as session:
                for _ in range(warmup):
                    step(model, opt, x, y)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(model, opt, x, y)
                means[variant].append((time.perf_counter() - t0) / steps)
            if isinstance(session, gradwatch.Watch):
                problems += [f"{variant}: {ev.describe()}" for ev in session.anomalies]
    base = means["unwatched"]
    out: dict[str, Any] = {"model": name, "shrunk": SHRUNK[name][1], "problems": problems,
                           "unwatched_ms": 1e3 * statistics.median(base)}
    for variant in VARIANTS[1:]:
        deltas = [v - b for v, b in zip(means[variant], base)]
        q1, _, q3 = statistics.quantiles(deltas, n=4) if len(deltas) > 1 else (0.0, 0.0, 0.0)
        out[variant] = {"delta_us": 1e6 * statistics.median(deltas),
                        "iqr_half_us": 1e6 * (q3 - q1) / 2}
    return out


def _full_size_steps(path: str | None) -> dict[str, float]:
    """model -> full-size unwatched step (ms), from an ``overhead.py --json`` file."""
    if not path:
        return {}
    with open(path) as f:
        data = json.load(f)
    return {model: result["variants"]["unwatched"]["step_ms"]
            for model, result in data.get("results", {}).items()
            if "unwatched" in result.get("variants", {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(SHRUNK))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per rep (a multiple of "
                    "stats_every=10: statistics steps are paid at their real rate)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--full-size", dest="full_size", default=None,
                    help="overhead.py --json output: estimate the overhead at full size")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHRUNK]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(SHRUNK)}")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    full_steps = _full_size_steps(args.full_size)
    rows = [measure(m, args.reps, args.steps, args.warmup) for m in models]
    print(f"gradwatch's added time per step at each model's structure (tensors shrunk), 1 thread, "
          f"{args.reps} reps × {args.steps} steps, median of paired per-rep differences")
    print()
    print("| model | shrunk to | unwatched step | empty mode: Δ µs/step | light: Δ µs/step "
          "| full: Δ µs/step | estimate at full size: light | full |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        full_ms = full_steps.get(row["model"])
        est = {v: (f"{row[v]['delta_us'] / (10 * full_ms):+.2f}%" if full_ms else "—")
               for v in ("light", "full")}
        print(f"| {row['model']} | {row['shrunk']} | {row['unwatched_ms']:.2f} ms "
              f"| {row['empty_mode']['delta_us']:+.0f} ±{row['empty_mode']['iqr_half_us']:.0f} "
              f"| {row['light']['delta_us']:+.0f} ±{row['light']['iqr_half_us']:.0f} "
              f"| {row['full']['delta_us']:+.0f} ±{row['full']['iqr_half_us']:.0f} "
              f"| {est['light']} | {est['full']} |")
        row["full_size_step_ms"] = full_ms
    by_name = {r["model"]: r for r in rows}
    if "mlp" in by_name and "mlp@full" in by_name:
        for v in ("light", "full"):
            small, real = by_name["mlp"][v]["delta_us"], by_name["mlp@full"][v]["delta_us"]
            if small > 0:
                print(f"\ncold-cache factor ({v}, MLP): full size costs {real / small:.2f}× "
                      "the shrunk structure's Δ")
    problems = [p for row in rows for p in row["problems"]]
    for p in problems:
        print(f"PROBLEM (a clean loop reported an anomaly): {p}", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"torch": torch.__version__, "reps": args.reps, "steps": args.steps,
                       "rows": rows}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
