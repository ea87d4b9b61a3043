"""Where does gradwatch's time go? cProfile over steady-state steps, gradwatch frames only.

    python -m benchmarks.profile_gradwatch --model mlp --level full --steps 200
    python -m benchmarks.profile_gradwatch --model gpt --level light --steps 20 --sort cumulative

Prints, per function defined in ``src/gradwatch`` (and the hooks/wrappers it installs), the calls
per training step and the time per call and per step, so that the numbers can be compared with
the step time measured by ``overhead.py``. ``--dump FILE`` keeps the raw profile (snakeviz,
``python -m pstats``). cProfile inflates small Python calls (~0.3-1 µs each): use the ranking
and the call counts, and ``overhead.py`` for the real overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings

import torch

import gradwatch

from ._models import SPECS

GW_DIR = os.path.dirname(os.path.abspath(gradwatch.__file__))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp", choices=[n for n, s in SPECS.items() if not s.lightning])
    ap.add_argument("--level", default="full", choices=["full", "light", "none"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="tottime", choices=["tottime", "cumulative", "ncalls"])
    ap.add_argument("--all", action="store_true", help="also list torch/stdlib frames")
    ap.add_argument("--dump", default=None, help="write the raw pstats file here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = SPECS[args.model]
    if spec.context is not None:  # the loop's process-wide setting (torch.set_default_device)
        outer = spec.context()
        outer.__enter__()
    model, opt, (x, y), step = spec.build(False, torch.device("cpu"))
    for _ in range(3):
        step(model, opt, x, y)
    warnings.simplefilter("ignore")
    if args.level == "none":
        import contextlib

        ctx = contextlib.nullcontext()
    else:
        from gradwatch.session import watch

        watched = (None, None) if spec.anonymous else (model, opt)  # (as overhead.py does)
        ctx = watch(*watched, level=args.level, on_anomaly="log")
    prof = cProfile.Profile()
    with ctx:
        for _ in range(args.warmup):
            step(model, opt, x, y)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, x, y)
        plain = (time.perf_counter() - t0) / args.steps
        prof.enable()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, x, y)
        profiled = (time.perf_counter() - t0) / args.steps
        prof.disable()
    if args.dump:
        prof.dump_stats(args.dump)
    st = pstats.Stats(prof)
    n = args.steps
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        ours = filename.startswith(GW_DIR) or "wrapt" in filename
        if not ours and not args.all:
            continue
        short = os.path.relpath(filename, os.path.dirname(GW_DIR)) if ours else filename
        rows.append((short, line, func, nc, tt, ct))
    key = {"tottime": 4, "cumulative": 5, "ncalls": 3}[args.sort]
    rows.sort(key=lambda r: r[key], reverse=True)
    total_own = sum(r[4] for r in rows if r[0].startswith("gradwatch"))
    print(f"model={args.model} level={args.level} steps={n}: step {1e3 * plain:.2f} ms unprofiled,"
          f" {1e3 * profiled:.2f} ms under cProfile; gradwatch self time "
          f"{1e6 * total_own / n:.0f} µs/step (profiled)")
    print(f"{'calls/step':>10} {'self µs/call':>12} {'self µs/step':>12} {'cum µs/step':>12}  function")
    for short, line, func, nc, tt, ct in rows[: args.top]:
        print(f"{nc / n:10.1f} {1e6 * tt / max(nc, 1):12.2f} {1e6 * tt / n:12.1f} "
              f"{1e6 * ct / n:12.1f}  {short}:{line}({func})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
