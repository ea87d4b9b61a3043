"""Find the user's line: the first frame outside torch, Lightning, wrapt and gradwatch."""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType, FrameType, TracebackType

from .events import Location

__all__ = ["caller", "caller_of_forward", "innermost_user_frame", "is_internal", "location_of",
           "user_frame"]


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
# A user's TorchFunctionMode/TorchDispatchMode handler forwards ops; the line is its caller's.
_HANDLERS = frozenset({"__torch_function__", "__torch_dispatch__"})
# Keyed by id(code): hashing a code object hashes its bytecode and constants, which costs
# microseconds when the caches are cold (as they are between training ops). Each code object
# is kept alive beside its flag, so that its id cannot be reused by another.
_internal: dict[int, bool] = {}
_codes: dict[int, CodeType] = {}


def is_internal(code: CodeType) -> bool:
    """Whether ``code`` belongs to torch, Lightning, wrapt, gradwatch or contextlib (memoised)."""
    flag = _internal.get(id(code))
    if flag is None:
        filename = code.co_filename
        flag = (filename.startswith(_INTERNAL_DIRS) or filename.startswith("<frozen")
                or code.co_name in _HANDLERS)
        if not flag and not os.path.isabs(filename) and not filename.startswith("<"):
            flag = os.path.abspath(filename).startswith(_INTERNAL_DIRS)
        _internal[id(code)] = flag
        _codes[id(code)] = code
    return flag


def _first_user(frame: FrameType | None) -> FrameType | None:
    """``frame`` or the nearest frame below it that is not internal."""
    internal = _internal
    while frame is not None:
        code = frame.f_code
        flag = internal.get(id(code))
        if flag is None:
            flag = is_internal(code)
        if not flag:
            return frame
        frame = frame.f_back
    return None


def user_frame(depth: int = 1) -> FrameType | None:
    """The innermost frame of user code, skipping ``depth`` frames, then every internal one."""
    try:
        return _first_user(sys._getframe(depth))
    except ValueError:
        return None


def caller(skip: int = 0) -> tuple[CodeType, int] | None:
    """``(code, lineno)`` of the user's line: cheap, holds no frame. gradwatch's own frames are
    internal, so callers inside gradwatch need not count their depth; a hot path that knows
    ``skip`` frames above its own are gradwatch's passes it, and the walk starts above them
    (``sys._getframe`` jumps there without building a frame object for each)."""
    try:
        frame = _first_user(sys._getframe(2 + skip))
    except ValueError:
        return None
    return None if frame is None else (frame.f_code, frame.f_lineno)


_locations: dict[tuple[int, int], Location] = {}


def location_of(where: tuple[CodeType, int] | None) -> Location | None:
    """Turn a ``caller()`` result into a :class:`Location` with its source line (memoised: a
    training loop reports from the same few lines every step)."""
    if where is None:
        return None
    code, lineno = where
    key = (id(code), lineno)  # the code object is pinned beside it (see `_codes`)
    loc = _locations.get(key)
    if loc is None:
        line = linecache.getline(code.co_filename, lineno).strip()
        function = getattr(code, "co_qualname", code.co_name)
        loc = Location(code.co_filename, lineno, function, line)
        if len(_locations) >= 4096:
            _locations.clear()
        _locations[key] = loc
        _codes[id(code)] = code
    return loc


def local_name(frame: FrameType | None, obj: object) -> str | None:
    """The global name a module-level user frame binds ``obj`` to. Function frames are not
    scanned: on Python 3.11 reading ``f_locals`` snapshots every local into a dict that lives
    as long as the frame, which would keep the user's tensors alive."""
    if frame is None or frame.f_code.co_name != "<module>":
        return None
    try:
        for name, value in frame.f_globals.items():
            if value is obj and not name.startswith("_"):
                return name
    except Exception:
        return None
    return None


def call_arg_names(where: tuple[CodeType, int] | None, func_name: str) -> list[str | None]:
    """Names in the first (list/tuple) argument of a call to ``func_name`` on the source line
    ``where``: ``watch([G, D], ...)`` gives ``["G", "D"]``. Parses source, touches no frame."""
    if where is None:
        return []
    import ast

    line = linecache.getline(where[0].co_filename, where[1]).strip()
    for text in (line, line + "\n    pass"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name != func_name:
                continue
            first = node.args[0]
            items = first.elts if isinstance(first, (ast.List, ast.Tuple)) else [first]
            return [it.id if isinstance(it, ast.Name) else None for it in items]
    return []


def rebound_name(where: tuple[CodeType, int] | None) -> str | None:
    """``x`` for a source line ``x = <expression using x>`` (a rebinding), else None."""
    if where is None:
        return None
    import ast

    line = linecache.getline(where[0].co_filename, where[1]).strip()
    try:
        tree = ast.parse(line)
    except SyntaxError:
        return None
    stmt = tree.body[0] if tree.body else None
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        target = stmt.targets[0].id
        if any(isinstance(n, ast.Name) and n.id == target for n in ast.walk(stmt.value)):
            return target
    return None


_statements: dict[str, list[tuple[int, int]]] = {}


def statement_start(where: tuple[CodeType, int]) -> tuple[CodeType, int]:
    """``where`` moved to the first line of the statement it is part of (a call inside a
    multi-line expression reports its own line). Parses the file once; rare paths only."""
    code, lineno = where
    filename = code.co_filename
    spans = _statements.get(filename)
    if spans is None:
        spans = []
        try:
            import ast

            tree = ast.parse("".join(linecache.getlines(filename)))
            spans = [(n.lineno, n.end_lineno or n.lineno) for n in ast.walk(tree)
                     if isinstance(n, ast.stmt)]
        except (SyntaxError, ValueError, RecursionError):
            pass
        if len(_statements) >= 64:
            _statements.clear()
        _statements[filename] = spans
    inner = [(a, b) for a, b in spans if a <= lineno <= b and b - a < 50]
    if not inner:
        return where
    start = max(inner, key=lambda s: (s[0], -s[1]))[0]  # the innermost statement
    return (code, start)


_OWN = _INTERNAL_DIRS[0]  # gradwatch's own package directory


def without_own_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without gradwatch's frames (re-raised at a boundary, the boundary's own frame is
    the one gradwatch frame left: an error that passes through never looks like ours)."""
    try:
        frames = []
        t = tb
        while t is not None:
            if not t.tb_frame.f_code.co_filename.startswith(_OWN):
                frames.append(t)
            t = t.tb_next
        out = None
        for t in reversed(frames):
            out = TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
        return out
    except Exception:  # never replace the exception passing through by one of ours
        return tb


def innermost_user_frame(exc: BaseException) -> tuple[FrameType | None, int]:
    """The innermost frame of user code in ``exc``'s traceback, and its line."""
    frame, lineno, tb = None, 0, exc.__traceback__
    while tb is not None:
        if not is_internal(tb.tb_frame.f_code):
            frame, lineno = tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next
    return frame, lineno


def caller_of_forward(frame: FrameType) -> FrameType:
    """The user frame that called the module whose ``forward`` runs at ``frame`` (through
    nested user forwards and torch's module call machinery); ``frame`` if none is found."""
    f = frame
    for _ in range(8):
        if f.f_code.co_name != "forward":
            return f
        g = f.f_back
        while g is not None and is_internal(g.f_code):
            g = g.f_back
        if g is None:
            return f
        f = g
    return f

