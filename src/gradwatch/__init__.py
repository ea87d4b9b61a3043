"""gradwatch: name the line that silently corrupts your gradients."""

from .errors import AnomalyError, GradWatchWarning
from .events import Change, Event, EventKind, Location
from .watch import Watch, watch

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
