"""Find the user's line: the first frame outside torch, Lightning, wrapt and gradwatch."""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType, FrameType

from .events import Location

__all__ = ["caller", "is_internal", "location_of", "user_frame"]


def _package_dirs() -> tuple[str, ...]:
    import importlib.util

    dirs = [os.path.dirname(os.path.abspath(__file__))]
    for name in ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "wrapt"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(os.path.abspath(p) for p in spec.submodule_search_locations)
    import contextlib
    import functools

    dirs.append(os.path.abspath(contextlib.__file__))
    dirs.append(os.path.abspath(functools.__file__))
    return tuple(d + os.sep if os.path.isdir(d) else d for d in dirs)


_INTERNAL_DIRS = _package_dirs()
_internal: dict[CodeType, bool] = {}


def is_internal(code: CodeType) -> bool:
    """Whether ``code`` belongs to torch, Lightning, wrapt, gradwatch or contextlib (memoised)."""
    flag = _internal.get(code)
    if flag is None:
        filename = code.co_filename
        flag = filename.startswith(_INTERNAL_DIRS) or filename.startswith("<frozen")
        if not flag and not os.path.isabs(filename) and not filename.startswith("<"):
            flag = os.path.abspath(filename).startswith(_INTERNAL_DIRS)
        _internal[code] = flag
    return flag


def user_frame(depth: int = 1) -> FrameType | None:
    """The innermost frame of user code, skipping ``depth`` frames, then every internal one."""
    try:
        frame: FrameType | None = sys._getframe(depth)
    except ValueError:
        return None
    internal = _internal
    while frame is not None:
        flag = internal.get(frame.f_code)
        if flag is None:
            flag = is_internal(frame.f_code)
        if not flag:
            return frame
        frame = frame.f_back
    return None


def caller(depth: int = 1) -> tuple[CodeType, int] | None:
    """``(code, lineno)`` of the user's line: cheap, holds no frame. gradwatch's own frames are
    internal, so callers inside gradwatch need not count their depth."""
    frame = user_frame(2)
    if frame is None:
        return None
    return frame.f_code, frame.f_lineno


def location_of(where: tuple[CodeType, int] | None) -> Location | None:
    """Turn a ``caller()`` result into a :class:`Location` with its source line."""
    if where is None:
        return None
    code, lineno = where
    line = linecache.getline(code.co_filename, lineno).strip()
    function = getattr(code, "co_qualname", code.co_name)
    return Location(code.co_filename, lineno, function, line)


def local_name(frame: FrameType | None, obj: object) -> str | None:
    """The name a user frame binds ``obj`` to (used on rare paths only: an O(locals) scan)."""
    if frame is None:
        return None
    try:
        for name, value in frame.f_locals.items():
            if value is obj and not name.startswith("_"):
                return name
    except Exception:
        return None
    return None
