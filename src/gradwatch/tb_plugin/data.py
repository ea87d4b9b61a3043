"""Turn gradwatch's TensorBoard tags into the JSON the GradWatch tab draws.

Reads only through a TensorBoard ``DataProvider`` (``context.data_provider``), so it works with
the Python loader and with the Rust data server alike. The tag layout is the one written by
``gradwatch.sinks.tensorboard`` (docs/INTERNALS.md):

- text ``gradwatch/anomaly_json`` (first occurrence of each finding, ``Event.to_dict``)
- text ``gradwatch/summary_json`` (at flush/close: every finding with count, steps and tensors)

Findings are grouped by ``gradwatch.records.findings`` (one per rank, kind and culprit line),
the rule the watch, its warnings and ``gradwatch report`` use.
- scalars ``gradwatch/count/<kind>`` (events of that kind per step)
- tensor ``gradwatch/update_ratios_json`` (plugin ``gradwatch``; text from writers other than
  torch's): ‖Δ‖/‖w‖ per parameter on statistics steps, and the zero-initialised parameters
- scalars ``gradwatch/param_update_ratio/<param>`` (``per_parameter_scalars=True`` or older runs)

torch's ``SummaryWriter.add_text`` appends ``/text_summary`` to text tags; both spellings are read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from tensorboard.data import provider

from ..events import SEVERITY, EventKind
from ..records.findings import Finding, Findings, finding_key, row_tensors

__all__ = [
    "EXPLODING_ABOVE",
    "STALLED_BELOW",
    "GradWatchData",
    "ratio_status",
]

PREFIX = "gradwatch/"
TEXT_PLUGIN = "text"
SCALARS_PLUGIN = "scalars"
ANOMALY_JSON_TAGS = ("gradwatch/anomaly_json", "gradwatch/anomaly_json/text_summary")
SUMMARY_JSON_TAGS = ("gradwatch/summary_json", "gradwatch/summary_json/text_summary")
COUNT_PREFIX = "gradwatch/count/"
PARAM_RATIO_PREFIX = "gradwatch/param_update_ratio/"
GRADWATCH_PLUGIN = "gradwatch"
RATIOS_JSON_TAGS = ("gradwatch/update_ratios_json", "gradwatch/update_ratios_json/text_summary")
OPTIMIZER_COUNT_TAG = "gradwatch/count/optimizer_update"
ANOMALY_KINDS = [k.value for k in EventKind if SEVERITY[k] != "info"]
DOWNSAMPLE = 100_000  # read every stored point (TensorBoard's own reservoir bounds storage)

# An update/weight ratio ‖Δ‖/‖w‖ below this means the parameter stopped training (typical
# healthy values are around 1e-3); above this, one step moves the weights by a tenth of their
# norm: the layer is blowing up.
STALLED_BELOW = 1e-7
EXPLODING_ABOVE = 1e-1

_RANK_RUN_RE = re.compile(r"(?:^|/)rank(\d+)$")


def ratio_status(value: float | None, zero_init: bool = False) -> str:
    """``"nonfinite"``, ``"stalled"``, ``"exploding"`` or ``"ok"`` for one update/weight ratio.

    A zero-initialised parameter (a bias) is never ``"exploding"``: ‖w‖ grows from 0, so its
    ratio says nothing about the update's size (``"zero_init"``, shown as n/a)."""
    if value is None or not math.isfinite(value):
        return "nonfinite"
    if value < STALLED_BELOW:
        return "stalled"
    if value > EXPLODING_ABOVE:
        return "zero_init" if zero_init else "exploding"
    return "ok"


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _text(datum: Any) -> str | None:
    """The string of a text tensor datum (a 0-d or 1-d array of bytes)."""
    arr = datum.numpy
    try:
        item = arr.reshape(-1)[0] if getattr(arr, "size", 1) else None
    except Exception:
        item = arr
    if item is None:
        return None
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return str(item)


def run_rank(run: str) -> int:
    """Rank of a TensorBoard run: ranks > 0 write under ``<log_dir>/rank{R}``."""
    m = _RANK_RUN_RE.search(run)
    return int(m.group(1)) if m else 0


