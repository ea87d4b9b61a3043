"""Discarded windows whose reads gradwatch cannot see, held until an optimizer step decides.

At ``light`` the function mode is off while grad mode is on, so a ``.grad`` read with grad
enabled is not seen, and a window zeroed after such reads looks discarded: PCGrad's per-task
gradients, DP-SGD's per-sample gradients, each read and zeroed before the next pass. What the
next step of an optimizer holding the leaf applies decides it:

* a gradient the user made (``p.grad = merged``, ``p.grad.data = summed``: not the tensor the
  last backward pass, or the zeroing, left; clipping or scaling it in place changes nothing)
  was built from those reads: the discards are dropped;
* what the last backward pass or the zeroing left, or no gradient, confirms them
  (``zero_grad()`` inside an accumulation window, or between ``backward()`` and ``step()``).

A zeroing while user code holds a plain leaf tensor with a gradient (an input's, FGSM; a
representation's, MGDA) is no discard at ``light``: the pass ran for that gradient, what it left
on parameters is a by-product (``full`` sees that gradient read).

At both levels, a window whose norm ``clip_grad_norm_`` returned was read: zeroed, then another
pass, it is dropped (a step skipped on a gradient spike); zeroed, then stepped with no pass in
between, it is confirmed. Discards no step decides are confirmed when the watch ends. Every
other discard at ``full`` is reported at the zeroing at once (see :mod:`.accumulation`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .._location import is_internal, user_frame
from ..records.raw import Raw

__all__ = ["HeldDiscards", "input_gradient_in_scope"]

LIMIT = 1024  # discards held per leaf; the oldest is confirmed beyond it


def input_gradient_in_scope(frames: int = 3) -> bool:
    """Whether the innermost ``frames`` frames of user code hold, in a local variable, a leaf
    tensor that is not a parameter and has a gradient (rare path: a discard about to be held)."""
    frame = user_frame(2)
    while frame is not None and frames > 0:
        if not is_internal(frame.f_code):
            frames -= 1
            for v in list(frame.f_locals.values()):
                if (isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
                        and v.is_leaf and v.requires_grad and v.grad is not None):
                    return True
        frame = frame.f_back
    return False


def _left(g: torch.Tensor | None) -> tuple[int, int] | None:
    """What identifies the gradient ``g`` (not its values): (id, storage address)."""
    if g is None:
        return None
    try:
        ptr = g.data_ptr()
    except RuntimeError:  # (sparse)
        ptr = 0
    return id(g), ptr


class _Held:
    __slots__ = ("leaf", "left", "raws")

    def __init__(self, leaf: torch.Tensor) -> None:
        self.leaf = weakref.ref(leaf)
        self.left: tuple[int, int] | None = None  # the gradient a step finds if the user made none
        self.raws: list[tuple[Raw, int]] = []  # (discard, pass number if clipping read it, else 0)


class HeldDiscards:
    """Discard findings per leaf, waiting for a step."""

    __slots__ = ("_held", "_scan")

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._scan: tuple[Any, bool] = (None, False)  # (key, answer) of the last for_input

    def __bool__(self) -> bool:
        return bool(self._held)

    def for_input(self, key: Any) -> bool:
        """Whether the pass being zeroed ran for an input's gradient (looked up once per
        ``key``: the pass and the zeroing line; see :func:`input_gradient_in_scope`)."""
        if self._scan[0] != key:
            self._scan = (key, input_gradient_in_scope(4))
        return self._scan[1]

    def hold(self, leaf: torch.Tensor, grad: torch.Tensor, raw: Raw, clipped: int = 0
             ) -> list[Raw]:
        """``raw`` discards ``leaf``'s window (``grad``, about to be zeroed in place or dropped).
        ``clipped``: the pass number, if a clipping function read the window (its norm told the
        user something: a step skipped on a spike drops it once another pass comes). Returns
        what is due now (beyond the bound)."""
        h = self._held.get(id(leaf))
        if h is None or h.leaf() is not leaf:
            h = self._held[id(leaf)] = _Held(leaf)
        h.left = _left(grad)  # (zeroed in place; dropped: None, see decide)
        h.raws.append((raw, clipped))
        return [h.raws.pop(0)[0]] if len(h.raws) > LIMIT else []

    def passed(self) -> None:
        """A backward pass is over: what it left on each held leaf is what a step should find."""
        for h in self._held.values():
            leaf = h.leaf()
            if leaf is not None:
                h.left = _left(leaf.grad)

    def decide(self, leaves: list[Any], pass_of: Any) -> list[Raw]:
        """A step applies these leaves' ``.grad``: the discards it confirms; the others of
        these leaves are dropped (a gradient the user made since; a clipped window followed by
        another pass: ``pass_of(leaf)``, the last pass that summed into it). Leaves that are
        gone confirm theirs; other leaves' stay held."""
        due: list[Raw] = []
        held = self._held
        for leaf in leaves:
            h = held.get(id(leaf))
            if h is None or h.leaf() is not leaf:
                continue
            del held[id(leaf)]
            g = leaf.grad
            if g is not None and (h.left is None or _left(g) != h.left):
                continue  # the user set a gradient built from what was read
            last = pass_of(leaf)
            due.extend(raw for raw, clipped in h.raws if not clipped or last <= clipped)
        for key, h in list(held.items()):
            if h.leaf() is None:
                del held[key]
                due.extend(raw for raw, _ in h.raws)
        return due

    def confirm_all(self) -> list[Raw]:
        """The watch ends: every discard still held is due."""
        due = [raw for h in self._held.values() for raw, _ in h.raws]
        self._held = {}
        return due
