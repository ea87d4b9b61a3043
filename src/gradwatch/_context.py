"""What every part of one watch shares: its options, the step, the names, the tracked leaves,
the overhead clock. Plain state, no decisions: anyone may import it."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ._naming import TensorNames
from .config import Config

__all__ = ["Leaves", "RunContext", "process_group"]


class Leaves:
    """The leaves whose ``.grad`` is tracked: each backward pass compares their ``.grad`` before
    and after (no per-leaf hook). Weak: a dead leaf drops out by itself."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        # (pruning replaces the list, never edits it: a backward pass may hold the old one)
        self.refs: list[weakref.ref[torch.Tensor]] = []

    def track(self, p: torch.Tensor) -> None:
        if id(p) in self.ids or not p.requires_grad or not p.is_leaf:
            return
        self.ids.add(id(p))
        self.refs.append(weakref.ref(p, functools.partial(_discard, self.ids, id(p))))

    def prune(self) -> None:
        self.refs = [r for r in self.refs if r() is not None]


def _discard(ids: set[int], key: int, _ref: Any) -> None:
    try:  # (a weakref callback: an error would be printed as "Exception ignored")
        ids.discard(key)
    except Exception:
        pass


class RunContext:
    """The shared state of one watch."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.full = config.level == "full"
        self.raise_now = config.on_anomaly == "raise"
        self.stats_every = config.stats_every
        self.rank, self.world = 0, 1
        self.names = TensorNames()
        self.leaves = Leaves()
        self.steps = 0  # optimizer steps seen
        self.passes = 0  # backward passes seen (a loop without an optimizer counts these)
        #: where the step number comes from instead (Lightning: the trainer's global_step)
        self.step_source: Callable[[], int] | None = None
        self.busy = 0.0  # gradwatch's own time since the last step boundary
        self.thread = threading.get_ident()  # the watched loop's thread
        self.closed = False

    def step(self) -> int:
        """Optimizer steps completed (or the step source's count)."""
        source = self.step_source
        if source is None:
            return self.steps
        try:
            return int(source())
        except Exception:
            return self.steps

    def is_stats_step(self) -> bool:
        return self.step() % self.stats_every == 0

    def is_stats_pass(self) -> bool:
        """Whether an edit now is sampled for change statistics: every ``stats_every``-th
        backward pass (a hand-written update loop advances no optimizer step)."""
        return self.passes % self.stats_every == 0


def process_group() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    env = os.environ
    rank = next((int(env[v]) for v in ("RANK", "LOCAL_RANK") if env.get(v, "").isdigit()), 0)
    world = int(env["WORLD_SIZE"]) if env.get("WORLD_SIZE", "").isdigit() else 1
    return rank, world


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None where torch keeps none (inference tensors, odd subclasses)."""
    try:
        return t._version
    except Exception:
        return None