class GradWatchData:
    """gradwatch data of one experiment, read through ``data_provider`` for one request."""

    def __init__(self, data_provider: provider.DataProvider, ctx: Any, experiment_id: str) -> None:
        self._dp = data_provider
        self._ctx = ctx
        self._eid = experiment_id

    # ------------------------------------------------------------------ discovery
    def has_data(self) -> bool:
        return bool(self.runs())

    def runs(self) -> list[str]:
        """Runs with any gradwatch tag, sorted."""
        found: set[str] = set()
        for plugin in (SCALARS_PLUGIN, TEXT_PLUGIN):
            listing = self._list(plugin, None)
            for run, tags in listing.items():
                if any(t.startswith(PREFIX) for t in tags):
                    found.add(run)
        return sorted(found)

    def _list(self, plugin: str, runs: Iterable[str] | None) -> dict[str, dict[str, Any]]:
        filt = provider.RunTagFilter(runs=runs) if runs is not None else None
        lister = self._dp.list_scalars if plugin == SCALARS_PLUGIN else self._dp.list_tensors
        return lister(self._ctx, experiment_id=self._eid, plugin_name=plugin,
                      run_tag_filter=filt) or {}

    def _runs_filter(self, run: str | None) -> list[str] | None:
        return None if run is None else [run]

    # ------------------------------------------------------------------ anomalies
    def anomalies(self, run: str | None = None) -> list[dict[str, Any]]:
        """Findings of every run (or one), worst first, each with run and rank: one row per
        finding, ``tensor`` its tensors compressed (``layers.0..5.* (72 tensors)``),
        ``tensors`` their names."""
        runs = self._runs_filter(run)
        texts = self._dp.read_tensors(
            self._ctx, experiment_id=self._eid, plugin_name=TEXT_PLUGIN, downsample=DOWNSAMPLE,
            run_tag_filter=provider.RunTagFilter(
                runs=runs, tags=[*ANOMALY_JSON_TAGS, *SUMMARY_JSON_TAGS]),
        ) or {}
        out: list[dict[str, Any]] = []
        for run_name in sorted(texts):
            out.extend(self._run_anomalies(run_name, texts[run_name]))
        out.sort(key=lambda a: (-_SEV_RANK[a["severity"]], -a["count"], a["first_step"],
                                a["run"], a["rank"]))
        return out

    def _run_anomalies(self, run: str, tags: dict[str, list[Any]]) -> list[dict[str, Any]]:
        """The run's findings (``records.findings``: one per rank, kind and culprit line): the
        latest summary, then first occurrences it does not hold yet (no clean close)."""
        findings = Findings()
        latest: tuple[tuple[float, int], list[Any]] | None = None
        for tag in SUMMARY_JSON_TAGS:
            for datum in tags.get(tag, []):
                obj = _loads(_text(datum))
                if isinstance(obj, list):
                    order = (datum.wall_time, datum.step)
                    if latest is None or order >= latest[0]:
                        latest = (order, obj)
        in_summary: set[tuple[Any, ...]] = set()
        if latest is not None:
            for item in latest[1]:
                if isinstance(item, dict) and isinstance(item.get("event"), dict):
                    f = _merge(findings, run, item["event"], item)
                    if f is not None:
                        in_summary.add(f.key)
        firsts: set[tuple[Any, ...]] = set()
        for tag in ANOMALY_JSON_TAGS:
            for datum in tags.get(tag, []):
                obj = _loads(_text(datum))
                if isinstance(obj, dict):
                    fields = _fields(run, obj)
                    if fields is None:
                        continue
                    key = (fields["scope"][0], *finding_key(
                        fields["kind"], fields["tensor"], fields["filename"], fields["lineno"]))
                    if key not in in_summary and (key, fields["tensor"]) not in firsts:
                        firsts.add((key, fields["tensor"]))
                        _merge(findings, run, obj, {})
        return [_anomaly(run, f) for f in findings]

    # ------------------------------------------------------------------ timeline
    def timeline(self, run: str | None = None) -> dict[str, Any]:
        """Per run and anomaly kind: ``[[step, count], ...]`` for steps with that anomaly;
        ``max_step`` (all runs) and ``run_max_step`` (per run: the tab's axis after filtering)."""
        runs = self._runs_filter(run)
        tags = [COUNT_PREFIX + k for k in ANOMALY_KINDS]
        scalars = self._dp.read_scalars(
            self._ctx, experiment_id=self._eid, plugin_name=SCALARS_PLUGIN,
            downsample=DOWNSAMPLE, run_tag_filter=provider.RunTagFilter(runs=runs, tags=tags),
        ) or {}
        anomalies = self.anomalies(run)
        ranks: dict[str, int] = {}
        for a in anomalies:
            ranks.setdefault(a["run"], a["rank"])
        series: list[dict[str, Any]] = []
        max_step = 0
        run_max: dict[str, int] = {}
        covered: set[tuple[str, str]] = set()
        for run_name in sorted(scalars):
            for tag, data in sorted(scalars[run_name].items()):
                kind = tag[len(COUNT_PREFIX):]
                points = [[d.step, d.value] for d in data if math.isfinite(d.value) and d.value > 0]
                if data:
                    top = max(d.step for d in data)
                    max_step = max(max_step, top)
                    run_max[run_name] = max(run_max.get(run_name, 0), top)
                    covered.add((run_name, kind))
                if points:
                    series.append(self._series(run_name, kind, points, ranks))
        # Runs without count scalars (an older or foreign writer): first and last occurrence.
        for a in anomalies:
            max_step = max(max_step, a["last_step"])
            run_max[a["run"]] = max(run_max.get(a["run"], 0), a["last_step"])
            if (a["run"], a["kind"]) in covered:
                continue
            pts = {a["first_step"]: 1, a["last_step"]: 1}
            existing = next((s for s in series if s["run"] == a["run"] and s["kind"] == a["kind"]),
                            None)
            if existing is None:
                series.append(self._series(a["run"], a["kind"],
                                           [[s, n] for s, n in sorted(pts.items())], ranks))
            else:
                merged = dict(existing["points"])
                for s, n in pts.items():
                    merged[s] = merged.get(s, 0) + n
                existing["points"] = [[s, n] for s, n in sorted(merged.items())]
        order = {k: i for i, k in enumerate(ANOMALY_KINDS)}
        series.sort(key=lambda s: (order.get(s["kind"], 99), s["run"]))
        return {"kinds": ANOMALY_KINDS, "series": series, "max_step": max_step,
                "run_max_step": run_max}

    @staticmethod
    def _series(run: str, kind: str, points: list[list[float]], ranks: dict[str, int]
                ) -> dict[str, Any]:
        return {
            "run": run,
            "rank": ranks.get(run, run_rank(run)),
            "kind": kind,
            "severity": _severity(kind),
            "points": points,
            "total": sum(p[1] for p in points),
        }

    # ------------------------------------------------------------------ update/weight ratios
    def update_ratios(self, run: str | None = None) -> dict[str, Any]:
        """Per run and parameter: the update/weight ratio over steps and a status. Read from
        ``gradwatch/update_ratios_json`` (one document per statistics step), else from the
        per-parameter scalars. ``updated``: parameters with a ratio; ``optimizer_updates``:
        optimizer updates counted in the run (0: no optimizer step changed a parameter)."""
        runs = self._runs_filter(run)
        series: dict[str, dict[str, list[tuple[int, float | None]]]] = {}
        zero_init: dict[str, set[str]] = {}
        for plugin in (GRADWATCH_PLUGIN, TEXT_PLUGIN):
            listing = self._list(plugin, runs)
            if not any(t in RATIOS_JSON_TAGS for tags in listing.values() for t in tags):
                continue
            texts = self._dp.read_tensors(
                self._ctx, experiment_id=self._eid, plugin_name=plugin, downsample=DOWNSAMPLE,
                run_tag_filter=provider.RunTagFilter(runs=runs, tags=list(RATIOS_JSON_TAGS)),
            ) or {}
            for run_name, tags in texts.items():
                per = series.setdefault(run_name, {})
                zi = zero_init.setdefault(run_name, set())
                for tag in RATIOS_JSON_TAGS:
                    for datum in tags.get(tag, []):
                        doc = _loads(_text(datum))
                        if not isinstance(doc, dict) or not isinstance(doc.get("ratios"), dict):
                            continue
                        for name, v in doc["ratios"].items():
                            value = _finite(v) if isinstance(v, (int, float)) else None
                            per.setdefault(str(name), []).append((datum.step, value))
                        if isinstance(doc.get("zero_init"), list):
                            zi.update(str(n) for n in doc["zero_init"])
        listing = self._list(SCALARS_PLUGIN, runs)
        tags = sorted({t for tags in listing.values() for t in tags
                       if t.startswith(PARAM_RATIO_PREFIX)})
        scalar_runs = [r for r, t in listing.items() if r not in series
                       and any(x.startswith(PARAM_RATIO_PREFIX) for x in t)]
        if tags and scalar_runs:  # runs without the JSON: per-parameter scalars
            scalars = self._dp.read_scalars(
                self._ctx, experiment_id=self._eid, plugin_name=SCALARS_PLUGIN,
                downsample=DOWNSAMPLE,
                run_tag_filter=provider.RunTagFilter(runs=scalar_runs, tags=tags),
            ) or {}
            for run_name, by_tag in scalars.items():
                per = series.setdefault(run_name, {})
                for tag, data in by_tag.items():
                    per[tag[len(PARAM_RATIO_PREFIX):]] = [(d.step, _finite(d.value)) for d in data]
        updates = self._optimizer_updates(runs)
        runs_out: list[dict[str, Any]] = []
        for run_name in sorted(set(series) | set(updates)):
            params = []
            for name, points in series.get(run_name, {}).items():
                if not points:
                    continue
                points = sorted(set(points), key=lambda p: p[0])
                finite = [v for _, v in points if v is not None]
                last = points[-1][1]
                # the first ratio of a parameter that was exactly zero is exactly 1 (‖Δ‖ is
                # measured against ‖w‖ after the update): recognised in older runs too
                zi = name in zero_init.get(run_name, ()) or (
                    run_name not in zero_init and points[0][1] == 1.0)
                params.append({
                    "name": name,
                    "points": [[s, v] for s, v in points],
                    "last": last,
                    "last_step": points[-1][0],
                    "min": min(finite) if finite else None,
                    "max": max(finite) if finite else None,
                    "zero_init": zi,
                    "status": ratio_status(last, zi),
                })
            flagged = {"nonfinite": 0, "exploding": 1, "stalled": 2, "zero_init": 3, "ok": 4}
            params.sort(key=lambda p: (flagged[p["status"]], p["name"]))
            runs_out.append({"run": run_name, "rank": run_rank(run_name), "params": params,
                             "updated": len(params),
                             "optimizer_updates": updates.get(run_name)})
        return {
            "thresholds": {"stalled_below": STALLED_BELOW, "exploding_above": EXPLODING_ABOVE},
            "runs": runs_out,
        }

    def _optimizer_updates(self, runs: list[str] | None) -> dict[str, int]:
        """Optimizer updates per run (``gradwatch/count/optimizer_update``), for runs with it."""
        scalars = self._dp.read_scalars(
            self._ctx, experiment_id=self._eid, plugin_name=SCALARS_PLUGIN, downsample=DOWNSAMPLE,
            run_tag_filter=provider.RunTagFilter(runs=runs, tags=[OPTIMIZER_COUNT_TAG]),
        ) or {}
        return {r: int(sum(d.value for d in t.get(OPTIMIZER_COUNT_TAG, [])
                           if math.isfinite(d.value)))
                for r, t in scalars.items() if t.get(OPTIMIZER_COUNT_TAG)}


