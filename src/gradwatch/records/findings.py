"""Findings: the anomaly events of one kind at one culprit line, grouped.

A *finding* (DESIGN.md) is one bug: every tensor it touched, how many anomaly events it gave and
its step range. A forgotten ``zero_grad()`` on a 6-layer transformer is one finding at the
``backward()`` line with 72 tensors, not 72 anomalies. This module is the one place where that
grouping rule lives: the emitter (warnings, ``Watch.distinct_anomalies()``), the TensorBoard
sink (texts, ``summary_json``), ``gradwatch report``, the GradWatch tab and the Lightning
callback all group through :class:`Findings`, and name the tensors through
:func:`compress_names`.

The rule: events key by (kind, culprit file, culprit line); an event without a location keys by
(kind, tensor). A caller adds a *scope* in front of the key where it reads several runs or
ranks at once (``gradwatch report``: the run; the tab: the run's rank).

Imports nothing but ``events`` (no torch): the CLI and the TensorBoard plugin use it too.

Example::

    findings = Findings()
    for ev in anomalies:
        finding, new = findings.add(ev)
    [f.to_dict() for f in findings]      # {"event", "count", "first_step", "last_step", "tensors", ...}
    compress_names(["layers.0.fc.weight", ..., "layers.5.fc.bias"])   # "layers.0..5.fc.*"
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..events import Event, EventKind

__all__ = [
    "MAX_TENSOR_NAMES",
    "Finding",
    "Findings",
    "compress_names",
    "describe_finding",
    "finding_key",
    "row_label",
    "row_tensors",
    "tensors_label",
]

MAX_TENSOR_NAMES = 1000  # names a finding keeps, in the order first seen
_MAX_EXTRA = 65_536  # further distinct names counted exactly (by hash); past it, counted per event
MAX_GROUPS = 4  # patterns a compressed name shows before "… (+N more)"

_KIND_VALUES: dict[Any, str] = {k: k.value for k in EventKind}


def _kind(kind: Any) -> str:
    # an EventKind hashes by its name, a str by its value: key by the value, always
    return kind if type(kind) is str else _KIND_VALUES.get(kind, kind)


def finding_key(kind: Any, tensor: Any, filename: Any, lineno: Any) -> tuple[Any, ...]:
    """The grouping rule: (kind, file, line); (kind, tensor) for an event without a location."""
    if filename is None:
        return (_kind(kind), None, None, tensor)
    return (_kind(kind), filename, lineno, None)


def event_key(ev: Event) -> tuple[Any, ...]:
    """:func:`finding_key` of an :class:`Event`."""
    loc = ev.location
    if loc is None:
        return (_kind(ev.kind), None, None, ev.tensor)
    return (_kind(ev.kind), loc.filename, loc.lineno, None)


class Finding:
    """One finding: its first event (an :class:`Event`, or the plain dict a reader holds), the
    number of anomaly events, the first and last step, the ranks, and the names of the tensors
    it touched (the first :data:`MAX_TENSOR_NAMES` in order, de-duplicated; further names are
    only counted)."""

    __slots__ = ("_extra", "_seen", "_unknown", "count", "event", "first_step", "key",
                 "last_step", "max_names", "names", "ranks", "scope")

    def __init__(self, key: tuple[Any, ...], scope: tuple[Any, ...], event: Any, count: int,
                 first_step: int, last_step: int, rank: int, max_names: int) -> None:
        self.key = key
        self.scope = scope
        self.event = event
        self.count = count
        self.first_step = first_step
        self.last_step = last_step
        self.ranks = [rank]
        self.max_names = max_names
        self.names: list[str] = []
        self._seen: set[str] = set()
        self._extra: set[int] = set()  # hashes of distinct names past the list
        self._unknown = 0  # names past the list known only by number (a merged summary's)

    @property
    def tensor_count(self) -> int:
        """How many distinct tensors this finding touched (also past the kept names)."""
        return len(self.names) + len(self._extra) + self._unknown

    def add_name(self, name: str) -> None:
        if name in self._seen:
            return
        if len(self.names) < self.max_names:
            self.names.append(name)
            self._seen.add(name)
        elif len(self._extra) < _MAX_EXTRA:
            self._extra.add(hash(name))
        else:
            self._unknown += 1

    def add_names(self, names: Iterable[str], count: int | None = None) -> None:
        """Add names in order; ``count``: how many tensors the source says it had (a summary
        keeps only the first names: the rest are counted, assuming they overlap ours)."""
        n = 0
        for name in names:
            self.add_name(name)
            n += 1
        if count is not None and count > n:
            self._unknown = max(self._unknown, count - n)

    def label(self) -> str:
        """The tensors, compressed, with their number: ``"layers.0..5.* (72 tensors)"``."""
        return tensors_label(self.names, self.tensor_count)

    def to_dict(self) -> dict[str, Any]:
        """What ``Watch.distinct_anomalies()`` returns for a finding (``event`` is its first)."""
        return {"event": self.event, "count": self.count, "first_step": self.first_step,
                "last_step": self.last_step, "tensors": list(self.names),
                "tensor_count": self.tensor_count}


class Findings:
    """Findings in the order first seen, keyed by :func:`finding_key` (after a scope)."""

    def __init__(self, max_names: int = MAX_TENSOR_NAMES) -> None:
        self.max_names = max_names
        self._items: dict[tuple[Any, ...], Finding] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Finding]:
        return iter(list(self._items.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, ev: Event, scope: tuple[Any, ...] = ()) -> tuple[Finding, bool]:
        """Group one anomaly event; returns its finding and whether the finding is new."""
        key = (*scope, *event_key(ev)) if scope else event_key(ev)
        f = self._items.get(key)
        step = ev.step
        if f is None:
            f = self._items[key] = Finding(key, scope, ev, 1, step, step, ev.rank, self.max_names)
            f.add_name(ev.tensor)
            return f, True
        f.count += 1
        if step < f.first_step:
            f.first_step = step
            f.event = ev
        elif step > f.last_step:
            f.last_step = step
        if ev.rank not in f.ranks:
            f.ranks = sorted([*f.ranks, ev.rank])
        f.add_name(ev.tensor)
        return f, False

    def merge(self, event: Any, *, kind: Any, tensor: str, filename: str | None,
              lineno: int | None, step: int, rank: int = 0, scope: tuple[Any, ...] = (),
              count: int = 1, first_step: int | None = None, last_step: int | None = None,
              tensors: Sequence[str] | None = None, tensor_count: int | None = None
              ) -> tuple[Finding, bool]:
        """Group a finding read back (a summary row, a checkpoint, a first occurrence): its
        first ``event`` (an Event or a plain dict, kept as given) with its fields. Counts add
        up; the step range widens; the event with the earliest first step is kept."""
        first = step if first_step is None else first_step
        last = step if last_step is None else last_step
        names = [tensor] if tensors is None else tensors
        key = (*scope, *finding_key(kind, tensor, filename, lineno))
        f = self._items.get(key)
        new = f is None
        if f is None:
            f = self._items[key] = Finding(key, scope, event, count, first, last, rank,
                                           self.max_names)
        else:
            f.count += count
            if first < f.first_step:
                f.first_step = first
                f.event = event
            f.last_step = max(f.last_step, last)
            if rank not in f.ranks:
                f.ranks = sorted([*f.ranks, rank])
        f.add_names(names, tensor_count)
        return f, new

    def merge_event(self, ev: Event, row: dict[str, Any] | None = None,
                    scope: tuple[Any, ...] = ()) -> tuple[Finding, bool]:
        """:meth:`merge` for an :class:`Event` and, optionally, the row it came with (a summary
        or checkpoint row: ``count``, ``first_step``, ``last_step``, ``tensors``)."""
        loc = ev.location
        row = row or {}
        names, n = row_tensors(row, ev.tensor)
        return self.merge(
            ev, kind=ev.kind, tensor=ev.tensor, filename=loc.filename if loc else None,
            lineno=loc.lineno if loc else None, step=ev.step, rank=ev.rank, scope=scope,
            count=int(row.get("count", 1)), first_step=_opt_int(row.get("first_step")),
            last_step=_opt_int(row.get("last_step")), tensors=names, tensor_count=n)

    def rows(self) -> list[dict[str, Any]]:
        """:meth:`Finding.to_dict` of each finding, in the order first seen."""
        return [f.to_dict() for f in self._items.values()]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def row_label(row: dict[str, Any]) -> str:
    """:func:`tensors_label` of a finding row (``Watch.distinct_anomalies()``, ``RunData``);
    a row without ``tensors`` names its event's tensor."""
    ev = row["event"]
    tensor = ev.get("tensor", "") if isinstance(ev, dict) else ev.tensor
    names, count = row_tensors(row, str(tensor))
    return tensors_label(names, count)


