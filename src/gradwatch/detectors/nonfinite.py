"""``nonfinite_introduced``: an op under no_grad writes NaN/Inf into a finite tensor.

Checks are lazy and batched: each watched write queues a 0-d finiteness probe of the tensor
before and after (a device tensor, no sync); the queue is read in one ``tolist()`` at a
statistics step boundary, the end, or when it is full. The first write whose before is finite
and after is not is reported.

Writes into a parameter that no optimizer holds (a hand-written update: only watched writes
change it) follow the statistics steps' amortisation instead of a probe per write: the first write
opens a *window* (the probe before it, usually the one its last window closed with, and its
record); further writes from the same line and op extend it; all windows close together, in one
fused norm call, when a statistics pass (``passes % stats_every == 0``) begins, at the step
boundary and at the end. A write from another line or op, ``stats_every`` writes, or a write by
torch's own code close a tensor's window first (the probe before that write), so each reported
line and op is exact; the step and version reported are the window's first write's (a NaN found
at the close was written by that line within the window's writes, at most ``stats_every`` of
them). Where something unseen wrote the tensor (its version moved past the window's), the
window's after is unknown and it is dropped.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._context import RunContext, version
from .._location import location_of
from .._stats import checkable, probe
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, describe_shape, op_str

K = EventKind

__all__ = ["NonfiniteDetector", "NonfiniteTracker"]

HINT = (
    "guard the division/log/sqrt on this line (e.g. x / norm.clamp_min(eps)), or lower the "
    "learning rate; check the inputs of this update for zeros and overflow"
)
HINT_LOG = "clamp what this line takes the log of (x.clamp_min(eps).log()); check it for zeros"
HINT_SQRT = ("add eps inside the square root (torch.sqrt(v + eps)), not outside it; check what "
             "it takes the root of for negative values")
HINT_STEP = ("lower the learning rate or clip the gradients (torch.nn.utils.clip_grad_norm_) "
             "before the step; check the gradients for NaN/Inf (a loss that overflowed)")
HINT_VALUES = ("check what this line writes: its inputs for NaN/Inf and overflow (values "
               "beyond the dtype's range), or lower the learning rate")


def hint_for(op: str, code: str) -> str:
    """The fix for a write that made a tensor non-finite, by the op and the source line."""
    if op == "optimizer.step":
        return HINT_STEP
    text = f"{op} {code}"
    if "sqrt" in text:
        return HINT_SQRT
    if "log" in text:
        return HINT_LOG
    if "div" in text or "/" in code:
        return HINT
    return HINT_VALUES


class _Vector(NamedTuple):
    """An optimizer step's probes in one device vector: ``vec[before + i]`` is parameter i's
    probe before the update, ``vec[after + i]`` after it."""

    vec: torch.Tensor
    before: int
    after: int
    infos: list[Any]


class NonfiniteTracker:
    """Queue of pending (before, after) checks; resolved in batches."""

    def __init__(self, limit: int = 2048) -> None:
        self.limit = limit
        self.pending: list[Any] = []  # (before, after, info) or a _Vector
        self.reported: set[str] = set()

    def queue(self, before: list[torch.Tensor], after: list[torch.Tensor], infos: list[Any]) -> bool:
        """Queue checks; True when the queue is full and should be resolved now."""
        self.pending.extend(zip(before, after, infos))
        return len(self.pending) >= self.limit

    def queue_vector(self, vec: torch.Tensor, before: int, after: int, infos: list[Any]) -> None:
        """Queue one check per entry of ``infos`` whose probes lie in ``vec`` (see _Vector)."""
        self.pending.append(_Vector(vec, before, after, infos))

    def resolve(self, report: Callable[[Any], None],
                stepped: Callable[[Any, bool, bool], None] | None = None) -> None:
        """Read all pending checks in one sync and report the first write that broke each tensor.
        ``stepped(info, finite before, finite after)`` sees every optimizer step's check."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        pairs = [e for e in pending if type(e) is tuple]
        vectors = [e.vec.reshape(-1).float() for e in pending if type(e) is _Vector]
        parts = [torch.stack([x.float() for b, a, _ in pairs for x in (b, a)])] if pairs else []
        try:
            values = torch.cat(parts + vectors).tolist()
        except RuntimeError:  # tensors on several devices
            values = [x for part in parts + vectors for x in part.tolist()]
        finite = [math.isfinite(v) for v in values]
        i = 0  # pairs first, then the vectors, each in queue order
        j = 2 * len(pairs)
        for e in pending:
            if type(e) is tuple:
                if finite[i] and not finite[i + 1]:
                    report(e[2])
                i += 2
            else:
                for k, info in enumerate(e.infos):
                    before, after = finite[j + e.before + k], finite[j + e.after + k]
                    if before and not after:
                        report(info)
                    elif stepped is not None:
                        stepped(info, before, after)
                j += e.vec.numel()



