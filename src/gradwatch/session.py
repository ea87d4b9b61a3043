"""The old import path of :func:`gradwatch.watch` and :class:`gradwatch.Watch` (see ``api``)."""

from .api import Watch, active_watch, shared_watch_running, watch

__all__ = ["Watch", "active_watch", "shared_watch_running", "watch"]
