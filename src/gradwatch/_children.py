"""``gradwatch run`` follows the processes a script starts with ``multiprocessing`` (and so
``torch.multiprocessing.spawn``, Lightning's ``ddp_spawn``): each child runs under a watch of its
own that writes ``gradwatch.jsonl`` (and TensorBoard files) into
``<log_dir>/processes/<name>.<pid>/``, with ``gradwatch.process.json`` saying who it was (name,
pid, rank) and whether it closed its watch. The parent merges them into one report.

How (the approach of coverage.py's multiprocessing support):

- ``multiprocessing.process.BaseProcess._bootstrap`` (what every child runs first, whatever the
  start method) is wrapped while the run lasts: the child opens its watch, runs, and closes it.
  A forked child inherits the patched class; a spawned (or forkserver) child gets it from a
  *stowaway*, an object put into the preparation data that the parent pickles for it
  (``multiprocessing.spawn.get_preparation_data``): unpickling it in the child applies the patch
  before the child's ``_bootstrap`` runs.
- A forked child also inherits the parent's running watch (its hooks, its open files, a
  TensorBoard writer whose thread did not survive the fork): ``os.register_at_fork`` drops it in
  every forked child, without flushing or closing anything of the parent's.
- DataLoader workers, and multiprocessing's own servers (managers), run no training: they are
  not watched.

Nothing here runs unless ``gradwatch run`` called :func:`follow`.
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PROCESS_DIR", "STATUS_FILE", "follow", "unfollow"]

PROCESS_DIR = "processes"  # <log_dir>/processes/<name>.<pid>/
STATUS_FILE = "gradwatch.process.json"

_lock = threading.Lock()
_settings: dict[str, Any] | None = None  # the run's: log_dir, level, on_anomaly, run_id
_original_bootstrap: Callable[..., Any] | None = None
_original_preparation: Callable[..., Any] | None = None
_at_fork_registered = False
_parent_pid: int | None = None  # the process whose watch a forked child must drop


def follow(log_dir: str, level: str, on_anomaly: str, run_id: str) -> None:
    """Watch every ``multiprocessing`` child started from now on (until :func:`unfollow`)."""
    global _settings, _parent_pid
    with _lock:
        _settings = {"log_dir": os.path.abspath(log_dir), "level": level,
                     "on_anomaly": on_anomaly, "run_id": run_id}
        _parent_pid = os.getpid()
        _patch()


def unfollow() -> None:
    """Stop following children (their watches, already running, are their own)."""
    global _settings, _original_bootstrap, _original_preparation
    with _lock:
        _settings = None
        base = multiprocessing.process.BaseProcess
        if _original_bootstrap is not None:
            base._bootstrap = _original_bootstrap  # type: ignore[attr-defined]
            _original_bootstrap = None
        if _original_preparation is not None:
            from multiprocessing import spawn

            spawn.get_preparation_data = _original_preparation
            _original_preparation = None


def _patch() -> None:
    global _original_bootstrap, _original_preparation, _at_fork_registered
    base = multiprocessing.process.BaseProcess
    if _original_bootstrap is None:
        _original_bootstrap = base._bootstrap  # type: ignore[attr-defined]
        original = _original_bootstrap

        def _bootstrap(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _run_child(self, original, args, kwargs)

        base._bootstrap = _bootstrap  # type: ignore[attr-defined]
    if _original_preparation is None:
        from multiprocessing import spawn

        _original_preparation = prepare = spawn.get_preparation_data

        def get_preparation_data(name: str) -> dict[str, Any]:
            data = prepare(name)
            if _settings is not None:
                data["gradwatch"] = _Stowaway(dict(_settings))
            return data

        spawn.get_preparation_data = get_preparation_data
    if not _at_fork_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)
        _at_fork_registered = True


class _Stowaway:
    """Pickled into a spawned child's preparation data; unpickling it there applies the patch."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.settings)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = state
        try:
            follow(state["log_dir"], state["level"], state["on_anomaly"], state["run_id"])
        except Exception:  # never break the user's child: it runs unwatched
            pass