_SEV_RANK = {"info": 0, "warning": 1, "error": 2}


def _severity(kind: str) -> str:
    try:
        return SEVERITY[EventKind(kind)]
    except ValueError:
        return "warning"


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _fields(run: str, ev: dict[str, Any]) -> dict[str, Any] | None:
    """The grouping fields of an event dict read back (leniently), or None without a kind."""
    kind = ev.get("kind")
    if not isinstance(kind, str):
        return None
    loc = ev.get("location") if isinstance(ev.get("location"), dict) else None
    return {
        "kind": kind,
        "tensor": str(ev.get("tensor", "")),
        "filename": str(loc.get("filename", "")) if loc else None,
        "lineno": _int(loc.get("lineno"), 0) if loc else None,
        "step": _int(ev.get("step"), 0),
        "rank": _int(ev.get("rank"), run_rank(run)),
        "scope": (_int(ev.get("rank"), run_rank(run)),),
    }


def _merge(findings: Findings, run: str, ev: dict[str, Any], row: dict[str, Any]) -> Any:
    """Group one event dict (with its summary row: count, steps, tensors) into ``findings``."""
    fields = _fields(run, ev)
    if fields is None:
        return None
    step = fields.pop("step")
    names, count = row_tensors(row, fields["tensor"])
    f, _ = findings.merge(
        ev, step=step, count=_int(row.get("count"), 1),
        first_step=_int(row.get("first_step"), step), last_step=_int(row.get("last_step"), step),
        tensors=names, tensor_count=count, **fields)
    return f


