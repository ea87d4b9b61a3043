"""gradwatch: name the line that silently corrupts your gradients.

Names are imported lazily so that loading the TensorBoard plugin or the CLI does not import
torch until it is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AnomalyError",
    "Change",
    "Event",
    "EventKind",
    "GradWatchWarning",
    "Location",
    "Watch",
    "__version__",
    "watch",
]
__version__ = "0.1.0"

_EXPORTS = {
    "AnomalyError": "errors",
    "GradWatchWarning": "errors",
    "Change": "events",
    "Event": "events",
    "EventKind": "events",
    "Location": "events",
    "Watch": "api",
    "watch": "api",
}

if TYPE_CHECKING:
    from .api import Watch, watch
    from .errors import AnomalyError, GradWatchWarning
    from .events import Change, Event, EventKind, Location


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
