"""Options shared by ``watch()`` and the Lightning callback, validated once at entry."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["Config"]

OnAnomaly = Literal["warn", "raise", "log"]
Level = Literal["full", "light"]
_ON_ANOMALY = ("warn", "raise", "log")
_LEVELS = ("full", "light")


@dataclass
class Config:
    """Validated watch options. See :func:`gradwatch.watch` for their meaning."""

    models: list[torch.nn.Module] = field(default_factory=list)
    model_names: list[str] = field(default_factory=list)  # prefixes when several models are given
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    log_dir: str | None = None
    writer: Any = None
    on_anomaly: OnAnomaly = "warn"
    level: Level = "full"
    max_events: int = 10_000
    stats_every: int = 10
    change_stats: bool = True
    check_nonfinite: bool = True
    per_parameter_scalars: bool = False  # TensorBoard: one update-ratio scalar per parameter

    @classmethod
    def build(
        cls,
        model: Any = None,
        optimizer: Any = None,
        **options: Any,
    ) -> Config:
        cfg = cls(
            models=_as_list(model, torch.nn.Module, "model", "an nn.Module"),
            optimizers=_as_list(optimizer, torch.optim.Optimizer, "optimizer", "a torch.optim.Optimizer"),
            **options,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.on_anomaly not in _ON_ANOMALY:
            raise ValueError(
                f"on_anomaly must be one of {_ON_ANOMALY}, got {self.on_anomaly!r}"
            )
        if self.level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {self.level!r}")
        for name in ("max_events", "stats_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("change_stats", "check_nonfinite", "per_parameter_scalars"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.log_dir is not None:
            if not isinstance(self.log_dir, (str, os.PathLike)):
                raise TypeError(f"log_dir must be a str or os.PathLike, got {type(self.log_dir).__name__}")
            self.log_dir = os.fspath(self.log_dir)
            _check_writable_dir(self.log_dir)
        if self.writer is not None:
            if not callable(getattr(self.writer, "add_scalar", None)):
                raise TypeError(
                    "writer must be a torch.utils.tensorboard.SummaryWriter (or have add_scalar/"
                    f"add_text), got {type(self.writer).__name__}"
                )
            file_writer = getattr(self.writer, "file_writer", "missing")
            if file_writer is None or getattr(self.writer, "all_writers", "missing") is None:
                raise ValueError("writer is closed: pass an open SummaryWriter")


def _as_list(value: Any, kind: type, arg: str, what: str) -> list[Any]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, set)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(
                f"{arg} must be {what}, a list of them, or None; got {type(item).__name__}"
            )
    return items


def _check_writable_dir(path: str) -> None:
    if "\0" in path:
        raise ValueError(f"log_dir {path!r} contains a NUL byte")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"log_dir {path!r} cannot be created: {exc}") from None
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ValueError(f"log_dir {path!r} is not a writable directory")


def iter_named(models: Iterable[torch.nn.Module], names: Iterable[str | None] = ()
               ) -> Iterable[tuple[str, torch.nn.Module]]:
    """Yield (prefix, module). Several models are prefixed by the caller's variable names
    (``G.``, ``D.``) where known, else ``model0.``, ``model1.``."""
    models = list(models)
    names = list(names) + [None] * len(models)
    for i, m in enumerate(models):
        yield ("" if len(models) == 1 else f"{names[i] or f'model{i}'}."), m
