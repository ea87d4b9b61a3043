"""Exceptions and warnings raised by gradwatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Event

__all__ = ["AnomalyError", "GradWatchWarning"]


class GradWatchWarning(UserWarning):
    """Issued once per distinct anomaly when ``on_anomaly="warn"``."""


class AnomalyError(RuntimeError):
    """Raised at the culprit line when ``on_anomaly="raise"``; ``.event`` holds the diagnosis."""

    def __init__(self, event: Event) -> None:
        super().__init__(event.describe())
        self.event = event