def _anomaly(run: str, f: Finding) -> dict[str, Any]:
    """One row of the findings table (a finding), flat and JSON-ready."""
    ev: dict[str, Any] = f.event
    kind = str(ev.get("kind"))
    loc = ev.get("location") if isinstance(ev.get("location"), dict) else None
    filename = str(loc.get("filename", "")) if loc else ""
    lineno = _int(loc.get("lineno"), 0) if loc else 0
    basename = re.split(r"[\\/]", filename)[-1] if filename else ""
    severity = ev.get("severity") if ev.get("severity") in _SEV_RANK else _severity(kind)
    rank = f.scope[0]
    return {
        "key": [run, *f.key],
        "run": run,
        "rank": rank,
        "kind": kind,
        "severity": severity,
        "tensor": f.label(),
        "tensors": list(f.names),
        "tensor_count": f.tensor_count,
        "op": str(ev.get("op", "")),
        "file": filename,
        "basename": basename,
        "line": lineno,
        "function": str(loc.get("function", "")) if loc else "",
        "code": str(loc.get("code", "")) if loc else "",
        "where": f"{basename}:{lineno}" if loc else "",
        "count": f.count,
        "first_step": f.first_step,
        "last_step": f.last_step,
        "message": str(ev.get("message", "")),
        "hint": str(ev.get("hint", "")),
        "event": ev,
    }
