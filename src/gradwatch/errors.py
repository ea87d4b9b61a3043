"""Exceptions and warnings raised by gradwatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Event

__all__ = ["AnomalyError", "GradWatchWarning", "is_freed_graph_error", "is_no_grad_root_error",
           "is_version_error"]


class GradWatchWarning(UserWarning):
    """Issued once per distinct anomaly when ``on_anomaly="warn"``."""


class AnomalyError(RuntimeError):
    """Raised at the culprit line when ``on_anomaly="raise"``; ``.event`` holds the diagnosis."""

    def __init__(self, event: Event) -> None:
        super().__init__(event.describe())
        self.event = event


def is_version_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's "modified by an inplace operation" error."""
    return isinstance(exc, RuntimeError) and "modified by an inplace operation" in str(exc)


def is_no_grad_root_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's "element 0 of tensors does not require grad" error."""
    return (isinstance(exc, RuntimeError)
            and "does not require grad and does not have a grad_fn" in str(exc))


def is_freed_graph_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's "Trying to backward through the graph a second time" error."""
    return (isinstance(exc, RuntimeError)
            and "backward through the graph a second time" in str(exc))
