"""gradwatch overhead benchmark: one process, interleaved variants, paired ratios.

    python -m benchmarks.overhead                      # full suite (~6-9 min on 2 CPU cores)
    python -m benchmarks.overhead --quick              # smoke run (tiny sizes, a few steps)
    python -m benchmarks.overhead --device cuda --json runs/bench_cuda.json
    python -m benchmarks.overhead --models mlp,gpt --reps 9 --update-readme

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

The models are in ``_models.py``, the variants, runners, probes and statistics in
``_harness.py``; this module is the command line, the rendering and the README update.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

import gradwatch

from ._harness import CLOCK, VARIANTS, lightning_callback, run_model
from ._models import SHAPES, SPECS

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

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
        "lightning_callback": lightning_callback() is not None,
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
        # the measured code: HEAD, and whether src/ differs from it (others may be editing it)
        info["git_head"] = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"], capture_output=True,
            text=True, timeout=10).stdout.splitlines()
        info["src_changed"] = [line[3:] for line in changed]
        if changed:
            import hashlib

            diff = subprocess.run(["git", "-C", root, "diff", "HEAD", "--", "src"],
                                  capture_output=True, timeout=10).stdout
            info["src_diff_sha1"] = hashlib.sha1(diff).hexdigest()[:10]
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


def _pct_cell(row: dict[str, Any] | None) -> str:
    return "–" if row is None else _fmt_pct(row["overhead_pct"], row["spread_pct"])


def _us_cell(row: dict[str, Any] | None) -> str:
    if row is None or math.isnan(row.get("delta_us_median", math.nan)):
        return "–"
    half = (row["delta_us_q75"] - row["delta_us_q25"]) / 2
    return f"{row['delta_us_median']:+.0f} ±{half:.0f}"


def paired_table(results: dict[str, Any]) -> str:
    """Per model: the unwatched step, each variant's paired overhead, and what gradwatch and the
    empty mode add in µs per step (median of the per-repetition differences)."""
    lines = ["| model | unwatched ms/step | full | light | empty mode | anomaly (check_nan=False) "
             "| Δ µs/step: full | light | empty mode (floor) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        if res.get("error"):
            continue
        v = res["variants"]
        base = v.get("unwatched")
        if base is None:
            continue
        lines.append(f"| {name} | {base['step_ms']:.2f} | {_pct_cell(v.get('full'))} | "
                     f"{_pct_cell(v.get('light'))} | {_pct_cell(v.get('empty_mode'))} | "
                     f"{_pct_cell(v.get('anomaly'))} | {_us_cell(v.get('full'))} | "
                     f"{_us_cell(v.get('light'))} | {_us_cell(v.get('empty_mode'))} |")
    return "\n".join(lines)


def mode_count_lines(results: dict[str, Any]) -> list[str]:
    """For a model run under a mode of the user's (``count_mode``): its calls per step under each
    variant, and the torch functions gradwatch adds to it."""
    out = []
    for name, res in results.items():
        if res.get("error"):
            continue
        v = res["variants"]
        base = v.get("unwatched", {})
        if "count_mode_calls_per_step" not in base:
            continue
        b = base["count_mode_calls_per_step"]
        cells = [f"unwatched {b:g}"]
        for variant, row in v.items():
            if variant == "unwatched" or "count_mode_calls_per_step" not in row:
                continue
            n = row["count_mode_calls_per_step"]
            cells.append(f"{VARIANT_TITLES.get(variant, variant)} {n:g} ({n - b:+g})")
        out.append(f"- `{name}`: `{base['count_mode']}.__torch_function__` calls per step (mean "
                   "of 10 steps): " + "; ".join(cells))
        for variant in ("full", "light"):
            row = v.get(variant)
            if not row or "count_mode_by_func" not in row:
                continue
            extra = {k: n - base["count_mode_by_func"].get(k, 0.0)
                     for k, n in row["count_mode_by_func"].items()}
            extra.update({k: -n for k, n in base["count_mode_by_func"].items()
                          if k not in row["count_mode_by_func"]})
            extra = {k: d for k, d in sorted(extra.items(), key=lambda kv: -kv[1])
                     if abs(d) > 1e-9}
            if extra:
                out.append(f"  - difference by torch function under `{variant}`: " + ", ".join(
                    f"{k} {d:+g}" for k, d in list(extra.items())[:12]))
    return out


def machine_line(info: dict[str, Any]) -> str:
    dev = info.get("gpu") or "CPU"
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads; load avg {info['load_avg_1m_at_start']} at start), "
            f"Python {info['python']}, "
            f"pytorch_lightning {info.get('pytorch_lightning', '–')}, device: {dev}, "
            f"gradwatch {info['gradwatch']} @ {info.get('git', '?')}" + _src_state(info))


def _src_state(info: dict[str, Any]) -> str:
    if "src_changed" not in info:
        return ""
    if not info["src_changed"]:
        return " (src/ as committed)"
    return (f" (src/ differs from {info.get('git_head', 'HEAD')} in "
            f"{len(info['src_changed'])} files, diff sha1 {info.get('src_diff_sha1', '?')})")


def render(results: dict[str, Any], info: dict[str, Any], cfg: dict[str, Any]) -> str:
    parts = [f"Machine: {machine_line(info)}",
             f"Run: `{cfg['command']}` ({cfg['reps']} reps; per model: "
             + ", ".join(f"{m} {r['steps']}+{r['warmup']} warmup steps"
                         for m, r in results.items() if not r.get("error")) + ")",
             "",
             markdown_tables(results, info),
             "",
             "Paired per model (overhead in % ± IQR/2; Δ µs/step: median of the per-repetition "
             "differences to unwatched ± IQR/2):",
             "",
             paired_table(results)]
    if any(name in ("mlp", "cnn", "gpt") for name in results):
        parts += ["", "Targets (issue 6):", "", target_table(results)]
    parts.append("")
    for name, res in results.items():
        if not res.get("error"):
            share = 100 * res.get("stats_sample_bytes", 0) / max(res["param_bytes"], 1)
            parts.append(f"- `{name}`: {res['title']}; {res['param_bytes'] / 2**20:.1f} MB "
                         f"of parameters; {res.get('torch_calls_per_step')} torch calls/step; "
                         f"a statistics step holds {res.get('stats_sample_bytes', 0) / 2**10:.0f} KB "
                         f"of samples ({share:.1f}% of the parameter bytes)")
    counts = mode_count_lines(results)
    if counts:
        parts.append("")
        parts.extend(counts)
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
                    help=f"comma list of {', '.join(SPECS)}, or 'shapes' for the loop shapes of "
                    f"issue 18 ({','.join(SHAPES)}) (default: mlp,cnn,gpt,resnet18,lightning)")
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
    models = []
    for m in (m.strip() for m in args.models.split(",")):
        for name in (SHAPES if m == "shapes" else (m,) if m else ()):
            if name not in models:
                models.append(name)
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
    cfg = {"command": "python -m benchmarks.overhead " + " ".join(sys.argv[1:] if argv is None
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
