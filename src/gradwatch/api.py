"""``gradwatch.watch()`` and :class:`Watch`: the public facade over one watch's runtime."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._assembly import Runtime
from ._context import RunContext
from ._failopen import warn_internal
from ._intercept.installed import Installed
from ._location import call_arg_names, caller
from .config import Config
from .errors import AnomalyError, GradWatchWarning
from .events import Event
from .records.emit import Emitter
from .sinks import Sink

__all__ = ["Watch", "active_watch", "shared_watch_running", "watch"]

_active_lock = threading.Lock()
_active: Watch | None = None
_UNWATCHED = "this watch watches nothing"


def active_watch() -> Watch | None:
    """The watch running in this process, if any."""
    return _active


def shared_watch_running() -> bool:
    """Whether a shared watch (``gradwatch run``) is running: a new watch joins it."""
    with _active_lock:
        return _active is not None and _active.shared and not _active.closed


def watch(
    model: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    writer: Any = None,
    on_anomaly: str = "warn",
    level: str = "full",
    max_events: int = 10_000,
    stats_every: int = 10,
    change_stats: bool = True,
    check_nonfinite: bool = True,
    per_parameter_scalars: bool = False,
) -> Watch:
    """Watch a training loop for silent gradient corruption.

    Example usage::

        with gradwatch.watch(model, optimizer, log_dir="runs/exp1") as w:
            for x, y in loader:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        print(w.report())

    Args:
        model: module(s) used to name tensors; optional (modules are discovered when they run).
        optimizer: optimizer(s) to name parameters by; optional (every optimizer is seen).
        log_dir: write ``gradwatch.jsonl`` and TensorBoard event files there.
        writer: write TensorBoard data to this ``SummaryWriter`` instead of one of our own.
        on_anomaly: ``"warn"`` (once per distinct anomaly), ``"raise"`` (:class:`AnomalyError`
            at the culprit line) or ``"log"`` (record only).
        level: ``"full"`` (every diagnosis at mutation time) or ``"light"`` (interception only
            while grad mode is off; diagnoses completed from hooks and torch's own errors).
        max_events: bound of the in-memory event buffer (``counts`` stay exact).
        stats_every: compute data-change and update/weight statistics every N optimizer steps.
        change_stats: compute ``Event.change`` for in-place edits (on statistics steps).
        check_nonfinite: look for NaN/Inf written under no_grad (batched, no per-op sync).
        per_parameter_scalars: also write one TensorBoard scalar per parameter
            (``gradwatch/param_update_ratio/<name>``) on statistics steps.
    """
    try:
        cfg = Config.build(
            model,
            optimizer,
            log_dir=log_dir,
            writer=writer,
            on_anomaly=on_anomaly,  # type: ignore[arg-type]
            level=level,  # type: ignore[arg-type]
            max_events=max_events,
            stats_every=stats_every,
            change_stats=change_stats,
            check_nonfinite=check_nonfinite,
            per_parameter_scalars=per_parameter_scalars,
        )
    except (TypeError, ValueError):  # the arguments' validation: the user's error
        raise
    except Exception as exc:  # an internal error: this watch watches nothing
        warn_internal("setup", exc, consequence=_UNWATCHED)
        return Watch(Config(), unwatched=True)
    try:
        if len(cfg.models) > 1:
            names = call_arg_names(caller(), "watch")
            if len(names) != len(cfg.models):
                names = []
            cfg.model_names = [n or f"model{i}"
                               for i, n in enumerate(names or [None] * len(cfg.models))]
    except Exception:  # (the names are a nicety: the models stay model0, model1, ...)
        cfg.model_names = []
    try:
        return Watch(cfg)
    except Exception as exc:  # (Watch() fails open itself; this is an error at its very entry)
        warn_internal("setup", exc, consequence=_UNWATCHED)
        return Watch(cfg, unwatched=True)


class Watch:
    """A running watch. Use :func:`watch` to create one; use it as a context manager.

    ``step_source``: where the step number comes from (Lightning: the trainer's global step).
    ``shared``: another ``watch()`` entered while this one runs joins it instead of being
    refused (``gradwatch run``, whose script may start its own watch or Lightning callback).
    """

    def __init__(self, config: Config, *, sinks: Iterable[Sink] = (),
                 step_source: Callable[[], int] | None = None, shared: bool = False,
                 unwatched: bool = False) -> None:
        self.config = config
        self.shared = shared
        self._joined: Watch | None = None  # the shared watch this one joined
        self._entered = False
        self._closed = False
        sinks = list(sinks)
        self._runtime: Runtime | _Unwatched
        if unwatched:
            self._runtime = _Unwatched(config, sinks)
            return
        try:
            self._runtime = Runtime(config, sinks)
            self._runtime.ctx.step_source = step_source
        except Exception as exc:  # an internal error while building the parts: fail open
            warn_internal("setup", exc, consequence=_UNWATCHED)
            self._runtime = _Unwatched(config, sinks)

    # -- reading ------------------------------------------------------------------------------
    def _rt(self) -> Runtime:
        return self._joined._runtime if self._joined is not None else self._runtime

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def rank(self) -> int:
        """This process's distributed rank (0 when not distributed)."""
        return self._rt().ctx.rank

    @property
    def world(self) -> int:
        """The distributed world size (1 when not distributed)."""
        return self._rt().ctx.world

    @property
    def step(self) -> int:
        """Optimizer steps completed (Lightning: ``trainer.global_step``)."""
        return self._rt().ctx.step()

    @property
    def anomalies(self) -> list[Event]:
        """Anomalies (severity warning or error) in the order seen (bounded like ``events``)."""
        return list(self._rt().emit.anomalies)

    @property
    def events(self) -> list[Event]:
        """The most recent events (bounded by ``max_events``), anomalies included."""
        rt = self._rt()
        return rt.emit.events(rt.ctx.config.max_events)

    @property
    def counts(self) -> dict[str, int]:
        """Exact number of events per kind, also past the buffer's bound."""
        return dict(self._rt().emit.buffer.counts)

    def report(self) -> str:
        """A human summary: one line per finding (kind, tensors, file:line, count, steps)."""
        from .report import format_report

        self._rt().emit.take()
        return format_report(self.distinct_anomalies(), self.counts)

    def distinct_anomalies(self) -> list[dict[str, Any]]:
        """The findings (one per kind and culprit line): each its first ``event``, ``count``,
        ``first_step``, ``last_step`` and ``tensors`` (names, in order; ``tensor_count``)."""
        return self._rt().emit.distinct()

    def add_sink(self, sink: Sink) -> None:
        """Send events to ``sink`` too (before the watch is entered)."""
        self._runtime.emit.sinks.append(sink)

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        global _active
        if self._entered or self._closed:
            raise RuntimeError("this Watch was already used; call gradwatch.watch(...) again for a new one")
        with _active_lock:
            if _active is not None and _active.shared and not _active.closed:
                # e.g. the script run by `gradwatch run` starts its own watch(): share that one
                self._joined = _active
                self._entered = True
                _active._runtime.adopt(self.config)
                warnings.warn(
                    "gradwatch: a shared watch is already running (gradwatch run); this watch() "
                    "joins it and its options are ignored",
                    GradWatchWarning,
                    stacklevel=2,
                )
                return self
            if _active is not None:
                raise RuntimeError(
                    "gradwatch.watch() is already active in this process; nested watches are not "
                    "supported (use one watch around the whole loop)"
                )
            _active = self
        try:
            self._entered = True
            self._runtime.install()
        except BaseException as exc:  # nothing stays installed; an internal error fails open
            try:
                self._runtime.ctx.closed = True  # (nothing to flush)
                self._runtime.close()  # (idempotent: runs again if an interrupt cuts it short)
            except BaseException:
                self._runtime.close()
            finally:
                with _active_lock:
                    if _active is self:
                        _active = None
            if not isinstance(exc, Exception):
                raise
            warn_internal("setup", exc, consequence=_UNWATCHED)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc is not None and not self._closed:
                self._runtime.explain_error(exc)
            self.close()
        except AnomalyError:  # recorded; the user's exception is the one that propagates
            if exc is None:
                raise
        except BaseException as err:  # an interrupt (a second Ctrl-C) or an error at close()'s
            self._closed = True  # very entry: what it cut short runs again (each step is
            _close(self)  # idempotent)
            if not isinstance(err, Exception):
                raise
            warn_internal("close", err, consequence="the watch is closed")

    def close(self) -> None:
        """Flush everything and remove all hooks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _close(self)


def _close(w: Watch) -> None:
    """Close ``w``'s runtime (or, joined, its own sinks) and make it inactive; safe to run again
    after an interrupt cut it short. Internal errors are warned, never raised."""
    global _active
    rt = w._runtime
    # joined a shared watch: that one owns everything; its own sinks (given for a watch of its
    # own, never written) are closed
    close = rt._close_sinks if w._joined is not None else rt.close
    try:
        try:
            close()
        except AnomalyError:
            raise
        except Exception as exc:  # (an error at the very entry of a step: run it again)
            warn_internal("close", exc, consequence="the watch is closed")
            try:
                close()
            except Exception:
                pass
    finally:  # a second interrupt while closing cannot skip it
        with _active_lock:
            if _active is w:
                _active = None


class _Unwatched:
    """The runtime of a watch whose setup failed: it installs nothing and reads as empty (no
    step, no event); sinks given to it are closed with it."""

    def __init__(self, config: Config, sinks: list[Sink]) -> None:
        self.ctx = RunContext(config)
        self.ctx.closed = True
        self.emit = Emitter(config.max_events, config.on_anomaly, sinks)
        self.installed = Installed()

    def install(self) -> None:
        pass

    def adopt(self, config: Config) -> None:
        config.models, config.optimizers = [], []

    def explain_error(self, exc: BaseException) -> None:
        pass

    def uninstall(self) -> None:
        pass

    def close(self) -> None:
        self._close_sinks()

    def _close_sinks(self) -> None:
        try:
            self.emit.close_sinks()
        except Exception as exc:
            warn_internal("close", exc, consequence="the watch is closed")
