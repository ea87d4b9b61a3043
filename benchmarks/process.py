"""Whole-process cost of ``gradwatch run`` on a script: interpreter start, ``import torch`` and
everything the script does, as a user sees it.

    python -m benchmarks.process                                   # the polynomial tutorial
    python -m benchmarks.process --script train.py --runs 7 -- --epochs 1

Runs ``python SCRIPT``, ``python -m gradwatch run SCRIPT`` and ``... --level light``, interleaved
(rotated per round), one torch thread each, and reports the median CPU time (user + system) of
the child processes and the paired median of the ratios. CPU time, not wall time: on a shared
machine waiting for a core does not count.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SCRIPT = HERE / "scripts" / "polynomial_autograd.py"


def _cpu_seconds(cmd: list[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", type=Path, default=DEFAULT_SCRIPT)
    ap.add_argument("--runs", type=int, default=5, help="rounds (each runs every variant once)")
    ap.add_argument("args", nargs="*", help="the script's own arguments (after --)")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "plain": [sys.executable, str(args.script), *args.args],
            "full": [sys.executable, "-m", "gradwatch", "run", "--log-dir", f"{tmp}/full",
                     str(args.script), *args.args],
            "light": [sys.executable, "-m", "gradwatch", "run", "--level", "light",
                      "--log-dir", f"{tmp}/light", str(args.script), *args.args],
        }
        names = list(variants)
        times: dict[str, list[float]] = {v: [] for v in names}
        for r in range(args.runs):
            for v in names[r % len(names):] + names[:r % len(names)]:
                times[v].append(_cpu_seconds(variants[v], env))
    print(f"script: {args.script} ({args.runs} rounds, CPU seconds of each process)")
    print("| variant | CPU s (median) | overhead vs plain (paired median) |")
    print("|---|---:|---:|")
    for v in names:
        ratio = statistics.median(t / p for t, p in zip(times[v], times["plain"]))
        print(f"| {v} | {statistics.median(times[v]):.2f} | "
              f"{'—' if v == 'plain' else f'{(ratio - 1) * 100:+.0f}%'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
