"""TensorBoard output: per-step counts, findings as text, update ratios, a layout.

The tag layout is described in ``docs/INTERNALS.md`` (all tags under ``gradwatch/``). TensorBoard
itself is imported only when the first writer is created, so importing gradwatch stays cheap.

Example usage::

    sink = TensorBoardSink(log_dir="runs/exp1")            # our own SummaryWriter
    sink = TensorBoardSink(writer=logger.experiment)      # an existing one (never closed by us)
    w = Watch(Config.build(model, opt), sinks=[sink])

Known limitations:
    - With ``every_n_steps > 1`` the counts written at a logged step cover every step since the
      previous logged step (nothing is lost between logged steps), and ``overhead_ms`` is their
      mean per step; what is left at close is written at the last step. A step with an
      anomaly always ends the window (its counts are written at that step). Anomaly texts are
      written at once, whatever the cadence. A window without any event (no optimizer step, e.g.
      the summary at close) is not written.
    - The custom-scalars layout is a single summary per run: a layout written by someone else
      into the same writer replaces ours (or ours replaces theirs).
    - ``gradwatch/anomaly`` holds one markdown document per step: every finding first seen at
      that step (TensorBoard's Text dashboard shows one text per tag and step). It is written
      when the step's summary arrives (and at flush/close); a finding that arrives later for a
      step already written is added to the latest document, which is written again at its step
      (the newest text of a step supersedes the older ones). Each entry names the finding's first
      event's tensor only; every tensor of the finding is listed in ``gradwatch/summary_json``
      (written at flush, close, and after each step that brought a new finding), which the
      GradWatch tab and ``gradwatch report`` read. ``gradwatch/anomaly_json`` (one JSON object
      per finding) is written and flushed at the finding's first event.
    - Per-parameter update/weight ratios are written as one JSON tensor per statistics step
      (``gradwatch/update_ratios_json``, plugin ``gradwatch``: not shown by Time Series or Text)
      unless ``per_parameter_scalars=True``, which adds one scalar per parameter.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from ..events import SEVERITY, Event, EventKind
from ..records.findings import Findings
from . import Sink, StepSummary

__all__ = ["ANOMALY_KINDS", "KINDS", "RATIOS_JSON_TAG", "TensorBoardSink", "layout",
           "rank_log_dir"]

PREFIX = "gradwatch/"
PLUGIN_NAME = "gradwatch"  # the plugin_name of gradwatch's own tensors (read by tb_plugin/)
RATIOS_JSON_TAG = f"{PREFIX}update_ratios_json"
KINDS: tuple[str, ...] = tuple(k.value for k in EventKind)
ANOMALY_KINDS: tuple[str, ...] = tuple(k.value for k in EventKind if SEVERITY[k] != "info")
_COUNT_TAGS = {k: f"{PREFIX}count/{k}" for k in KINDS}


def rank_log_dir(log_dir: str, rank: int, world: int) -> str:
    """Where rank ``rank`` writes its own TensorBoard run (``<log_dir>/rank{R}`` for R > 0)."""
    return log_dir if rank == 0 or world <= 1 else os.path.join(log_dir, f"rank{rank}")


def layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one "gradwatch" category."""
    return {
        "gradwatch": {
            "anomalies per step": [
                "Multiline", [f"{PREFIX}anomalies", *(_COUNT_TAGS[k] for k in ANOMALY_KINDS)],
            ],
            "events per step": [
                "Multiline", [_COUNT_TAGS[k] for k in KINDS if k not in ANOMALY_KINDS],
            ],
            "update/weight ratio": [
                "Multiline", [f"{PREFIX}update_ratio/{s}" for s in ("max", "median", "min")],
            ],
            "gradwatch overhead (ms per step)": ["Multiline", [f"{PREFIX}overhead_ms"]],
        }
    }


def step_markdown(step: int, entries: list[str]) -> str:
    """The ``gradwatch/anomaly`` document of one step: every finding first seen at the step."""
    if len(entries) == 1:
        return entries[0]
    head = f"### {len(entries)} findings first seen at step {step}"
    parts = [head]
    for i, md in enumerate(entries, 1):
        parts += ["", "---", "", f"**{i}/{len(entries)}** · {md}"]
    return "\n".join(parts)


def anomaly_markdown(event: Event) -> str:
    """The text written under ``gradwatch/anomaly`` for the first occurrence of a finding (its
    first event: further tensors of the finding are in ``gradwatch/summary_json``)."""
    loc = event.location
    where = f"{loc.filename}:{loc.lineno}" if loc else "unknown location"
    lines = [
        f"**{event.kind.value}** ({event.severity}) on `{event.tensor}` at `{where}`",
        "",
    ]
    if loc is not None and loc.code:
        lines += [f"    {loc.code}", ""]
    lines.append(event.message)
    if event.hint:
        lines += ["", f"*hint:* {event.hint}"]
    details = [f"op `{event.op}`", f"step {event.step}", f"rank {event.rank}",
               f"grad mode {event.grad_mode}"]
    if event.shape is not None:
        details.append(f"shape {list(event.shape)} {event.dtype or ''}".rstrip())
    if event.version_before is not None:
        details.append(f"version {event.version_before} → {event.version_after}")
    lines += ["", ", ".join(details)]
    return "\n".join(lines)