def row_tensors(row: dict[str, Any], tensor: str) -> tuple[list[str], int | None]:
    """The tensor names of a finding row read back (``summary_json``, a checkpoint, JSON) and
    the number it claims; a row written before findings existed names one tensor (``tensor``).
    Names that are not strings are left out (a report must not fail on a crafted file)."""
    names = row.get("tensors")
    if not isinstance(names, list):
        return [tensor], None
    names = [n for n in names if isinstance(n, str)] or [tensor]
    count = row.get("tensor_count")
    if type(count) is not int or count < len(names):
        count = None
    return names, count


# ---------------------------------------------------------------------------------------------
# Compressed names: ``layers.0..5.*`` for the 72 tensors of a 6-layer encoder.


def tensors_label(names: Sequence[str], count: int | None = None) -> str:
    """:func:`compress_names` and, for more than one tensor, their number:
    ``"layers.0..5.* (72 tensors)"``, ``"fc.weight"``."""
    n = len(names) if count is None else max(count, len(names))
    text = compress_names(names, n)
    return text if n <= 1 else f"{text} ({n} tensors)"


def compress_names(names: Sequence[str], total: int | None = None) -> str:
    """A short, readable name for a set of dotted tensor names.

    - one or two names: themselves (``"D.0.weight, D.2.weight"``);
    - else patterns over the dotted components: a numbered component that repeats with the same
      rest is an index range (``layers.0..5.linear1.weight``; ``{0,2,4}`` when not contiguous),
      and a module whose tensors are not all spelled out ends in ``*`` (``layers.0..5.*``). The
      most specific spelling with at most four patterns wins: ``"embed.weight,
      encoder.layers.0..5.*, head.weight, head.bias"``;
    - when even one component per name gives more: the first three patterns and
      ``"… (+N more)"``, N the tensors they leave out (of ``total``, default ``len(names)``).
    """
    unique = list(dict.fromkeys(names))
    total = len(unique) if total is None else max(total, len(unique))
    if len(unique) <= 2:
        text = ", ".join(unique)
        return text if total <= len(unique) else f"{text}, … (+{total - len(unique)} more)"
    split = [tuple(n.split(".")) for n in unique]
    deepest = max(len(s) for s in split)
    for depth in range(deepest, 0, -1):
        patterns = _patterns(split, depth)
        if len(patterns) <= MAX_GROUPS:
            return _with_rest(patterns, total)
    patterns = _patterns(split, deepest)
    return _with_rest(patterns[: MAX_GROUPS - 1], total)


