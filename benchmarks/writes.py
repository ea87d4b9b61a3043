"""Loops of ``no_grad`` writes with no backward pass: the cost per write and the memory held.

    python -m benchmarks.writes                  # 20,000 writes per loop, 5 rounds
    python -m benchmarks.writes --writes 100000 --rounds 3

Gradient-free training (evolution strategies, Hebbian rules) and weight-editing loops write
parameters under ``no_grad`` with neither backward passes nor optimizer steps: no boundary
flushes their records and no statistics pass ever ends. Two loops on a 256×256 ``nn.Linear``:

- ``one line``: the same line writes the weight again and again (``w.add_(noise)``);
- ``es``: evolution strategies' antithetic step on an MLP 3×256 (perturb, evaluate, perturb
  back, evaluate, update: three lines write each parameter in turn, two forwards under no_grad).

Each runs unwatched, under ``watch(model, level="full")`` and ``level="light"``, interleaved per
round, one thread, CPU clock. Reported: µs per write (per step for ``es``, median of rounds) and
the most resident memory a watched loop left held (after ``gc.collect`` and ``malloc_trim``,
Linux): bounded, since the records flush once ``max_events`` of them wait.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

LEVELS = ("unwatched", "full", "light")


def _rss_mb() -> float:
    """Resident memory, after handing freed heap back to the system (glibc's ``malloc_trim``:
    what the allocator keeps cached is not memory held)."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _context(level: str, model: nn.Module) -> contextlib.AbstractContextManager:
    if level == "unwatched":
        return contextlib.nullcontext()
    return gradwatch.watch(model, level=level, on_anomaly="log")


def one_line(model: nn.Module, n: int) -> None:
    w = model.weight
    noise = torch.full_like(w, 1e-6)
    with torch.no_grad():
        for _ in range(n):
            w.add_(noise)


def es(model: nn.Module, n: int, x: torch.Tensor, y: torch.Tensor, noise: list) -> None:
    sigma, lr = 0.01, 0.01
    params = list(model.parameters())
    with torch.no_grad():
        for _ in range(n):
            for p, e in zip(params, noise):
                p.add_(e, alpha=sigma)
            r_plus = -F.cross_entropy(model(x), y)
            for p, e in zip(params, noise):
                p.sub_(e, alpha=2 * sigma)
            r_minus = -F.cross_entropy(model(x), y)
            g = float(r_plus - r_minus) / (2 * sigma)
            for p, e in zip(params, noise):
                p.add_(e, alpha=sigma + lr * g)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=20000, help="writes per loop (one line)")
    ap.add_argument("--steps", type=int, default=300, help="steps per loop (es)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    noise = [torch.randn_like(p) for p in mlp.parameters()]
    loops = {
        "one line (µs per write)": (linear, lambda m: one_line(m, args.writes), args.writes),
        "es (µs per step, 24 writes)": (mlp, lambda m: es(m, args.steps, x, y, noise), args.steps),
    }
    print(f"torch {torch.__version__}, 1 thread, CPU clock; {args.rounds} rounds, "
          f"{args.writes} writes (one line), {args.steps} steps (es)")
    print("| loop | " + " | ".join(LEVELS) + " | memory held MB, full / light |")
    print("|---|" + "---:|" * (len(LEVELS) + 1))
    for name, (model, run, n) in loops.items():
        times: dict[str, list[float]] = {lv: [] for lv in LEVELS}
        growth: dict[str, float] = {}
        for r in range(args.rounds):
            order = LEVELS[r % len(LEVELS):] + LEVELS[:r % len(LEVELS)]
            for level in order:
                with _context(level, model):
                    before = _rss_mb()
                    t0 = time.process_time()
                    run(model)
                    times[level].append((time.process_time() - t0) / n * 1e6)
                    growth[level] = max(growth.get(level, 0.0), _rss_mb() - before)
        med = {lv: statistics.median(v) for lv, v in times.items()}
        cells = [f"{med['unwatched']:.1f}"] + [
            f"{med[lv]:.1f} (×{med[lv] / med['unwatched']:.1f})" for lv in LEVELS[1:]]
        print(f"| {name} | " + " | ".join(cells)
              + f" | {growth['full']:.0f} / {growth['light']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