class TensorBoardSink(Sink):
    """Write gradwatch's events to TensorBoard, aggregated per step.

    Args:
        writer: an open ``SummaryWriter`` to write into (rank 0); it is flushed, never closed.
        log_dir: where to create our own ``SummaryWriter`` when ``writer`` is None; ranks R > 0
            (with ``world > 1``) always write their own run under ``<log_dir>/rank{R}`` (or under
            the given writer's directory).
        rank, world: distributed rank and world size.
        every_n_steps: write step scalars on steps divisible by this (Lightning:
            ``trainer.log_every_n_steps``); counts in between are summed, never dropped.
        per_parameter_scalars: also write one scalar per parameter
            (``gradwatch/param_update_ratio/<name>``) on statistics steps. Off by default: a
            large model would flood Time Series; the per-parameter ratios are always written
            as one JSON tensor per statistics step (``gradwatch/update_ratios_json``), which the
            GradWatch tab reads.
    """

    def __init__(
        self,
        writer: Any = None,
        log_dir: str | os.PathLike[str] | None = None,
        rank: int = 0,
        world: int = 1,
        every_n_steps: int = 1,
        per_parameter_scalars: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.rank = rank
        self.world = world
        self.every_n_steps = every_n_steps
        self.per_parameter_scalars = bool(per_parameter_scalars)
        self._given = writer
        self._log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._writer: Any = None  # created on first use (never raises in __init__)
        self._owned = False
        self._closed = False
        self._layout_written = False
        # per-window aggregation
        self._counts: dict[str, int] = {}
        self._overhead_s = 0.0
        self._steps = 0
        self._ratios: tuple[int, dict[str, float]] | None = None
        self._last_step = 0
        # the findings seen by this sink (one per kind and culprit line; records.findings)
        self._findings = Findings()
        self._summary_dirty = True
        self._new_findings = False  # a finding appeared since the summary was last written
        # the markdown document of the latest step with new findings (``gradwatch/anomaly``)
        self._md_step: int | None = None
        self._md_entries: list[str] = []
        self._md_dirty = False
        # parameters whose first measured ratio was exactly 1: zero before the update (a
        # zero-initialised bias), measured against their value after it (records.raw)
        self._seen_params: set[str] = set()
        self._zero_init: set[str] = set()

    # ------------------------------------------------------------------ the writer
    @property
    def log_dir(self) -> str | None:
        """The directory of the run this sink writes (None if it writes nowhere)."""
        w = self._writer
        if w is not None:
            return _logdir_of(w)
        if self._uses_own_writer():
            base = self._base_dir()
            return rank_log_dir(base, self.rank, self.world) if base is not None else None
        return _logdir_of(self._given)

    def _uses_own_writer(self) -> bool:
        return self._given is None or (self.rank > 0 and self.world > 1)

    def _base_dir(self) -> str | None:
        if self._log_dir is not None:
            return self._log_dir
        return _logdir_of(self._given) if self._given is not None else None

    def _get_writer(self) -> Any:
        if self._writer is not None:
            return self._writer
        if self._closed:
            return None
        if not self._uses_own_writer():
            self._writer = self._given
        else:
            base = self._base_dir()
            if base is None:
                return None
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=rank_log_dir(base, self.rank, self.world))
            self._owned = True
        if not self._layout_written:
            self._layout_written = True
            self._writer.add_custom_scalars(layout())
        return self._writer

    # ------------------------------------------------------------------ Sink protocol
    def anomaly(self, event: Event) -> None:
        _, new = self._findings.add(event)
        self._summary_dirty = True
        if not new:
            return
        self._new_findings = True
        w = self._get_writer()
        if w is None:
            return
        step = event.step if isinstance(event.step, int) else self._last_step
        if self._md_step is None or step > self._md_step:
            self._write_markdown(w)
            self._md_step, self._md_entries = step, []
        self._md_entries.append(anomaly_markdown(event))
        self._md_dirty = True
        w.add_text(f"{PREFIX}anomaly_json",
                   json.dumps(event.to_dict(), ensure_ascii=False, default=str), event.step)
        w.flush()  # an anomaly often precedes a crash: make it durable now

    def step(self, summary: StepSummary) -> None:
        if not any(summary.counts.values()) and not summary.update_ratios:
            # no event at all, so no optimizer step either (e.g. the summary at close)
            return
        counts = self._counts
        for kind, n in summary.counts.items():
            counts[kind] = counts.get(kind, 0) + n
        self._overhead_s += summary.overhead_s
        self._steps += 1
        if summary.update_ratios:
            self._ratios = (summary.step, dict(summary.update_ratios))
        self._last_step = summary.step
        if summary.step % self.every_n_steps == 0 or any(
                summary.counts.get(k) for k in ANOMALY_KINDS):
            # a step with an anomaly ends the window: its counts sit at the anomaly's own step,
            # the step its finding names (the tab's timeline and table agree)
            self._write_window(summary.step)
        if self._md_dirty or self._new_findings:
            w = self._get_writer()
            if w is not None:
                self._write_markdown(w)
                if self._new_findings:  # the tab reads every finding of a live run from it
                    self._write_summary(w)

    def flush(self) -> None:
        if self._pending_data():
            self._write_window(self._last_step)
        w = self._get_writer() if (self._writer is not None or self._summary_dirty) else None
        if w is None:
            return
        self._write_markdown(w)
        if self._summary_dirty:
            self._write_summary(w)
        w.flush()

    def close(self) -> None:
        if self._closed and self._writer is None:
            return
        try:
            if not self._closed:
                self.flush()
        finally:  # (closed again after an interrupt: its writer still closes)
            self._closed = True
            w = self._writer
            if w is not None and self._owned:
                w.close()
            self._writer = self._given = None

    # ------------------------------------------------------------------ internals
    def _pending_data(self) -> bool:
        return any(self._counts.values()) or self._ratios is not None

    def _reset_window(self) -> None:
        self._counts = {}
        self._overhead_s = 0.0
        self._steps = 0

    def _write_window(self, step: int) -> None:
        w = self._get_writer()
        counts, steps, overhead = self._counts, self._steps, self._overhead_s
        ratios, self._ratios = self._ratios, None
        self._reset_window()
        if w is None:
            return
        values: dict[str, float] = {tag: float(counts.get(k, 0)) for k, tag in _COUNT_TAGS.items()}
        values[f"{PREFIX}anomalies"] = float(sum(counts.get(k, 0) for k in ANOMALY_KINDS))
        values[f"{PREFIX}overhead_ms"] = 1000.0 * overhead / max(steps, 1)
        _add_scalars(w, values, step)
        if ratios is not None:
            self._write_ratios(w, *ratios)

    def _write_markdown(self, w: Any) -> None:
        if not self._md_dirty or self._md_step is None:
            return
        self._md_dirty = False
        w.add_text(f"{PREFIX}anomaly", step_markdown(self._md_step, self._md_entries),
                   self._md_step)

    def _write_ratios(self, w: Any, step: int, ratios: dict[str, float]) -> None:
        finite = [v for v in ratios.values() if v == v and abs(v) != float("inf")]
        for name, v in ratios.items():
            if name not in self._seen_params:
                self._seen_params.add(name)
                if v == 1.0:  # ‖Δ‖ = ‖w after‖: w was exactly zero before (records.raw)
                    self._zero_init.add(name)
        values: dict[str, float] = {}
        if finite:
            values[f"{PREFIX}update_ratio/max"] = max(finite)
            values[f"{PREFIX}update_ratio/median"] = statistics.median(finite)
            values[f"{PREFIX}update_ratio/min"] = min(finite)
        if self.per_parameter_scalars:
            for name, v in ratios.items():
                values[f"{PREFIX}param_update_ratio/{name}"] = float(v)
        _add_scalars(w, values, step)
        doc = {
            "ratios": {n: (float(v) if math.isfinite(v) else None) for n, v in ratios.items()},
            "zero_init": sorted(n for n in self._zero_init if n in ratios),
        }
        _add_json_tensor(w, RATIOS_JSON_TAG, json.dumps(doc, ensure_ascii=False), step)
        if finite:
            import numpy as np

            w.add_histogram(f"{PREFIX}update_ratios", np.asarray(finite, dtype=np.float64), step)

    def _write_summary(self, w: Any) -> None:
        self._summary_dirty = False
        self._new_findings = False
        rows = [{**row, "event": row["event"].to_dict()} for row in self._findings.rows()]
        w.add_text(f"{PREFIX}summary_json", json.dumps(rows, ensure_ascii=False, default=str),
                   self._last_step)