def _with_rest(patterns: list[tuple[tuple[Any, ...], int]], total: int) -> str:
    text = ", ".join(_render(comps) for comps, _ in patterns)
    rest = total - sum(n for _, n in patterns)
    return text if rest <= 0 else f"{text}, … (+{rest} more)"


def _patterns(split: list[tuple[str, ...]], depth: int) -> list[tuple[tuple[Any, ...], int]]:
    """Names cut after ``depth`` components (the rest as ``*``; a cut covering one name keeps
    the name), then numbered components merged into index sets."""
    cut: dict[tuple[str, ...], list[Any]] = {}  # pattern -> [count, the one name it covers]
    for comps in split:
        key = comps if len(comps) <= depth else (*comps[:depth], "*")
        entry = cut.get(key)
        if entry is None:
            cut[key] = [1, comps]
        else:
            entry[0] += 1
    pats: list[tuple[tuple[Any, ...], int]] = [
        (comps if n == 1 else key, n) for key, (n, comps) in cut.items()
    ]
    return _merge_indices(pats)


def _is_index(c: Any) -> bool:
    return isinstance(c, frozenset) or (
        isinstance(c, str) and c.isascii() and c.isdigit() and str(int(c)) == c)


def _merge_indices(pats: list[tuple[tuple[Any, ...], int]]) -> list[tuple[tuple[Any, ...], int]]:
    """Merge patterns that differ only in one numbered component, position by position, until
    nothing merges: ``layers.0.*``, ``layers.1.*`` → ``layers.{0,1}.*``. Order: first seen."""
    changed = True
    while changed and len(pats) > 1:
        changed = False
        width = max(len(c) for c, _ in pats)
        for pos in range(width):
            out: list[list[Any]] = []
            where: dict[tuple[Any, ...], int] = {}
            for comps, n in pats:
                c = comps[pos] if pos < len(comps) else None
                if c is None or not _is_index(c):
                    out.append([comps, n, None])
                    continue
                idx = c if isinstance(c, frozenset) else frozenset((int(c),))
                key = (len(comps), comps[:pos], comps[pos + 1:])
                i = where.get(key)
                if i is None:
                    where[key] = len(out)
                    out.append([comps, n, idx])
                else:
                    out[i][1] += n
                    out[i][2] = out[i][2] | idx
                    changed = True
            pats = [(comps if idx is None or len(idx) == 1
                     else (*comps[:pos], idx, *comps[pos + 1:]), n) for comps, n, idx in out]
    return pats


