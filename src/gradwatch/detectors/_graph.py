"""Walks of autograd graphs (rare paths of :mod:`.grad_flow`)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ZERO_NODES", "behind_zero_nodes"]

# autograd nodes whose gradient is zero everywhere (for real inputs): node -> op
ZERO_NODES = {"RoundBackward0": "round", "RoundBackward1": "round", "SignBackward0": "sign",
              "FloorBackward0": "floor", "CeilBackward0": "ceil", "TruncBackward0": "trunc"}


def behind_zero_nodes(roots: tuple, limit: int = 50000
                      ) -> tuple[set[int], dict[int, tuple[torch.Tensor, tuple]]] | None:
    """The leaves ``roots``' graph reaches without crossing a zero-gradient node (their ids),
    and those it reaches behind one (id -> (leaf, (id, sequence number) of the first such node
    on the way)); None past ``limit`` nodes."""
    reach: set[int] = set()
    behind: dict[int, tuple[torch.Tensor, tuple]] = {}
    seen: set[tuple[int, bool]] = set()
    stack: list[tuple[Any, tuple | None]] = [(r.grad_fn, None) for r in roots
                                             if r.grad_fn is not None]
    while stack and len(seen) < limit:
        fn, zero = stack.pop()
        key = (id(fn), zero is None)
        if key in seen:
            continue
        seen.add(key)
        if zero is None and type(fn).__name__ in ZERO_NODES:
            zero = (id(fn), fn._sequence_nr())
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            if zero is None:
                reach.add(id(var))
            else:
                behind.setdefault(id(var), (var, zero))
            continue
        stack.extend((nf, zero) for nf, _ in fn.next_functions if nf is not None)
    if len(seen) >= limit:
        return None
    return reach, behind
