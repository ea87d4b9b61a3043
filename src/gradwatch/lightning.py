r"""Lightning integration: watch a ``Trainer.fit`` for silent gradient corruption.

Example usage::

    from gradwatch.lightning import GradWatchCallback

    trainer = Trainer(callbacks=[GradWatchCallback()])     # same options as gradwatch.watch()
    trainer.fit(model)
    print(trainer.callbacks[0].report())                   # or read the TensorBoard tab

Works with the ``lightning.pytorch`` and the ``pytorch_lightning`` Trainer (either accepts the
other's callbacks). The watch covers ``fit`` only (training, and the validation that runs inside
it), from ``on_fit_start`` to ``on_train_end`` (or ``on_exception``; ``on_fit_end`` and
``teardown`` close it too, if it is still open).

Where it writes:
    - TensorBoard: with a ``TensorBoardLogger`` into its ``experiment`` (rank 0), otherwise into a
      ``SummaryWriter`` of its own in ``trainer.log_dir`` (``<default_root_dir>/gradwatch``
      without a logger); every rank R > 0 writes its own run under ``<log_dir>/rank{R}``.
      Step scalars follow ``trainer.log_every_n_steps``; anomalies are written (and flushed) at
      once.
    - ``gradwatch.jsonl`` (``gradwatch.rank{R}.jsonl`` with several processes) in the same
      directory; ``log_dir=`` overrides the directory, ``writer=`` the rank-0 SummaryWriter.

Known limitations:
    - ``strategy="ddp_spawn"``: the watch runs in the worker processes; the callback object in
      the launching process does not see its results (read them from ``log_dir``).
    - Only ``fit`` is watched, not ``validate``/``test``/``predict``.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .api import Watch, active_watch, shared_watch_running
from .config import Config
from .errors import GradWatchWarning
from .events import Event
from .records.findings import Findings
from .report import format_report
from .sinks.jsonl import JsonlSink, jsonl_name
from .sinks.tensorboard import TensorBoardSink

if TYPE_CHECKING:
    from .sinks import Sink

__all__ = ["GradWatchCallback"]


def _import_lightning() -> tuple[Any, Any, Any, Any]:
    """Callback base and utilities: ``lightning.pytorch`` if installed, else ``pytorch_lightning``
    (the one already imported wins, so that using one never imports the other)."""
    order = ["lightning.pytorch", "pytorch_lightning"]
    if "pytorch_lightning" in sys.modules and "lightning.pytorch" not in sys.modules:
        order.reverse()
    for name in order:
        try:
            callback = __import__(f"{name}.callbacks", fromlist=["Callback"]).Callback
            exceptions = __import__(f"{name}.utilities.exceptions", fromlist=["x"])
            rank_zero = __import__(f"{name}.utilities.rank_zero", fromlist=["x"])
        except ImportError:
            continue
        return (callback, exceptions.MisconfigurationException, rank_zero.rank_zero_info,
                rank_zero.rank_zero_warn)
    raise ImportError(
        "gradwatch.lightning needs Lightning: pip install 'gradwatch[lightning]' "
        "(pytorch-lightning) or pip install lightning"
    )


Callback, MisconfigurationException, rank_zero_info, rank_zero_warn = _import_lightning()


class GradWatchCallback(Callback):  # type: ignore[misc, valid-type]
    r"""Run :func:`gradwatch.watch` around ``Trainer.fit``.

    Args: the options of :func:`gradwatch.watch` (``log_dir``, ``writer``, ``on_anomaly``,
    ``level``, ``max_events``, ``stats_every``, ``change_stats``, ``check_nonfinite``,
    ``per_parameter_scalars``). The model
    and optimizers are the trainer's; the step is ``trainer.global_step``.

    After ``fit``: :attr:`anomalies`, :attr:`events`, :attr:`counts`, :meth:`report` and
    :meth:`distinct_anomalies` (``counts``, ``report`` and ``distinct_anomalies`` include what
    was restored from a checkpoint); :attr:`watch` is the :class:`gradwatch.Watch` of the last fit.

    Raises:
        MisconfigurationException: in ``setup``, for two GradWatchCallbacks in one Trainer, a
            ``gradwatch.watch()`` already active around ``fit``, or an unusable
            ``log_dir``/``writer``.
    """

    def __init__(
        self,
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
    ) -> None:
        self._options: dict[str, Any] = {
            "on_anomaly": on_anomaly, "level": level, "max_events": max_events,
            "stats_every": stats_every, "change_stats": change_stats,
            "check_nonfinite": check_nonfinite, "per_parameter_scalars": per_parameter_scalars,
        }
        Config(**self._options).validate()  # wrong values fail here, at construction
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.writer = writer
        self.watch: Watch | None = None
        self.output_dir: str | None = None  # where gradwatch.jsonl (and our own run) go
        self._tb_writer: Any = None  # rank 0's writer to use (None: our own)
        self._restored_counts: dict[str, int] = {}
        self._restored: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ results
    @property
    def anomalies(self) -> list[Event]:
        """Anomalies of the last fit, in the order seen."""
        return self.watch.anomalies if self.watch is not None else []

    @property
    def events(self) -> list[Event]:
        """The most recent events of the last fit."""
        return self.watch.events if self.watch is not None else []

    @property
    def counts(self) -> dict[str, int]:
        """Exact totals per kind, including those restored from a checkpoint."""
        counts = dict(self._restored_counts)
        if self.watch is not None:
            for kind, n in self.watch.counts.items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def distinct_anomalies(self) -> list[dict[str, Any]]:
        """The findings (one per kind and culprit line, with the tensors it touched), restored
        ones merged with this fit's."""
        findings = Findings()
        for d in self._restored:
            findings.merge_event(d["event"], d)
        for d in self.watch.distinct_anomalies() if self.watch is not None else []:
            findings.merge_event(d["event"], d)
        return findings.rows()

    def report(self) -> str:
        """Human summary: one line per finding, then counts per kind."""
        return format_report(self.distinct_anomalies(), self.counts)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "distinct": [{**d, "event": d["event"].to_dict()} for d in self.distinct_anomalies()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_counts = {str(k): int(v) for k, v in state_dict.get("counts", {}).items()}
        self._restored = [  # (a checkpoint written before findings has no "tensors")
            {**d, "event": Event.from_dict(d["event"]), "count": int(d["count"]),
             "first_step": int(d["first_step"]), "last_step": int(d["last_step"])}
            for d in state_dict.get("distinct", [])
        ]
        self.watch = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        mine = [cb for cb in trainer.callbacks if isinstance(cb, GradWatchCallback)]
        if len(mine) > 1:
            raise _misconfigured(
                trainer,
                f"Trainer has {len(mine)} GradWatchCallback instances; gradwatch watches one "
                "training loop at a time. Pass a single GradWatchCallback(...) in callbacks=[...]."
            )
        active = active_watch()
        if active is not None and not getattr(active, "shared", False):
            raise _misconfigured(
                trainer,
                "a gradwatch.watch() is already active around trainer.fit(); it and "
                "GradWatchCallback would watch the same loop twice. Remove the `with "
                "gradwatch.watch(...)` block (the callback has the same options) or the callback."
            )
        if self.writer is not None:
            try:
                Config(writer=self.writer).validate()
            except (TypeError, ValueError) as exc:
                raise _misconfigured(
                    trainer,
                    f"GradWatchCallback(writer=...): {exc}. Pass an open "
                    "torch.utils.tensorboard.SummaryWriter, or leave writer=None to use the "
                    "trainer's TensorBoardLogger (or a writer of our own in trainer.log_dir)."
                ) from None
        # trainer.log_dir is a collective call (a broadcast): every rank runs setup, so do it here
        trainer_dir = trainer.log_dir if self.log_dir is None else None
        tb_logger = next((lg for lg in trainer.loggers if _is_tensorboard_logger(lg)), None)
        if self.log_dir is not None:
            out = self.log_dir
        elif trainer.loggers:
            out = trainer_dir
        else:
            out = os.path.join(trainer.default_root_dir, "gradwatch")
        if out is None:
            raise _misconfigured(
                trainer,
                "GradWatchCallback could not find a log directory (the logger has none); pass "
                "GradWatchCallback(log_dir=...)."
            )
        out = os.fspath(out)
        try:
            Config(log_dir=out).validate()
        except (TypeError, ValueError) as exc:
            raise _misconfigured(
                trainer,
                f"GradWatchCallback: {exc}. Pass GradWatchCallback(log_dir=...) with a writable "
                "directory, or fix the trainer's logger/default_root_dir."
            ) from None
        self.output_dir = out
        self._tb_writer = None
        if trainer.global_rank == 0:
            if self.writer is not None:
                self._tb_writer = self.writer
            elif tb_logger is not None and self.log_dir is None:
                self._tb_writer = tb_logger.experiment
        launcher = getattr(trainer.strategy, "launcher", None)
        if type(launcher).__name__ == "_MultiProcessingLauncher":
            rank_zero_warn(
                "GradWatchCallback with a spawning strategy (ddp_spawn, ddp_notebook): the watch "
                "runs in the worker processes, so this callback object will not show their "
                f"anomalies; read them from {out} (gradwatch report), or use strategy='ddp'."
            )
        where = jsonl_name(0, trainer.world_size)
        if shared_watch_running():
            rank_zero_info("GradWatchCallback: joining the watch of `gradwatch run` (its log "
                           "directory and options apply)")
        elif self._tb_writer is None:
            rank_zero_info(
                f"GradWatchCallback: writing TensorBoard event files and {where} to {out}"
                + (" (rank R > 0 under rank{R}/)" if trainer.world_size > 1 else "")
            )
        else:
            rank_zero_info(f"GradWatchCallback: writing to the TensorBoard logger and {where} in {out}")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is not None and not self.watch.closed:
            self.watch.close()  # a previous fit's, still open
        if self.output_dir is None:  # setup() not run for fit (should not happen)
            self.setup(trainer, pl_module, "fit")
        rank, world = trainer.global_rank, trainer.world_size
        sinks: list[Sink] = []
        if not shared_watch_running():  # (a joining watch writes nothing of its own)
            try:
                sinks.append(JsonlSink(self.output_dir, rank=rank, world=world))  # type: ignore[arg-type]
            except OSError as exc:
                warnings.warn(f"gradwatch: cannot write {jsonl_name(rank, world)} in "
                              f"{self.output_dir} ({exc}); continuing without it",
                              GradWatchWarning, stacklevel=2)
            sinks.append(TensorBoardSink(
                writer=self._tb_writer, log_dir=self.output_dir, rank=rank, world=world,
                every_n_steps=max(1, int(trainer.log_every_n_steps or 1)),
                per_parameter_scalars=self._options["per_parameter_scalars"],
            ))
        # the trainer's optimizers name parameters; wrappers that are no torch Optimizer
        # (some strategies') are left out: global optimizer hooks still see every step
        optimizers = [o for o in trainer.optimizers if isinstance(o, torch.optim.Optimizer)]
        ref = weakref.ref(trainer)
        try:
            w = Watch(Config.build(trainer.lightning_module, optimizers, **self._options),
                      sinks=sinks, step_source=lambda: ref().global_step)  # type: ignore[union-attr]
            w.__enter__()
        except Exception as exc:
            for sink in sinks:
                try:
                    sink.close()
                except Exception:
                    pass
            warnings.warn(f"gradwatch: the watch could not start ({type(exc).__name__}: {exc}); "
                          "training continues unwatched", GradWatchWarning, stacklevel=2)
            return
        self.watch = w

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # training (and the validation inside it) is over: stop before Lightning's own teardown
        # moves the model around (``param.data = ...``), which is not the user's training
        self._close()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # only this hook runs on an exception (no on_fit_end, no teardown): flush everything now
        self._close()

    def _close(self) -> None:
        self._tb_writer = None  # the logger's; not ours to keep
        w = self.watch
        if w is not None and not w.closed:
            w.close()


def _misconfigured(trainer: Any, message: str) -> Exception:
    """``MisconfigurationException`` of the trainer's own package (the two packages' classes
    differ; users catch the one of the Trainer they use)."""
    package = "pytorch_lightning" if type(trainer).__module__.startswith("pytorch_lightning") else (
        "lightning.pytorch")
    module = sys.modules.get(f"{package}.utilities.exceptions")
    cls = getattr(module, "MisconfigurationException", MisconfigurationException)
    return cls(message)


def _is_tensorboard_logger(logger: Any) -> bool:
    """A ``TensorBoardLogger`` of either Lightning package (or a subclass)."""
    return any(
        c.__name__ == "TensorBoardLogger" and c.__module__.endswith("loggers.tensorboard")
        for c in type(logger).__mro__
    )

