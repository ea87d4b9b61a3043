"""What any design like gradwatch's pays before doing any work: the floors under the MLP numbers.

    python -m benchmarks.floor             # MLP step, 1 thread, 25 interleaved repetitions
    python -m benchmarks.floor --reps 41

Side by side in one process, interleaved, median per repetition, paired differences in µs:

- ``hooks_only``: the global optimizer step pre/post hooks, pass-through wrapt wrappers around
  ``torch.autograd.backward``, ``Optimizer.zero_grad`` and ``clip_grad_norm_``, and a pass-through
  Python ``torch._C._set_grad_enabled`` -- gradwatch's light-level plumbing with no work in it;
- ``identity_saved_hooks``: a ``saved_tensors_hooks`` pair that returns its argument (what torch
  itself costs for every saved tensor once any pair is registered, as ``full`` does);
- ``light`` / ``full``: gradwatch itself (statistics steps excluded: ``stats_every`` huge).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator

import torch
import wrapt

import gradwatch

from ._models import SPECS


def _passthrough(wrapped, instance, args, kwargs):  # type: ignore[no-untyped-def]
    return wrapped(*args, **kwargs)


@contextlib.contextmanager
def hooks_only() -> Iterator[None]:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    undo = [register_optimizer_step_pre_hook(lambda o, a, k: None).remove,
            register_optimizer_step_post_hook(lambda o, a, k: None).remove]
    for owner, name in [(torch.autograd, "backward"), (torch.optim.Optimizer, "zero_grad"),
                        (torch.nn.utils, "clip_grad_norm_")]:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, wrapt.FunctionWrapper(original, _passthrough))
        undo.append(lambda owner=owner, name=name, original=original: setattr(owner, name, original))
    original_switch = torch._C._set_grad_enabled

    def switch(mode: bool) -> None:
        original_switch(mode)

    torch._C._set_grad_enabled = switch
    undo.append(lambda: setattr(torch._C, "_set_grad_enabled", original_switch))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, opt, (x, y), step = SPECS["mlp"].build(False, torch.device("cpu"))
    variants = {
        "unwatched": contextlib.nullcontext,
        "hooks_only": hooks_only,
        "identity_saved_hooks": lambda: torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t),
        "light": lambda: gradwatch.watch(model, opt, level="light", on_anomaly="log",
                                         stats_every=10**9),
        "full": lambda: gradwatch.watch(model, opt, level="full", on_anomaly="log",
                                        stats_every=10**9),
    }
    names = list(variants)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with variants[name]():
                for _ in range(5):
                    step(model, opt, x, y)
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step(model, opt, x, y)
                    times.append(time.perf_counter() - t0)
            medians[name].append(statistics.median(times))
    base = medians["unwatched"]
    print(f"MLP step (forward, backward, clip_grad_norm_, step, zero_grad), {args.threads} thread(s), "
          f"{args.reps} reps x {args.steps} steps")
    print(f"{'variant':22s} {'step ms':>8s} {'Δ µs (paired median)':>22s}")
    for name in names:
        delta = statistics.median(v - b for v, b in zip(medians[name], base))
        print(f"{name:22s} {1e3 * statistics.median(medians[name]):8.3f} {1e6 * delta:+22.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
