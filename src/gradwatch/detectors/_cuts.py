"""The weak, bounded record of cuts (:mod:`.grad_flow`): which op made a tensor without grad
from one that required grad, where, and whether its source was a trained leaf that has died
since (replaced by the cut's result)."""

from __future__ import annotations

import weakref
from collections import deque
from types import CodeType

import torch

from .._location import location_of

__all__ = ["Cut", "CutTracker"]


class Cut:
    __slots__ = ("__weakref__", "op", "result", "shape", "source_name", "step", "trained", "var",
                 "where")

    def __init__(self, op: str, result: torch.Tensor, source_name: str,
                 where: tuple[CodeType, int] | None, step: int, var: str | None = None) -> None:
        self.op = op
        self.var = var
        self.result = weakref.ref(result)
        self.source_name = source_name
        self.shape = tuple(result.shape)
        self.where = where
        self.step = step
        self.trained = False

    def describe(self) -> str:
        loc = location_of(self.where)
        place = f"{loc} (`{loc.code}`)" if loc else "an unknown line"
        source = f"`{self.var}` ({self.source_name})" if self.var else f"`{self.source_name}`"
        return f"{self.op} at {place} made a tensor without grad from {source}"


class CutTracker:
    def __init__(self, size: int = 64) -> None:
        self.ring: deque[Cut] = deque(maxlen=size)
        self.replaced: list[Cut] = []  # trained leaves that died, replaced by a cut result
        self._watching: dict[int, tuple[weakref.ref, Cut]] = {}

    def add(self, cut: Cut, source: torch.Tensor, watch_source: bool) -> None:
        self.ring.append(cut)
        if watch_source and id(source) not in self._watching:
            sid = id(source)

            def _died(_ref: weakref.ref, sid: int = sid) -> None:
                entry = self._watching.pop(sid, None)
                if entry is None:
                    return
                c = entry[1]
                if c.trained and c.result() is not None:
                    self.replaced.append(c)

            self._watching[sid] = (weakref.ref(source, _died), cut)

    def source_trained(self, leaf: torch.Tensor) -> None:
        """The leaf received a gradient (or belongs to an optimizer): its replacement matters."""
        entry = self._watching.get(id(leaf))
        if entry is not None and entry[0]() is leaf:
            entry[1].trained = True

    def take_replaced(self) -> list[Cut]:
        out, self.replaced = self.replaced, []
        return out

    def explain(self, roots: tuple[torch.Tensor, ...], exact_only: bool = False) -> Cut | None:
        """The cut most likely behind "element 0 of tensors does not require grad": the one that
        made the root, else (unless ``exact_only``) a trained leaf's, else the latest."""
        live = [c for c in self.ring if c.result() is not None]
        for c in reversed(live):
            r = c.result()
            if any(r is root for root in roots):
                return c
        for c in reversed(live):
            if c.trained:
                return c
        if exact_only:
            return None
        for c in reversed(live):
            if c.trained:
                return c
        return live[-1] if live else None

    @property
    def watching(self) -> bool:
        """Whether some cut's source is watched (its death would be a replacement)."""
        return bool(self._watching)

    def mark_trained(self, leaf: torch.Tensor) -> None:
        """:meth:`source_trained` for a leaf an optimizer holds."""
        entry = self._watching.get(id(leaf))
        if entry is not None:
            entry[1].trained = True