def _after_fork() -> None:
    """In every forked child: drop the watch inherited from the parent, unflushed (its files and
    its TensorBoard writer are the parent's). A multiprocessing child then opens its own."""
    global _parent_pid
    if _parent_pid is None or os.getpid() == _parent_pid:
        return
    _parent_pid = None
    try:
        from . import api

        api._active_lock = threading.Lock()  # (another thread may have held it at the fork)
        inherited = api._active
        api._active = None
        if inherited is None:
            return
        rt = inherited._runtime
        rt.emit.sinks = []  # the parent's files: neither flushed nor closed here
        rt.ctx.closed = True  # (its atexit close does nothing)
        inherited._closed = True
        rt.uninstall()
    except Exception:
        pass


def _is_training_child(process: Any) -> bool:
    """DataLoader workers and multiprocessing's own servers run no training."""
    target = getattr(process, "_target", None)
    module = getattr(target, "__module__", None) or ""
    return not (module.startswith("torch.utils.data") or module.startswith("multiprocessing"))


def _run_child(process: Any, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    settings = _settings
    if settings is None or not _is_training_child(process):
        return original(process, *args, **kwargs)
    child = _ChildWatch(process, settings)
    child.open()
    status = None
    try:
        status = original(process, *args, **kwargs)
        return status
    finally:
        child.close(status)


class _ChildWatch:
    """One child's watch, its directory and its status file."""

    def __init__(self, process: Any, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.name = str(getattr(process, "name", "process"))
        self.pid = os.getpid()
        safe = "".join(c if c.isalnum() or c in "-_:" else "_" for c in self.name)
        self.dir = os.path.join(settings["log_dir"], PROCESS_DIR, f"{safe}.{self.pid}")
        self.watch: Any = None
        self.rank: int | None = None
        self._undo: Callable[[], None] | None = None

    def open(self) -> None:
        global _parent_pid
        _parent_pid = self.pid  # this child's own forks (its DataLoader workers) drop its watch
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._status(closed=False)
            from .api import watch

            w = watch(log_dir=self.dir, level=self.settings["level"],
                      on_anomaly=self.settings["on_anomaly"])
            w.shared = True  # the child's own watch() or GradWatchCallback joins this one
            w.__enter__()
            self.watch = w
            self._undo = _follow_rank(w)
        except Exception as exc:
            self._status(closed=False, error=f"{type(exc).__name__}: {exc}")
            self.watch = None

    def close(self, exitcode: Any) -> None:
        w = self.watch
        if w is None:
            return
        error = None
        try:
            w.close()
        except BaseException as exc:  # (an AnomalyError of on_anomaly="raise" at the final flush)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._undo is not None:
                self._undo()
        try:
            self.rank = w.rank if w.world > 1 else None
        except Exception:
            pass
        self._status(closed=True, exitcode=exitcode, error=error)

    def _status(self, closed: bool, exitcode: Any = None, error: str | None = None) -> None:
        status = {"name": self.name, "pid": self.pid, "ppid": os.getppid(),
                  "run_id": self.settings["run_id"], "rank": self.rank, "closed": closed,
                  "exitcode": exitcode if isinstance(exitcode, int) else None,
                  "error": error, "time": time.time()}
        try:
            tmp = os.path.join(self.dir, STATUS_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, os.path.join(self.dir, STATUS_FILE))
        except OSError:
            pass


def _follow_rank(w: Any) -> Callable[[], None] | None:
    """Tag the child's events with its rank once it joins a process group: a spawned child's
    rank is not known when its watch starts (``init_process_group`` comes later)."""
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return None
        original = dist.init_process_group
    except Exception:
        return None

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            from ._context import process_group

            rt = w._runtime
            rt.ctx.rank, rt.ctx.world = process_group()
            rt.emit.rank = rt.ctx.rank
        except Exception:
            pass
        return result

    init_process_group.__wrapped__ = original  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group

    def undo() -> None:
        if dist.init_process_group is init_process_group:
            dist.init_process_group = original

    return undo
