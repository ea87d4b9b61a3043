"""The gradient windows behind ``stale_grad_accumulation`` and ``accumulated_grad_discarded``
(see :mod:`.accumulation`): the life of a leaf's ``.grad``.

Per leaf, a *window* runs from one reset of ``.grad`` (zeroed or set to None) to the next. Each
backward pass that accumulates into the leaf is stamped with the leaf's *token*: its version
counter plus the number of optimizer steps that updated it (fused optimizers bump no version).

* stale: an accumulation lands on a sum whose earlier part was taken at another token. If no
  optimizer step consumed the earlier part, it is reported at once (an in-place edit between two
  backward passes); otherwise it is reported only when a step then uses the mixed sum (a GAN's
  discriminator picking up the generator's gradient, zeroed before its own step, is correct).
* discarded: the window is reset after accumulating, no step consumed it, the user never read
  it, and it is finite and non-zero (checked only then: one sync on a rare path).

The usual loop (zero_grad with set_to_none, backward, step) needs no per-leaf bookkeeping: a
backward pass that finds no ``.grad`` on any tracked leaf is kept as one :class:`_Pass` (lists
of ints and weak references), a step that uses exactly its leaves only counts itself on it, and
the next such pass replaces it. Per-leaf states are brought up to date from the pending pass
(:meth:`AccumulationTracker.sync`) only when something else asks about a leaf.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from types import CodeType
from typing import Any

import torch

from .._context import version

__all__ = ["AccumulationTracker", "LeafState", "PassEntry", "changed_grads", "finite_nonzero"]

# One leaf reached by a pass: (weak reference, id(leaf), id(grad), grad version, leaf version).
PassEntry = tuple[weakref.ref, int, int, int, int]

class LeafState:
    __slots__ = ("accum", "consumed", "consumed_by", "grad_id", "grad_version", "holder",
                 "last_edit", "leaf", "mid", "mid_where", "never_applied", "optimized", "pass_no", "read",
                 "read_where", "reset", "stale_where", "steps", "token", "where", "window_steps")

    def __init__(self, leaf: torch.Tensor) -> None:
        self.leaf = weakref.ref(leaf)
        self.accum = 0
        self.consumed = False
        self.read = False
        self.read_where: tuple[CodeType, int] | None = None
        self.reset = False
        self.grad_id = 0
        self.grad_version = -1
        self.steps = 0
        self.token: tuple[int, int] | None = None
        self.stale_where: tuple[CodeType, int] | None = None
        self.optimized = False
        self.last_edit: tuple[CodeType, int] | None = None  # last in-place edit under no_grad
        self.pass_no = 0  # the last backward pass that accumulated into the window
        self.consumed_by: int | None = None  # id of the optimizer whose step used the window
        self.window_steps = 0  # optimizer steps (any optimizer) when the window opened
        self.never_applied = False  # reported as never applied (once per leaf)
        # reads mid-window: 0 none; 1 read by user code, then another pass added to the window;
        # 2 read again after that (at ``mid_where``): the second read sees both passes' sum
        self.mid = 0
        self.mid_where: tuple[CodeType, int] | None = None
        self.where: tuple[CodeType, int] | None = None  # the last pass that summed into it
        # while no optimizer has stepped: (optimizer class, name, shape, dtype, device) of the
        # optimizer holding the leaf, once its window summed three passes (see `unstepped`)
        self.holder: tuple | None = None


def changed_grads(refs: list[Any], before: list[Any]) -> Iterator[tuple]:
    """(ref, leaf, grad, before) for each tracked leaf whose ``.grad`` a backward pass created
    or summed into; ``before``: its (id, version) in the snapshot taken before the pass, None
    where the leaf had no ``.grad`` then."""
    n = len(before)
    for i, ref in enumerate(refs):
        leaf = ref()
        if leaf is None:
            continue
        g = leaf.grad
        if g is None:
            continue
        prev = before[i] if i < n else None
        if prev is not None and prev[0] == id(g) and prev[1] == g._version:
            continue  # not reached by this pass
        yield ref, leaf, g, prev


class _Pass:  # hot: the usual loop, one record per backward pass
    """A backward pass that found no ``.grad`` on any tracked leaf: a fresh window on each leaf
    it reached, not yet applied per leaf; ``steps``: optimizer steps that used exactly these."""

    __slots__ = ("_grad_ids", "_index", "accum", "all_steps", "entries", "ids", "number",
                 "owner", "steps", "where")

    def __init__(self, entries: list[PassEntry], where: tuple[CodeType, int] | None,
                 number: int, all_steps: int) -> None:
        self.number = number  # the last pass summed in (see accum)
        self.owner: int | None = None  # the optimizer whose steps used exactly these leaves
        self.entries = entries
        self.ids = {e[1] for e in entries}
        self.where = where  # the last pass's line
        self.steps = 0
        self.accum = 1  # passes summed into these windows (micro-batches: see absorb)
        self.all_steps = all_steps  # optimizer steps (any optimizer) when the windows opened
        self._grad_ids: set[int] | None = None
        self._index: dict[int, int] | None = None

    def index(self) -> dict[int, int]:
        """id(leaf) -> its place in ``entries`` (built on first use)."""
        if self._index is None:
            self._index = {e[1]: j for j, e in enumerate(self.entries)}
        return self._index

    def grad_ids(self) -> set[int]:
        """ids of the gradients this pass created (built on first use: rare paths only)."""
        if self._grad_ids is None:
            self._grad_ids = {e[2] for e in self.entries}
        return self._grad_ids


class AccumulationTracker:
    """State machine per leaf; the session feeds it hooks and zeroing ops and emits its findings.
    Read ``leaves``, ``grad_owner`` and ``unconsumed`` only after :meth:`sync`."""

    def __init__(self) -> None:
        self.leaves: dict[int, LeafState] = {}
        self.grad_owner: dict[int, LeafState] = {}  # id(p.grad) -> state of p
        # leaves whose window holds gradients no step has used yet (zero_grad checks only these)
        self.unconsumed: set[int] = set()
        self.pending: _Pass | None = None
        self.reached: set[int] = set()  # ids of leaves some backward pass reached
        self.pass_no = 0  # backward passes so far (see begin_pass)
        self.all_steps = 0  # optimizer steps so far, of any optimizer
        # passes whose gradients some optimizer step used (on any leaf): what such a pass left
        # on leaves no step holds is a by-product (SAC's policy loss reaching the critic),
        # dropping it is no discarded window (recent passes only)
        self.used: set[int] = set()
        self.twice: list[LeafState] = []  # windows a second optimizer's step just used
        # leaves whose window mixes versions, waiting for a step to use it (or a reset)
        self.mixed: set[int] = set()
        self.never: list[LeafState] = []  # parameters whose gradients no step ever uses
        # windows that summed three passes before any optimizer step (an optimizer that never
        # steps?): their holders are looked up once the pass is over
        self.unstepped: list[LeafState] = []

    def state(self, leaf: torch.Tensor) -> LeafState:
        if self.pending is not None:
            self.sync()
        return self._state(leaf)

    def _state(self, leaf: torch.Tensor) -> LeafState:
        st = self.leaves.get(id(leaf))
        if st is None or st.leaf() is not leaf:
            st = LeafState(leaf)
            self.leaves[id(leaf)] = st
        return st

    def get(self, leaf: torch.Tensor) -> LeafState | None:
        if self.pending is not None and id(leaf) in self.pending.ids:
            self.sync()  # (the pending pass changes only the states of the leaves it reached)
        st = self.leaves.get(id(leaf))
        if st is not None and st.leaf() is leaf:
            return st
        return None

    def owner_of_grad(self, grad: torch.Tensor) -> LeafState | None:
        """The state of the leaf whose ``.grad`` is ``grad`` now, if tracked."""
        if self.pending is not None and id(grad) in self.pending.grad_ids():
            self.sync()
        st = self.grad_owner.get(id(grad))
        if st is not None:
            leaf = st.leaf()
            if leaf is None or leaf.grad is not grad:
                return None
        return st

    def has_unconsumed(self) -> bool:
        """Whether some window holds gradients that no optimizer step has used yet."""
        return (bool(self.unconsumed) or bool(self.mixed)
                or (self.pending is not None and self.pending.steps == 0))

    def begin_pass(self) -> None:
        """A backward pass starts: what it accumulates is stamped with its number."""
        self.pass_no += 1

    def mark_used(self, number: int) -> None:
        """Pass ``number``'s gradients were used by some step (or need no step)."""
        used = self.used
        used.add(number)
        if len(used) > 256:
            oldest = self.pass_no - 128
            self.used = {n for n in used if n > oldest}

    # -- the usual loop, without per-leaf work ------------------------------------------------
    def fresh_pass(self, entries: list[PassEntry], where: tuple[CodeType, int] | None) -> None:
        """A backward pass found no ``.grad`` on any tracked leaf and reached ``entries``."""
        last = self.pending
        if last is not None:
            if last.steps == 0:
                self.sync()  # its gradients were dropped unused: keep what the leaves say
            else:  # used by a step, then reset: nothing about it can matter any more
                self.pending = None
                if self.unconsumed:
                    self.unconsumed.difference_update(last.ids)
        p = _Pass(entries, where, self.pass_no, self.all_steps)
        self.reached |= p.ids
        self.pending = p

    def absorb(self, refs: list[Any], before: list[Any],
               where: tuple[CodeType, int] | None) -> list[Any] | None:
        """A backward pass summed into the gradients of exactly the pending pass's leaves,
        each the same ``.grad`` tensor, no leaf changed since (a micro-batch of an
        accumulation window: nanoGPT's loop): the pending pass takes it in, one more sum and
        no per-leaf work (:meth:`sync` applies it as :meth:`accumulated` would have). Returns
        the weak references reached, or None: then leaf by leaf. Not before any optimizer
        step, nor once a step used the pass (those windows' bookkeeping is per leaf)."""
        p = self.pending
        if p is None or p.steps or not self.all_steps or self.all_steps != p.all_steps:
            return None
        try:
            return self._absorb(p, refs, before, where)
        except RuntimeError:  # a tensor without a version counter: leaf by leaf
            return None

    def _absorb(self, p: _Pass, refs: list[Any], before: list[Any],
                where: tuple[CodeType, int] | None) -> list[Any] | None:
        index = p.index()
        entries = p.entries
        updated = list(entries)
        reached = []
        for ref, leaf, g, prev in changed_grads(refs, before):
            j = index.get(id(leaf))
            if j is None or prev is None:
                return None  # a leaf outside the windows, or one whose .grad is new
            e = entries[j]
            if e[2] != id(g) or g._version <= e[3] or leaf._version != e[4]:
                return None  # another .grad, or the leaf changed: a stale sum? per leaf
            updated[j] = (e[0], e[1], e[2], g._version, e[4])
            reached.append(ref)
        if len(reached) != len(entries):
            return None
        p.entries = updated
        p.accum += 1
        p.where = where
        p.number = self.pass_no
        return reached

    def sync(self) -> None:
        """Apply the pending pass to the per-leaf states (what :meth:`fresh` and
        :meth:`stepped` would have done at the time)."""
        p, self.pending = self.pending, None
        if p is not None:
            self._open_windows(((leaf, key, gid, grad_version, leaf_version)
                                for ref, key, gid, grad_version, leaf_version in p.entries
                                if (leaf := ref()) is not None), p.where, p.steps, p.number,
                                p.owner, p.accum)

    def _open_windows(self, passed: Any, where: tuple[CodeType, int] | None, steps: int,
                      number: int, stepped_by: int | None = None, accum: int = 1) -> None:
        """Each (leaf, id(leaf), id(grad), grad version, leaf version) had no ``.grad`` before a
        pass that reached it: a new window, summed into by ``accum`` passes (the last one
        ``number``, at ``where``); ``steps`` optimizer steps have used it since."""
        leaves = self.leaves
        owner = self.grad_owner
        unconsumed = self.unconsumed
        reached = self.reached
        for leaf, key, gid, grad_version, leaf_version in passed:
            st = leaves.get(key)
            if st is None or st.leaf() is not leaf:
                st = self._state(leaf)
            reached.add(key)
            st.token = (leaf_version, st.steps)
            st.last_edit = st.stale_where = None
            st.read = st.reset = False
            st.mid = 0
            st.accum = accum
            st.pass_no = number
            st.where = where
            st.consumed_by = stepped_by if steps else None
            st.window_steps = self.all_steps - steps
            old = st.grad_id
            if gid != old:
                if owner.get(old) is st:  # ids are reused: drop only our own entry
                    del owner[old]
                st.grad_id = gid
                owner[gid] = st
            st.grad_version = grad_version
            if steps:
                st.optimized = True
                st.steps += steps
                st.consumed = True
                unconsumed.discard(key)
            else:
                st.consumed = False
                unconsumed.add(key)

    def accumulated(self, leaf: torch.Tensor, grad: torch.Tensor, fresh: bool,
                    where: tuple[CodeType, int] | None) -> LeafState | None:
        """A backward pass accumulated into ``leaf.grad`` (``grad``); ``fresh``: the leaf had no
        ``.grad`` before that pass. Returns the state when a stale sum is to be reported now."""
        st = self.state(leaf)
        self.reached.add(id(leaf))
        token = (version(leaf), st.steps)
        gid = id(grad)
        # A fresh .grad (after set_to_none) is a new tensor; ids alone are reused.
        same_sum = (not fresh and st.accum > 0 and not st.reset and gid == st.grad_id
                    and grad._version > st.grad_version)
        finding = None
        if same_sum and st.token != token:
            if st.consumed:
                if st.stale_where is None:
                    st.stale_where = where
                    self.mixed.add(id(leaf))
            else:
                finding = st
        if not same_sum:
            st.last_edit = None
            st.accum = 0
            st.consumed = False
            st.read = False
            st.mid = 0
        elif st.read and st.mid == 0 and not st.consumed and where != st.where:
            st.mid = 1  # read, then summed into by another loss: the next read sees both
            st.stale_where = None
            st.window_steps = self.all_steps
        elif (not st.optimized and not st.consumed and not st.never_applied
              and self.all_steps - st.window_steps >= 2 and type(leaf) is torch.nn.Parameter):
            # optimizers stepped twice while this parameter's gradients kept summing, unused
            st.never_applied = True
            self.never.append(st)
        st.consumed_by = None  # new gradient in the window
        st.reset = False
        st.accum += 1
        if st.accum == 3 and not self.all_steps and st.holder is None:
            self.unstepped.append(st)
        st.pass_no = self.pass_no
        st.where = where
        if not st.consumed:
            self.unconsumed.add(id(leaf))
        st.token = token
        if gid != st.grad_id:
            if self.grad_owner.get(st.grad_id) is st:  # ids are reused: drop only our own entry
                del self.grad_owner[st.grad_id]
            st.grad_id = gid
            self.grad_owner[gid] = st
        st.grad_version = grad._version
        return finding

    def fresh(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
              where: tuple[CodeType, int] | None) -> None:
        """:meth:`accumulated` for leaves that had no ``.grad`` before the pass (``pairs`` of
        leaf and new grad): each opens a window; nothing can be stale."""
        if self.pending is not None:
            self.sync()
        self._open_windows(((leaf, id(leaf), id(grad), grad._version, version(leaf))
                            for leaf, grad in pairs), where, 0, self.pass_no)

    def stepped(self, leaves: list[torch.Tensor], owner: int | None = None) -> list[LeafState]:
        """An optimizer step (of optimizer ``id`` ``owner``) is about to use these leaves'
        ``.grad``; returns the states whose stale sum is now due (consumed by this step), and
        collects in :attr:`twice` those whose window another optimizer's step used already."""
        p = self.pending
        if p is not None:
            if p.ids == set(map(id, leaves)) and p.owner in (None, owner):
                p.steps += 1  # the usual loop: it uses what the pass left
                p.owner = owner
                self.all_steps += 1
                return []
            self.sync()
        self.all_steps += 1
        due = []
        twice = self.twice
        used = self.mark_used
        get = self.leaves.get
        for leaf in leaves:
            st = get(id(leaf))
            if st is None or st.leaf() is not leaf:
                st = self._state(leaf)
            st.optimized = True
            st.steps += 1
            if st.accum > 0:
                if st.stale_where is not None and not st.reset:
                    due.append(st)
                    self.mixed.discard(id(leaf))
                if (st.consumed and not st.reset and owner is not None
                        and st.consumed_by not in (None, owner)):
                    twice.append(st)
                st.consumed = True
                st.consumed_by = owner
                st.mid = 0
                used(st.pass_no)
        if self.unconsumed:
            self.unconsumed.difference_update(map(id, leaves))
        return due

    def used_by_step(self, leaves: list[torch.Tensor]) -> list[LeafState]:
        """An optimizer step read these leaves' ``.grad`` without being a new step (what a
        closure computed, for LBFGS and other closure optimizers that call it several times
        per step): their windows are used. Returns the states whose sum mixes the weights of
        two closure calls (a closure that does not zero the gradients): the step reads it."""
        self.sync()
        get = self.leaves.get
        due = []
        for leaf in leaves:
            st = get(id(leaf))
            if st is not None and st.leaf() is leaf and st.accum > 0:
                st.mid = 0
                if st.stale_where is not None and not st.reset:
                    due.append(st)
                    self.mixed.discard(id(leaf))
                st.consumed = True
                self.mark_used(st.pass_no)
        if self.unconsumed:
            self.unconsumed.difference_update(map(id, leaves))
        return due

    def grad_read(self, leaf: torch.Tensor, where: tuple[CodeType, int] | None,
                  st: LeafState | None = None) -> None:
        """User code read ``leaf.grad`` at ``where`` (``st``: its state, if looked up already)."""
        if st is None:
            st = self.get(leaf)  # (syncs)
        if st is not None and st.accum > 0:
            if st.mid:  # (a read in the same line again: a loop over micro-batches)
                if st.mid == 1:
                    st.mid = 2 if where != st.read_where else 0
                st.mid_where = where  # the last read
                return
            st.read = True
            st.read_where = where
            if not st.optimized:  # the pass ran for this gradient (an input's, a representation's
                self.mark_used(st.pass_no)  # in MGDA): what it left on parameters is a by-product

    def resetting(self, st: LeafState, where: tuple[CodeType, int] | None = None) -> bool:
        """The leaf's gradient is about to be zeroed or dropped at ``where``. True if that discards
        a window worth checking (accumulated, unconsumed, unread, leaf trained by an optimizer,
        and not changed since: an update no hook saw — a ``torch.compile``d step — may have used
        it). A read on the zeroing line itself (``p.grad.zero_()``) is not a use."""
        st.consumed_by = None
        st.mid = 0
        read = st.read and st.read_where != where
        candidate = (st.accum > 0 and not st.consumed and not read and not st.reset and st.optimized
                     and st.pass_no not in self.used)
        leaf = st.leaf()
        if candidate and leaf is not None and st.token is not None and version(leaf) != st.token[0]:
            candidate = False
        if leaf is not None:
            self.mixed.discard(id(leaf))
        st.reset = True
        if leaf is not None:
            self.unconsumed.discard(id(leaf))
        st.stale_where = None
        return candidate

    def prune(self) -> None:
        if self.pending is not None:
            self.sync()
        for key, st in list(self.leaves.items()):
            if st.leaf() is None:
                del self.leaves[key]
                self.unconsumed.discard(key)
                self.mixed.discard(key)
                self.reached.discard(key)
                if self.grad_owner.get(st.grad_id) is st:
                    del self.grad_owner[st.grad_id]



def finite_nonzero(grad: torch.Tensor) -> bool:
    """Whether ``grad`` holds finite, non-zero values (one sync; used on rare paths only)."""
    if grad.is_sparse:
        grad = grad.coalesce().values()
    if grad.numel() == 0:
        return False
    if grad.is_floating_point() or grad.is_complex():
        ok = torch.stack([torch.isfinite(grad).all(), grad.ne(0).any()]).tolist()
        return bool(ok[0] and ok[1])
    return bool(grad.ne(0).any())