def _render(comps: tuple[Any, ...]) -> str:
    return ".".join(_indices(c) if isinstance(c, frozenset) else c for c in comps)


def _indices(s: frozenset[int]) -> str:
    """``0..5``; ``{0,2,4}``; ``{0..3,7}``; ``{0,1}``."""
    xs = sorted(s)
    runs: list[tuple[int, int]] = []
    start = prev = xs[0]
    for x in xs[1:]:
        if x != prev + 1:
            runs.append((start, prev))
            start = x
        prev = x
    runs.append((start, prev))
    if len(runs) == 1 and runs[0][1] - runs[0][0] >= 2:
        return f"{runs[0][0]}..{runs[0][1]}"
    if len(xs) == 1:
        return str(xs[0])
    parts = []
    for a, b in runs:
        if b - a >= 2:
            parts.append(f"{a}..{b}")
        else:
            parts.extend(str(x) for x in range(a, b + 1))
    return "{" + ",".join(parts) + "}"


# ---------------------------------------------------------------------------------------------
# The warning text of a finding.


def describe_finding(f: Finding) -> str:
    """The ``GradWatchWarning`` text of a finding: its first event's :meth:`Event.describe`,
    naming every tensor (compressed) when there are several."""
    ev: Event = f.event
    if f.tensor_count <= 1:
        return ev.describe()
    where = ""
    if ev.location is not None:
        where = f" at {ev.location}"
        if ev.location.code:
            where += f"  `{ev.location.code}`"
    text = f"[gradwatch] {_kind(ev.kind)} on {f.label()}{where}"
    if ev.message:
        text += f"\n  first: {ev.message}"
    if ev.hint:
        text += f"\n  hint: {ev.hint}"
    return text