def _logdir_of(writer: Any) -> str | None:
    get = getattr(writer, "get_logdir", None)
    if get is None:
        return None
    try:
        d = get()
    except Exception:
        return None
    return os.fspath(d) if isinstance(d, (str, os.PathLike)) else None


def _add_scalars(w: Any, values: dict[str, float], step: int) -> None:
    """Write several scalars as one event (one summary with many values) into a torch
    ``SummaryWriter``; other writers (tensorboardX) get one ``add_scalar`` each."""
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(w, SummaryWriter):
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        w._get_file_writer().add_summary(summary, step)
        return
    for tag, v in values.items():
        w.add_scalar(tag, v, step)


def _add_json_tensor(w: Any, tag: str, text: str, step: int) -> None:
    """A string tensor of gradwatch's own plugin (Time Series and Text do not show it) into a
    torch ``SummaryWriter``; other writers get it as text (``<tag>/text_summary``)."""
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(w, SummaryWriter):
        from tensorboard.compat.proto.summary_pb2 import (
            DATA_CLASS_TENSOR,
            Summary,
            SummaryMetadata,
        )
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME),
            data_class=DATA_CLASS_TENSOR)
        tensor = TensorProto(dtype=DT_STRING, string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto())
        summary = Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])
        w._get_file_writer().add_summary(summary, step)
        return
    w.add_text(tag, text, step)