def _window_raw(window: list[Any]) -> Raw:
    """The record a window's check reports: its first write, the version after its last."""
    raw = window[3]
    return raw if window[5] == 1 else raw._replace(version_after=window[1])


class NonfiniteDetector:
    """Queues finiteness probes of watched writes and optimizer steps; reports, once per tensor,
    the first write that made a finite tensor non-finite."""

    def __init__(self, ctx: RunContext, emit: Emitter) -> None:
        self.ctx = ctx
        self.emit = emit
        self.queue = NonfiniteTracker()
        self.reported: set[str] = set()
        # names of parameters finite after their last checked optimizer step, and that step
        self.finite_after: set[str] = set()
        self.finite_step: dict[str, int] = {}
        self.last_info: dict[str, Any] = {}  # name -> the lazy record of its last checked step
        self.off = False
        # id(tensor) -> (weak ref, version, probe): the probe after its last probed write
        self.known: dict[int, tuple[Any, int | None, torch.Tensor]] = {}
        # id(tensor) -> [weak ref, version after its last write, the probe before its first
        # write, that write's record, its site (op, where), the writes in it]
        self.open: dict[int, list[Any]] = {}
        self.open_epoch = 0  # passes // stats_every when the open windows began

    # -- watched writes -----------------------------------------------------------------------
    def before(self, ts: list[torch.Tensor], site: Any,
               windowed: list[bool]) -> list[torch.Tensor | None]:
        """The probes of ``ts`` right before a write at ``site`` (``(op, where)``) into them.
        None where the write extends the tensor's open window (``windowed``: a parameter only
        watched writes change: see the module docstring); else the known probe where nothing
        changed the tensor since (same version), or a new one. A window that ends here is
        closed by the probe now (one fused call for all of them and the new ones)."""
        opened = self.open
        if opened:
            ctx = self.ctx
            epoch = ctx.passes // ctx.stats_every
            if epoch != self.open_epoch:  # a statistics pass began: close every window at once
                self.close()
                opened = self.open
                self.open_epoch = epoch
        known = self.known
        flags: list[Any] = []
        missing = []
        ending = []
        for i, t in enumerate(ts):
            if opened:
                window = opened.get(id(t))
                if window is not None:
                    if (window[0]() is t and window[1] == version(t) and windowed[i]
                            and window[4] == site and window[5] < self.ctx.stats_every):
                        flags.append(None)  # the same line again: the window goes on
                        continue
                    del opened[id(t)]
                    if window[0]() is t and window[1] == version(t):
                        ending.append((i, window))
                        flags.append(None)
                        missing.append(i)
                        continue
            entry = known.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == version(t):
                flags.append(entry[2])
            else:
                flags.append(None)
                missing.append(i)
        if missing:
            fresh = probe([ts[i] for i in missing])
            for i, f in zip(missing, fresh):
                flags[i] = f
            for i, window in ending:  # the probe now is the window's after
                self.queue.pending.append((window[2], flags[i], _window_raw(window)))
        return flags

    def touched(self, ts: Any) -> None:
        """Tensors about to be written without probes (torch's own code): their open windows
        close now, before the write."""
        opened = self.open
        ending = [t for t in ts if id(t) in opened]
        if ending:
            self.before(ending, None, [False] * len(ending))

    def after(self, ts: list[torch.Tensor], before: list[torch.Tensor | None], raws: list[Raw],
              site: Any, windowed: list[bool]) -> None:
        """Writes at ``site`` into ``ts`` happened (their probes ``before``, None where an open
        window goes on; their records ``raws``). A write into a ``windowed`` tensor opens a
        window or extends one (probed when it closes); any other is probed now."""
        opened = self.open
        now = []
        for i, t in enumerate(ts):
            b = before[i]
            if b is None:  # an open window goes on
                window = opened.get(id(t))
                if window is None:
                    continue
                window[1] = version(t)
                window[5] += 1
            elif windowed[i]:
                if not opened:
                    self.open_epoch = self.ctx.passes // self.ctx.stats_every
                opened[id(t)] = [weakref.ref(t), version(t), b, raws[i], site, 1]
            else:
                now.append(i)
        if now:
            checked = [ts[i] for i in now]
            flags = probe(checked)
            self._remember(checked, flags)
            self.wrote([before[i] for i in now], flags, [raws[i] for i in now])

    def close(self) -> None:
        """Probe every open window's tensor (one fused call) and queue the checks."""
        opened, self.open = self.open, {}
        if not opened:
            return
        live = []
        for window in opened.values():
            t = window[0]()
            if t is not None and version(t) == window[1]:
                live.append((t, window))
        if not live:
            return
        ts = [e[0] for e in live]
        flags = probe(ts)
        self._remember(ts, flags)
        q = self.queue
        befores = [e[1][2] for e in live]
        raws = [_window_raw(e[1]) for e in live]
        try:  # one vector: befores, then afters (read at resolution with one copy)
            vec = torch.stack(befores + flags)
        except Exception:  # mixed dtypes or devices: one pair each
            q.pending.extend(zip(befores, flags, raws))
        else:
            q.queue_vector(vec, 0, len(live), raws)
        if len(q.pending) >= q.limit:
            q.resolve(self.report, self._checked_step)

    def _remember(self, ts: list[torch.Tensor], flags: list[torch.Tensor]) -> None:
        known = self.known
        if len(known) > 4096:
            known.clear()
        for t, f in zip(ts, flags):
            known[id(t)] = (weakref.ref(t), version(t), f)

    def wrote(self, before: list[torch.Tensor], after: list[torch.Tensor], raws: list[Raw]) -> None:
        """Probes (see :func:`gradwatch._stats.probe`) of tensors before and after the writes
        recorded as ``raws``."""
        if self.queue.queue(before, after, raws):
            self.queue.resolve(self.report, self._checked_step)

    def stepped(self, vec: torch.Tensor, k: int, params: list[torch.Tensor],
                versions: list[int | None], where: Any, step: int,
                names: list[str | None] | None = None) -> None:
        """An optimizer step's probes: ``vec[i]`` before and ``vec[2k + ... ]`` layout of
        :func:`gradwatch._stats.update_norms` (sample before, whole parameter after).
        ``names``: the parameters' names now (they may be gone when the probes are read)."""
        if names is None:
            names = [self.ctx.names.param_name(p) for p in params]
        lazy = [functools.partial(self._update_raw, weakref.ref(p), vb, where, step, name,
                                  (tuple(p.shape), p.dtype, p.device))
                for p, vb, name in zip(params, versions, names)]
        self.queue.queue_vector(vec, 0, 3 * k, lazy)

    def end_step(self, final: bool) -> None:
        """One read of the queued probes (a sync on GPU) per statistics step, not per step."""
        if self.open:
            self.close()
        q = self.queue
        if q.pending and (final or self.ctx.is_stats_step() or len(q.pending) > q.limit // 2):
            q.resolve(self.report, self._checked_step)
        if final and self.finite_after:
            self._final_check()

    def _final_check(self) -> None:
        """The watch ends: the parameters a library optimizer left finite at its last checked
        step are probed once more (one read): NaN/Inf written by a step since is reported."""
        infos = [(name, self.last_info[name]) for name in sorted(self.finite_after)
                 if name in self.last_info]
        live = [(name, info, p) for name, info in infos if (p := info.args[0]()) is not None
                and p.layout == torch.strided and p.numel() and checkable(p)]
        if not live:
            return
        with torch.no_grad():
            values = torch.stack([p.detach().abs().amax().float() for _, _, p in live]).tolist()
        for (name, info, _), v in zip(live, values):
            if not math.isfinite(v):
                self.finite_after.discard(name)
                raw = info()._replace(step=self.ctx.step())
                self.report(raw, since=self.finite_step.get(name))

    def _update_raw(self, ref: weakref.ref[torch.Tensor], vb: int | None, where: Any,
                    step: int, name: str | None, meta: tuple) -> Raw:
        """The record of an optimizer step's write into one parameter (built only when its NaN
        check fails; the parameter may be gone by then: its name and shape were kept)."""
        p = ref()
        shape, dtype, device = meta
        return Raw(K.NONFINITE_INTRODUCED, "optimizer.step", name, shape, dtype, device, vb,
                   version(p) if p is not None else None, "no_grad", None, where, step)

    def _checked_step(self, info: Any, before: bool, after: bool) -> None:
        """An optimizer step's check (statistics steps only). A parameter found finite after one
        and non-finite before a later one became NaN/Inf at a step in between (library steps
        are probed on statistics steps only): reported at this step's line, as in between."""
        name = info.args[4] if isinstance(info, functools.partial) else None
        if name is None:
            return
        finite = self.finite_after
        if after:
            finite.add(name)
        elif name in finite:
            finite.discard(name)
            if not before:
                self.report(info, since=self.finite_step.get(name))
        if after:
            self.finite_step[name] = info.args[3]
            self.last_info[name] = info

    def report(self, raw: Raw | Callable[[], Raw], since: int | None = None) -> None:
        if callable(raw):
            raw = raw()
        name = raw.name or describe_shape(raw.shape, raw.dtype)
        if name in self.reported:
            return
        self.reported.add(name)
        op = op_str(raw.op)
        loc = location_of(raw.where)
        when = (f" at a step between {since} and {raw.step} (it was finite after step {since}; "
                f"library optimizer steps are checked every stats_every steps)"
                if since is not None else "")
        self.emit.anomaly(raw._replace(
            kind=K.NONFINITE_INTRODUCED, change=None,
            message=f"{op} wrote NaN/Inf into `{name}`{when}, which was finite before",
            hint=hint_for(op, loc.code if loc is not None else ""),
        ))
