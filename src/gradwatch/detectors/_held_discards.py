"""``level="light"``'s discarded windows, held until an optimizer step decides them.

At ``light`` the function mode is off while grad mode is on, so a ``.grad`` read with grad
enabled is not seen, and a window zeroed after such reads looks discarded: PCGrad's per-task
gradients, DP-SGD's per-sample gradients, each read and zeroed before the next pass. What the
next step of an optimizer holding the leaf applies decides it:

* a gradient the user made (``p.grad = merged``, ``p.grad.data = summed``: not what the last
  backward pass, or the zeroing, left) was built from those reads: the discards are dropped;
* what the last backward pass or the zeroing left, or no gradient, confirms them
  (``zero_grad()`` inside an accumulation window, or between ``backward()`` and ``step()``).

Discards no step decides are confirmed when the watch ends. ``full`` sees the reads and
reports at the zeroing line at once (see :mod:`.accumulation`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..records.raw import Raw

__all__ = ["HeldDiscards"]

LIMIT = 1024  # discards held per leaf; the oldest is confirmed beyond it


def _left(g: torch.Tensor | None, any_version: bool = False) -> tuple[int, int, int] | None:
    """What identifies the gradient ``g``: (id, version (-1: any), storage address)."""
    if g is None:
        return None
    try:
        ptr = g.data_ptr()
    except RuntimeError:  # (sparse)
        ptr = 0
    return id(g), -1 if any_version else g._version, ptr


class _Held:
    __slots__ = ("leaf", "left", "raws")

    def __init__(self, leaf: torch.Tensor, left: tuple[int, int, int] | None) -> None:
        self.leaf = weakref.ref(leaf)
        self.left = left  # the gradient the step should find if the user made none
        self.raws: list[Raw] = []


class HeldDiscards:
    """Discard findings per leaf, waiting for a step."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, leaf: torch.Tensor, grad: torch.Tensor, raw: Raw) -> list[Raw]:
        """``raw`` discards ``leaf``'s window (``grad``, about to be zeroed in place or
        dropped); returns what is due now (beyond the bound)."""
        h = self._held.get(id(leaf))
        if h is None or h.leaf() is not leaf:
            h = self._held[id(leaf)] = _Held(leaf, None)
        h.left = _left(grad, any_version=True)  # (zeroed in place, or None: see decide)
        h.raws.append(raw)
        return [h.raws.pop(0)] if len(h.raws) > LIMIT else []

    def passed(self) -> None:
        """A backward pass is over: what it left on each held leaf is what a step should find."""
        for h in self._held.values():
            leaf = h.leaf()
            if leaf is not None:
                h.left = _left(leaf.grad)

    def decide(self, leaves: list[Any]) -> list[Raw]:
        """A step applies these leaves' ``.grad``: the discards it confirms (the user made no
        gradient since); the others of these leaves are dropped. Leaves that are gone confirm
        theirs; other leaves' stay held."""
        due: list[Raw] = []
        held = self._held
        for leaf in leaves:
            h = held.get(id(leaf))
            if h is None or h.leaf() is not leaf:
                continue
            del held[id(leaf)]
            g = leaf.grad
            now = _left(g)
            left = h.left
            if g is None or (left is not None and now is not None and now[0] == left[0]
                             and now[2] == left[2] and left[1] in (-1, now[1])):
                due.extend(h.raws)
        for key, h in list(held.items()):
            if h.leaf() is None:
                del held[key]
                due.extend(h.raws)
        return due

    def confirm_all(self) -> list[Raw]:
        """The watch ends: every discard still held is due."""
        due = [raw for h in self._held.values() for raw in h.raws]
        self._held = {}
        return due
