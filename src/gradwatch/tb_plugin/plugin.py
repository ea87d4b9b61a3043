"""``GradWatchPlugin``: serves the GradWatch tab and its data routes.

Routes, under ``/data/plugin/gradwatch/``:

- ``index.js``: the tab (a hand-written ES module exporting ``render()``; no build step)
- ``runs``: runs that hold gradwatch data, each with its rank
- ``anomalies[?run=R]``: the findings of every run (or one; one per rank, kind and culprit
  line), worst first, each with ``run``, ``rank``, ``kind``, ``severity``, ``tensor`` (the
  tensors it touched, compressed: ``layers.0..5.* (72 tensors)``), ``tensors`` (their names),
  ``tensor_count``, ``where`` (``file:line``), ``code``, ``count`` (anomaly events),
  ``first_step``, ``last_step``, ``hint`` and the full first ``event``
- ``timeline[?run=R]``: anomalies per step, kind and run
- ``update_ratios[?run=R]``: per-parameter update/weight ratios over steps, each flagged
  ``ok``, ``stalled`` (stopped training), ``exploding`` or ``nonfinite``

Data is read only through ``context.data_provider``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from tensorboard import context as tb_context
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .data import GradWatchData, run_rank

__all__ = ["PLUGIN_NAME", "GradWatchPlugin"]

PLUGIN_NAME = "gradwatch"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
_log = logging.getLogger(__name__)


class GradWatchPlugin(base_plugin.TBPlugin):
    """The GradWatch dashboard: anomalies by step and kind, the culprit lines, and which layers
    stopped training or blow up."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider
        self._active = False

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        return {
            "/index.js": self._serve_static,
            "/runs": self._serve_runs,
            "/anomalies": self._serve_anomalies,
            "/timeline": self._serve_timeline,
            "/update_ratios": self._serve_update_ratios,
        }

    def is_active(self) -> bool:
        """True once any run holds a ``gradwatch/`` tag (then it stays True: data only grows)."""
        if self._active or self._data_provider is None:
            return self._active
        try:
            self._active = GradWatchData(
                self._data_provider, tb_context.RequestContext(), ""
            ).has_data()
        except Exception:  # a listing error must not break TensorBoard's plugin listing
            _log.debug("gradwatch: is_active failed", exc_info=True)
            return False
        return self._active

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="GradWatch")

    # ------------------------------------------------------------------ routes
    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name = os.path.basename(request.path)
        path = os.path.join(_STATIC, name)
        ctype = _STATIC_TYPES.get(os.path.splitext(name)[1])
        if ctype is None or not os.path.isfile(path):
            return http_util.Respond(request, "not found", "text/plain", code=404)
        with open(path, encoding="utf-8") as f:
            return http_util.Respond(request, f.read(), ctype)

    def _data(self, request: wrappers.Request) -> GradWatchData:
        return GradWatchData(
            self._data_provider,
            plugin_util.context(request.environ),
            plugin_util.experiment_id(request.environ),
        )

    def _json(self, request: wrappers.Request, fn: Callable[[GradWatchData, str | None], Any]
              ) -> wrappers.Response:
        run = request.args.get("run") or None
        try:
            body = fn(self._data(request), run)
        except Exception as exc:
            _log.warning("gradwatch: %s failed", request.path, exc_info=True)
            return http_util.Respond(
                request, {"error": f"{type(exc).__name__}: {exc}"}, "application/json", code=500
            )
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        return self._json(
            request, lambda d, _run: [{"run": r, "rank": run_rank(r)} for r in d.runs()]
        )

    @wrappers.Request.application
    def _serve_anomalies(self, request: wrappers.Request) -> wrappers.Response:
        return self._json(request, lambda d, run: d.anomalies(run))

    @wrappers.Request.application
    def _serve_timeline(self, request: wrappers.Request) -> wrappers.Response:
        return self._json(request, lambda d, run: d.timeline(run))

    @wrappers.Request.application
    def _serve_update_ratios(self, request: wrappers.Request) -> wrappers.Response:
        return self._json(request, lambda d, run: d.update_ratios(run))
