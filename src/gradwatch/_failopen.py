"""Fail-open by part: an internal error is reported once, its part is switched off for good,
and the user's call goes on unchanged.

Each component that can fail registers under a :class:`Part`; switching a part off sets the
component's ``off`` attribute, which its own hot path reads (one attribute, no set lookup, no
string). AnomalyError and torch's own errors raised on purpose pass through.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._location import without_own_frames
from .errors import AnomalyError, GradWatchWarning, is_version_error

__all__ = ["FailOpen", "Part", "warn_internal"]

_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


class Part(enum.Enum):
    """What an internal error switches off (the value is what the warning calls it)."""

    MODE = "mode"  # the function mode's handlers (in-place writes, detaches, no_grad ops)
    BACKWARD = "backward"
    ACCUMULATION = "accumulation"
    OPTIMIZER = "optimizer hooks"
    CLIPPING = "clipping"
    GRAD_FLOW = "grad flow"
    NAMING = "naming"  # module discovery
    LIGHT_SWITCH = "light mode switch"
    DATA_LOADING = "data loading"
    SAVED_TENSORS = "saved tensors"
    FLUSH = "flush"


# Parts that cannot work without another: the step bracketing tells the mode which writes are
# the optimizer's and tells the accumulation detector when gradients were consumed.
DEPENDENTS: dict[Part, tuple[Part, ...]] = {
    Part.OPTIMIZER: (Part.MODE, Part.ACCUMULATION),
    Part.BACKWARD: (Part.ACCUMULATION,),  # (the backward boundary feeds it every pass)
}


def warn_internal(part: str, exc: BaseException, stacklevel: int = 3,
                  consequence: str | None = None) -> None:
    if consequence is None:
        consequence = f"{part} is switched off for the rest of this run"
    warnings.warn(
        f"gradwatch: internal error in {part} ({type(exc).__name__}: {exc}); {consequence}, "
        "training continues unchanged",
        GradWatchWarning,
        stacklevel=stacklevel,
    )


class FailOpen:
    """The parts switched off, and the guards that switch them."""

    def __init__(self) -> None:
        self.failed: set[Part] = set()
        self._owners: dict[Part, list[Any]] = {}

    def register(self, part: Part, owner: Any) -> None:
        """``owner.off`` becomes True when ``part`` fails (at once if it already has)."""
        self._owners.setdefault(part, []).append(owner)
        owner.off = part in self.failed

    def is_off(self, part: Part) -> bool:
        return part in self.failed

    def fail(self, part: Part, exc: BaseException) -> None:
        if isinstance(exc, AnomalyError):
            raise exc
        if part in self.failed:
            return
        for p in (part, *DEPENDENTS.get(part, ())):
            self.failed.add(p)
            for owner in self._owners.get(p, ()):
                owner.off = True
        warn_internal(part.value, exc, stacklevel=4)

    def guard(self, part: Part, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None once ``part`` is off or if it fails."""
        if part in self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except AnomalyError:
            raise
        except Exception as exc:
            self.fail(part, exc)
            return None

    def hook(self, part: Part, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a hook guarded at the boundary (torch's hooks take positional arguments):
        None if it fails (``fn`` checks its owner's ``off`` itself, after its compile check:
        dynamo traces these hooks). Torch's version error (raised on purpose by the
        saved-tensor check) passes through."""

        def hook(*args: Any) -> Any:
            try:
                return fn(*args)
            except AnomalyError as exc:
                raise _trimmed(exc)  # noqa: B904
            except Exception as exc:
                if is_version_error(exc):
                    raise _trimmed(exc)  # noqa: B904
                self.fail(part, exc)
                return None

        return hook

    def wrapper(self, part: Part, fn: Callable[..., Any],
                prepare: Callable[[tuple, dict], tuple[tuple, dict]] | None = None
                ) -> Callable[..., Any]:
        """A wrapt wrapper guarded at the boundary. ``fn(call, instance, args, kwargs)`` must call
        the wrapped function through ``call``. If ``fn`` fails before it did, ``part`` is
        switched off and the wrapped function is called once, with the user's arguments
        intact: ``prepare`` (run first) may turn arguments that can be read only once, such as
        a generator, into equivalent ones that both ``fn`` and that fallback use. Once the part
        is off, the wrapped function is called directly. Exceptions of the wrapped function
        itself (the user's, torch's) pass through."""
        failed = self.failed

        def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            # (compile check first: dynamo traces this wrapper and must see nothing of ours)
            if _dynamo_compiling() or _compiler._is_compiling_flag or part in failed:
                return wrapped(*args, **kwargs)
            called = False

            def call(*a: Any, **k: Any) -> Any:
                nonlocal called
                called = True
                return wrapped(*a, **k)

            try:
                if prepare is not None:  # (it defers the user's own errors to torch's call)
                    args, kwargs = prepare(args, kwargs)
                return fn(call, instance, args, kwargs)
            except AnomalyError as exc:
                raise _trimmed(exc)  # noqa: B904
            except BaseException as exc:
                if called or not isinstance(exc, Exception):
                    # the user's (or torch's) own error: it shows no frame of ours but this one
                    raise _trimmed(exc)  # noqa: B904
                self.fail(part, exc)
                return wrapped(*args, **kwargs)

        return wrapper


def _trimmed(exc: BaseException) -> BaseException:
    """``exc`` without gradwatch's frames in its traceback; ``exc`` as it is if that fails (a
    boundary never replaces the exception passing through by one of its own)."""
    try:
        return exc.with_traceback(without_own_frames(exc.__traceback__))
    except Exception:
        return exc
