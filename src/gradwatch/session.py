"""``gradwatch.watch()``: the context manager that wires interception, detectors and sinks."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys
import threading
import time
import types
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any

import torch

from ._intercept.hooks import Installed
from ._intercept.mode import WatchMode
from ._intercept.ops import Action
from ._location import (
    call_arg_names,
    caller,
    is_internal,
    local_name,
    location_of,
    rebound_name,
    user_frame,
)
from ._naming import TensorNames, describe, storage_key
from ._records import LeafBatch, Raw, RecordBuffer, UpdateStats, build_event, expand
from .config import Config, iter_named
from .detectors import accumulation as acc_mod
from .detectors import grad_flow, nonfinite, saved_tensor
from .detectors.accumulation import AccumulationTracker, finite_nonzero
from .detectors.grad_flow import Cut, CutTracker
from .detectors.nonfinite import NonfiniteTracker, checkable, max_abs
from .detectors.saved_tensor import Mutation, SavedTensorRegistry
from .errors import AnomalyError, GradWatchWarning
from .events import Event, EventKind
from .sinks import Sink, StepSummary
from .sinks.jsonl import JsonlSink

_dynamo_compiling = torch.compiler.is_dynamo_compiling  # folded to True by dynamo's tracer
_compiler = torch.compiler


def _is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` without its TorchScript check (our hooks never run
    scripted); hot paths inline it."""
    return _dynamo_compiling() or _compiler._is_compiling_flag


_GRAD_GET = Action.GRAD_GET


_push_function_mode = torch._C._push_on_torch_function_stack
_pop_function_mode = torch._C._pop_torch_function_stack


_UNDER_USER_MODE = (
    "gradwatch: another TorchFunctionMode entered inside watch() is still active; gradwatch's "
    "mode was taken off the stack from beneath it (that mode is untouched and exits as usual)")


def _remove_mode(mode: Any) -> bool:
    """Take ``mode`` off this thread's function-mode stack wherever it is: the modes above it
    are popped and pushed back in order (a mode's ``__exit__`` pops whatever is on top, so theirs
    still work). True if it was there."""
    above, found = [], False
    while not found and torch._C._len_torch_function_stack():
        top = _pop_function_mode()
        found = top is mode
        if not found:
            above.append(top)
    for m in reversed(above):
        _push_function_mode(m)
    return found


def _mode_stack_top() -> Any:
    n = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(n - 1) if n else None


_DISCOVERY_STEPS = 8  # module discovery stops after this many steps without a new module
_GRAD_MODE_FILE = torch.autograd.grad_mode.__file__
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB_FILE = torch.utils._contextlib.__file__
_SKIP_FILES = frozenset({_GRAD_MODE_FILE, __file__})

__all__ = ["Watch", "watch"]

K = EventKind
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_grad_enabled = torch.is_grad_enabled
_inference_enabled = torch.is_inference_mode_enabled
_ZEROING = {torch.Tensor.zero_, torch._foreach_zero_}
# Samples for update/weight ratios and change stats: 2.4% of each tensor, 8 to 1024 elements.
_SAMPLE, _SAMPLE_MIN, _SAMPLE_SHARE = 1024, 8, 0.024
_active_lock = threading.Lock()
_active: Watch | None = None


def shared_watch_running() -> bool:
    """Whether a shared watch (``gradwatch run``) is running: a new watch joins it."""
    with _active_lock:
        return _active is not None and _active.shared and not _active._closed


def watch(
    model: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    writer: Any = None,
    on_anomaly: str = "warn",
    level: str = "full",
    max_events: int = 10_000,
    stats_every: int = 10,
    change_stats: bool = True,
    check_nonfinite: bool = True,
) -> Watch:
    """Watch a training loop for silent gradient corruption.

    Example usage::

        with gradwatch.watch(model, optimizer, log_dir="runs/exp1") as w:
            for x, y in loader:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        print(w.report())

    Args:
        model: module(s) used to name tensors; optional (modules are discovered when they run).
        optimizer: optimizer(s) to name parameters by; optional (every optimizer is seen).
        log_dir: write ``gradwatch.jsonl`` and TensorBoard event files there.
        writer: write TensorBoard data to this ``SummaryWriter`` instead of one of our own.
        on_anomaly: ``"warn"`` (once per distinct anomaly), ``"raise"`` (:class:`AnomalyError`
            at the culprit line) or ``"log"`` (record only).
        level: ``"full"`` (every diagnosis at mutation time) or ``"light"`` (interception only
            while grad mode is off; diagnoses completed from hooks and torch's own errors).
        max_events: bound of the in-memory event buffer (``counts`` stay exact).
        stats_every: compute data-change and update/weight statistics every N optimizer steps.
        change_stats: compute ``Event.change`` for in-place edits (on statistics steps).
        check_nonfinite: look for NaN/Inf written under no_grad (batched, no per-op sync).
    """
    cfg = Config.build(
        model,
        optimizer,
        log_dir=log_dir,
        writer=writer,
        on_anomaly=on_anomaly,  # type: ignore[arg-type]
        level=level,  # type: ignore[arg-type]
        max_events=max_events,
        stats_every=stats_every,
        change_stats=change_stats,
        check_nonfinite=check_nonfinite,
    )
    if len(cfg.models) > 1:
        names = call_arg_names(caller(), "watch")
        if len(names) != len(cfg.models):
            names = []
        cfg.model_names = [n or f"model{i}" for i, n in enumerate(names or [None] * len(cfg.models))]
    return Watch(cfg)


class _OptimizerInfo:
    __slots__ = ("foreign", "index", "label", "messages", "name")

    def __init__(self, foreign: bool, index: int, name: str) -> None:
        self.foreign = foreign
        self.index = index
        self.name = name
        self.label = f"{name}{index}"  # the optimizer_update event's tensor name
        self.messages: dict[int, str] = {}  # parameters updated -> message (no string work per step)

    def message(self, n: int) -> str:
        text = self.messages.get(n)
        if text is None:
            text = self.messages[n] = f"{self.name} updated {n} parameter(s)"
        return text


class Watch:
    """A running watch. Use :func:`watch` to create one; use it as a context manager."""

    def __init__(self, config: Config, *, sinks: Iterable[Sink] = ()) -> None:
        self.config = config
        self._full = config.level == "full"
        self.rank, self.world = 0, 1
        self.suspended = True  # the mode passes everything through until entered
        self._entered = False
        self._closed = False
        self._step = 0
        self._step_override: Callable[[], int] | None = None
        self._buffer = RecordBuffer(config.max_events)
        self._anomalies: deque[Event] = deque(maxlen=config.max_events)
        self._seen_keys: dict[tuple, int] = {}
        self._distinct: dict[tuple, list[Any]] = {}  # key -> [first event, count, first/last step]
        self._sinks: list[Sink] = list(sinks)
        self._failed: set[str] = set()
        self._names = TensorNames()
        self._saved: SavedTensorRegistry | None = None
        self._recent = SavedTensorRegistry()  # mutation log only (for notes without hooks)
        self._cuts = CutTracker()
        self._acc = AccumulationTracker()
        self._nonfinite = NonfiniteTracker()
        self._installed = Installed()
        self._mode: WatchMode | None = None
        self._light_mode_pushed = False
        self._mode_paused = False
        self._optimizers: weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptimizerInfo] = (
            weakref.WeakKeyDictionary()
        )
        self._hooked: set[int] = set()  # ids of the leaves whose .grad is tracked
        self._leaf_refs: list[weakref.ref[torch.Tensor]] = []
        self._backward_where: tuple[CodeType, int] | None = None
        self._in_backward = False
        self._delegate: Watch | None = None
        #: Another watch() entered while this one runs joins it instead of being refused
        #: (set by `gradwatch run`, whose script may start its own watch or Lightning callback).
        self.shared = False
        self._module_hook: Any = None
        self._last_discovery = 0  # step at which a module was last discovered
        self._op_frame: Any = None
        self._discover_leaves = 8
        self._user_step_depth = 0
        self._outer_step = False  # a library optimizer's whole step runs with the mode aside
        self._steps_wrapped: set[type] = set()  # optimizer classes whose step is wrapped
        self._step_state: dict[int, Any] = {}
        self._last_optimizer: tuple[weakref.ref[Any], _OptimizerInfo] | None = None
        # attention/encoder modules given forward hooks (their eval fast path), and what each
        # running one stepped aside
        self._fast_path_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._fast_path_stack: list[tuple[Any, bool, bool, bool]] = []
        self._recent_steps: deque[tuple] = deque(maxlen=8)
        self._no_grad_regions: deque[tuple[tuple[CodeType, int] | None, int]] = deque(maxlen=8)
        self._busy = 0.0
        self._last_counts: dict[str, int] = {}
        self._thread = threading.get_ident()
        self._events_cache: tuple[int, list[Event]] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def step(self) -> int:
        """Optimizer steps completed (Lightning: ``trainer.global_step``)."""
        if self._delegate is not None:
            return self._delegate.step
        if self._step_override is not None:
            try:
                return int(self._step_override())
            except Exception:
                return self._step
        return self._step

    @property
    def anomalies(self) -> list[Event]:
        """Anomalies (severity warning or error) in the order seen (bounded like ``events``)."""
        if self._delegate is not None:
            return self._delegate.anomalies
        return list(self._anomalies)

    @property
    def events(self) -> list[Event]:
        """The most recent events (bounded by ``max_events``), anomalies included."""
        if self._delegate is not None:
            return self._delegate.events
        self._flush_records()
        return [build_event(r, self.rank) for r in self._buffer.latest(self.config.max_events)]

    @property
    def counts(self) -> dict[str, int]:
        """Exact number of events per kind, also past the buffer's bound."""
        if self._delegate is not None:
            return self._delegate.counts
        return dict(self._buffer.counts)

    def report(self) -> str:
        """A human summary: one line per distinct anomaly (kind, tensor, file:line, count)."""
        from .report import format_report

        if self._delegate is not None:
            return self._delegate.report()
        self._flush_records()
        return format_report(self.distinct_anomalies(), self.counts)

    def distinct_anomalies(self) -> list[dict[str, Any]]:
        """One entry per distinct anomaly: its first event, count, first and last step."""
        if self._delegate is not None:
            return self._delegate.distinct_anomalies()
        return [
            {"event": ev, "count": n, "first_step": first, "last_step": last}
            for ev, n, first, last in self._distinct.values()
        ]

    def _adopt(self, config: Config) -> None:
        """Name and hook the models and optimizers of a watch() that joins this one."""
        try:
            with torch._C.DisableTorchFunction():
                for prefix, m in iter_named(config.models, config.model_names):
                    if not self._names.knows_module(m):
                        for p in self._names.add_module(m, prefix):
                            self._hook_leaf(p)
                for opt in config.optimizers:
                    self._optimizer_info(opt)
        except Exception as exc:
            self._fail("naming", exc)
        config.models, config.optimizers = [], []

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def __enter__(self) -> Watch:
        global _active
        if self._entered or self._closed:
            raise RuntimeError("this Watch was already used; call gradwatch.watch(...) again for a new one")
        with _active_lock:
            if _active is not None and _active.shared and not _active._closed:
                # e.g. the script run by `gradwatch run` starts its own watch(): share that one
                self._delegate = _active
                self._entered = True
                _active._adopt(self.config)
                warnings.warn(
                    "gradwatch: a shared watch is already running (gradwatch run); this watch() "
                    "joins it and its options are ignored",
                    GradWatchWarning,
                    stacklevel=2,
                )
                return self
            if _active is not None:
                raise RuntimeError(
                    "gradwatch.watch() is already active in this process; nested watches are not "
                    "supported (use one watch around the whole loop)"
                )
            _active = self
        try:
            self._install()
        except BaseException:
            self._uninstall()
            with _active_lock:
                _active = None
            raise
        self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except AnomalyError:  # recorded; the user's exception is the one that propagates
            pass

    def close(self) -> None:
        """Flush everything and remove all hooks (idempotent)."""
        global _active
        if self._closed:
            return
        if self._delegate is not None:  # joined a shared watch: that one owns everything
            self._closed = True
            for sink in self._sinks:  # (given for a watch of its own, never written)
                try:
                    sink.close()
                except Exception as exc:
                    self._fail(f"sink {type(sink).__name__}", exc)
            return
        self._closed = True
        self.suspended = True
        try:
            self._guard("flush", self._step_boundary, final=True)
        finally:
            self._uninstall()
            self._step_state.clear()  # a step that raised left its samples (views) here
            for sink in self._sinks:
                try:
                    sink.close()
                except Exception as exc:
                    self._fail(f"sink {type(sink).__name__}", exc)
            with _active_lock:
                if _active is self:
                    _active = None

    # ------------------------------------------------------------------ install / uninstall
    def _install(self) -> None:
        cfg = self.config
        self.rank, self.world = _process_group()
        self._make_sinks()
        for prefix, m in iter_named(cfg.models, cfg.model_names):
            for p in self._names.add_module(m, prefix):
                self._hook_leaf(p)
            self._hook_fast_path_modules(m)
        for opt in cfg.optimizers:
            self._optimizer_info(opt)
        inst = self._installed
        inst.optimizer_hooks(self._hook("optimizer hooks", self._on_step_pre),
                             self._hook("optimizer hooks", self._on_step_post))
        self._module_hook = inst.module_forward_pre_hook(self._hook("naming", self._on_module_call))
        inst.wrap_attribute(torch.autograd, "backward", self._wrapper(
            "backward", functools.partial(self._wrap_backward, True)))
        inst.wrap_attribute(torch.autograd, "grad", self._wrapper(
            "backward", functools.partial(self._wrap_backward, False)))
        zero_grad = self._wrapper("accumulation", self._wrap_zero_grad)
        inst.wrap_attribute(torch.optim.Optimizer, "zero_grad", zero_grad)
        inst.wrap_attribute(torch.nn.Module, "zero_grad", zero_grad)
        for name in _CLIP_FUNCTIONS:
            clipping = self._wrapper("clipping", functools.partial(self._wrap_clip, name))
            for owner in _CLIP_OWNERS:
                if callable(getattr(owner, name, None)):
                    inst.wrap_attribute(owner, name, clipping)
        self._mode = WatchMode(self)
        if cfg.level == "full":
            saved_tensor.torch_wording()  # read torch's error wording while torch still checks
            # torch calls the registry's own pack/unpack (guarded inside: an internal error is
            # reported once and the tensors pass through from then on)
            saved = SavedTensorRegistry(on_error=functools.partial(self._fail, "saved tensors"))
            if inst.saved_tensors_hooks(saved.pack, saved.unpack):
                self._saved = saved
            self._mode.__enter__()
            inst.add(self._exit_mode)
            # Batches loaded in this process (num_workers=0): torch's indexing and collation of
            # every sample would each pass through the mode; the loader's own code needs no look.
            inst.wrap_attribute(torch.utils.data.dataloader._BaseDataLoaderIter, "__next__",
                                self._wrapper("data loading", self._wrap_data_fetch))
        else:
            _LIGHT_TARGET[0] = weakref.ref(self)
            inst.add(lambda: _LIGHT_TARGET.__setitem__(0, None))
            inst.replace_attribute(torch._C, "_set_grad_enabled", _light_set_grad_enabled)
            inst.add(self._exit_light_mode)
            if not torch.is_grad_enabled():
                self._push_light_mode()
        atexit.register(self.close)
        inst.add(lambda: atexit.unregister(self.close))
        # From here on the watch holds models and optimizers only weakly.
        cfg.models, cfg.optimizers = [], []
        self.suspended = False

    def _uninstall(self) -> None:
        self.suspended = True
        self._installed.undo()
        self._saved = None

    def _pause_mode(self) -> bool:
        """Step aside while library code whose effect is checked otherwise runs (an optimizer
        step, zero_grad, clipping): full takes the mode off the stack, light puts torch's own
        grad-mode switch back (torch's no_grad blocks inside need no look). True if paused."""
        if self._mode is None or self._mode_paused or threading.get_ident() != self._thread:
            return False  # (the mode stack is per thread: only the watch's thread pauses it)
        if not self._full:
            if torch._C._set_grad_enabled is _light_set_grad_enabled:
                torch._C._set_grad_enabled = _original_set_grad_enabled
                self._mode_paused = True
                return True
            return False
        if _mode_stack_top() is self._mode:
            _pop_function_mode()  # what the mode's __exit__ does, minus two Python calls
            self._mode_paused = True
            return True
        return False

    def _resume_mode(self) -> bool:
        """Undo :meth:`_pause_mode` (after the step, or if the step raised: at the next hook)."""
        if not self._mode_paused or threading.get_ident() != self._thread:
            return False
        self._mode_paused = False
        if self._mode is not None and not self._closed:
            if self._full:
                _push_function_mode(self._mode)  # the mode's __enter__
            else:
                torch._C._set_grad_enabled = _light_set_grad_enabled
        return True

    def _exit_mode(self) -> None:
        mode = self._mode
        if mode is None or self._mode_paused:
            return
        from torch.overrides import _get_current_function_mode_stack

        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)
        elif mode in stack:
            _remove_mode(mode)
            warnings.warn(_UNDER_USER_MODE, GradWatchWarning, stacklevel=3)

    def _make_sinks(self) -> None:
        cfg = self.config
        if cfg.log_dir is not None:
            self._sinks.append(JsonlSink(cfg.log_dir, rank=self.rank, world=self.world))
        if cfg.writer is not None or cfg.log_dir is not None:
            try:
                from .sinks.tensorboard import TensorBoardSink
            except ImportError as exc:  # pragma: no cover - tensorboard is a dependency
                self._fail("sink TensorBoard", exc)
            else:
                self._sinks.append(
                    TensorBoardSink(writer=cfg.writer, log_dir=cfg.log_dir, rank=self.rank,
                                    world=self.world)
                )

    # ------------------------------------------------------------------ light level
    def _on_grad_mode(self, mode: bool) -> None:
        if self.suspended and not self._light_mode_pushed:
            return
        try:
            if not mode:
                if not self._light_mode_pushed and (self._user_step_depth or self._user_no_grad()):
                    self.on_no_grad_entered()
                    self._push_light_mode()
            elif self._light_mode_pushed:
                self._pop_light_mode()
        except Exception as exc:
            self._fail("light mode switch", exc)

    def _user_no_grad(self) -> bool:
        """Whether grad mode is being switched off by user code (a ``with torch.no_grad():``
        block, or a user function decorated with ``@torch.no_grad()``) rather than inside torch
        (``clip_grad_norm_``, optimizer internals): light watches only the former."""
        frame = sys._getframe(3)
        while frame is not None and frame.f_code.co_filename in _SKIP_FILES:
            frame = frame.f_back
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "decorate_context" and code.co_filename == _CONTEXTLIB_FILE:
            func = frame.f_locals.get("func")  # the decorated function
            inner = getattr(inspect.unwrap(func), "__code__", None) if func is not None else None
            return inner is not None and not is_internal(inner)
        return not is_internal(code)

    def _push_light_mode(self) -> None:
        if self._mode is not None and threading.get_ident() == self._thread:
            self._mode.__enter__()
            self._light_mode_pushed = True

    def _pop_light_mode(self) -> None:
        if _mode_stack_top() is self._mode:
            self._mode.__exit__(None, None, None)
            self._light_mode_pushed = False

    def _exit_light_mode(self) -> None:
        if self._light_mode_pushed:
            self._pop_light_mode()
        if self._light_mode_pushed and _remove_mode(self._mode):  # under a mode of the user's
            self._light_mode_pushed = False
            warnings.warn(_UNDER_USER_MODE, GradWatchWarning, stacklevel=3)

    # ------------------------------------------------------------------ fail-open
    def _hook(self, part: str, fn: Callable[..., Any], fallback: Callable[..., Any] | None = None
              ) -> Callable[..., Any]:
        """``fn`` guarded at the boundary: an internal error is reported once, ``part`` switched
        off, and ``fallback(*args)`` (or None) returned. AnomalyError and torch's version error
        (raised on purpose by the saved-tensor check) pass through."""

        def hook(*args: Any) -> Any:
            try:
                return fn(*args)
            except AnomalyError:
                raise
            except Exception as exc:
                if saved_tensor.is_version_error(exc):
                    raise
                self._fail(part, exc)
                return fallback(*args) if fallback is not None else None

        return hook

    def _wrapper(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A wrapt wrapper guarded at the boundary: if ``fn`` fails before it called the wrapped
        function, that part is switched off and the wrapped function is called (exactly once);
        an exception from the wrapped function itself (the user's, torch's) passes through."""

        def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            called = False

            def call(*a: Any, **k: Any) -> Any:
                nonlocal called
                called = True
                return wrapped(*a, **k)

            try:
                return fn(call, instance, args, kwargs)
            except AnomalyError:
                raise
            except BaseException as exc:
                if called or not isinstance(exc, Exception):
                    raise
                self._fail(part, exc)
                return wrapped(*args, **kwargs)

        return wrapper

    # Parts that cannot work without another: the step bracketing tells the mode which writes are
    # the optimizer's and tells the accumulation detector when gradients were consumed.
    _DEPENDENTS = {"optimizer hooks": ("mode", "accumulation")}

    def _fail(self, part: str, exc: BaseException) -> None:
        if isinstance(exc, AnomalyError):
            raise exc
        if part in self._failed:
            return
        self._failed.add(part)
        self._failed.update(self._DEPENDENTS.get(part, ()))
        warnings.warn(
            f"gradwatch: internal error in {part} ({type(exc).__name__}: {exc}); {part} is "
            "switched off for the rest of this run, training continues unchanged",
            GradWatchWarning,
            stacklevel=3,
        )

    def _guard(self, part: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if part in self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except AnomalyError:
            raise
        except Exception as exc:
            self._fail(part, exc)
            return None

    # ------------------------------------------------------------------ emission
    def _record(self, r: Raw) -> None:
        self._buffer.add(r)

    def _anomaly(self, r: Raw, *, raise_now: bool = True) -> Event:
        """Record an anomaly now; warn or raise once per distinct anomaly."""
        self._buffer.add(r)
        ev = build_event(r, self.rank)
        self._anomalies.append(ev)
        key = ev.key
        entry = self._distinct.get(key)
        if entry is None:
            self._distinct[key] = [ev, 1, ev.step, ev.step]
        else:
            entry[1] += 1
            entry[3] = ev.step
        for sink in self._sinks:
            self._guard(f"sink {type(sink).__name__}", sink.anomaly, ev)
        first = entry is None
        if first and self.config.on_anomaly == "warn":
            warnings.warn_explicit(
                ev.describe(),
                GradWatchWarning,
                ev.location.filename if ev.location else "<gradwatch>",
                ev.location.lineno if ev.location else 0,
            )
        elif self.config.on_anomaly == "raise" and raise_now:
            raise AnomalyError(ev)
        return ev

    def _flush_records(self) -> list[Raw]:
        return self._guard("flush", self._buffer.take_unflushed) or []

    def _step_boundary(self, final: bool = False, step: int | None = None) -> None:
        with torch._C.DisableTorchFunction():
            self._flush_step(final, step)

    def _flush_step(self, final: bool, step: int | None) -> None:
        t0 = time.perf_counter()
        pending = self._nonfinite.pending
        # One read of the queued NaN probes (a sync on GPU) per statistics step, not per step.
        if pending and (final or self.step % self.config.stats_every == 0
                        or len(pending) > self._nonfinite.limit // 2):
            self._nonfinite.resolve(self._report_nonfinite)
        if self._cuts.replaced:
            self._raise_replaced()
        if step is None:
            step = self.step
        buffer = self._buffer
        if not self._sinks:
            # Nothing to write: records wait, as many events as the buffer holds at most, and
            # move into it when read, when that many wait, or at the end.
            if final or buffer.pending >= buffer.maxlen:
                buffer.take_unflushed()
        else:
            new = buffer.take_unflushed()
            info = [r for r in new if r.kind.severity == "info"]
            events = None  # built only for a sink that reads them
            counts = self._buffer.counts
            delta = {k: v - self._last_counts.get(k, 0) for k, v in counts.items()}
            self._last_counts = dict(counts)
            ratios: dict[str, float] = {}
            for r in new:
                if isinstance(r.ratios, dict):
                    ratios.update(r.ratios)
            summary = StepSummary(
                step=step, counts=delta, totals=dict(counts), update_ratios=ratios,
                overhead_s=self._busy + (time.perf_counter() - t0), rank=self.rank,
            )
            for sink in self._sinks:
                name = f"sink {type(sink).__name__}"
                if info:
                    if isinstance(sink, JsonlSink):
                        self._guard(name, sink.write_records, info, self.rank)
                    elif type(sink).write is not Sink.write:
                        if events is None:
                            events = [build_event(r, self.rank) for r in expand(info)]
                        self._guard(name, sink.write, events)
                self._guard(name, sink.step, summary)
                if final:
                    self._guard(name, sink.flush)
        self._busy = 0.0
        if self._module_hook is not None and self.step - self._last_discovery >= _DISCOVERY_STEPS:
            # every module has run several times: stop paying a hook call per module call
            self._module_hook.remove()
            self._module_hook = None
        if self._saved is not None:
            self._saved.sweep()
        if final:
            buffer.unfold_batches()  # names read while the leaves live
        if step % 50 == 0 or final:
            self._names.prune()
            self._acc.prune()
            self._acc.trained.intersection_update(self._hooked)
            self._leaf_refs = [r for r in self._leaf_refs if r() is not None]

    # ------------------------------------------------------------------ the function mode's calls
    def before(self, action: int, func: Any, args: tuple, kwargs: dict) -> Any:
        """Work before an interesting op runs; returns what :meth:`after` needs (or None)."""
        if action == _GRAD_GET:  # the most frequent: every p.grad read, mostly by torch itself
            if not args:
                return None
            acc = self._acc
            key = id(args[0])
            pending = acc.pending
            if pending is not None and key in pending.ids:
                unread = True  # accumulated into by the pass not applied yet, never read since
            else:
                st = acc.leaves.get(key)
                unread = st is not None and st.accum and not st.read
            if unread and "accumulation" not in self._failed:
                frame = sys._getframe(2)  # before <- __torch_function__ <- the reader
                if not is_internal(frame.f_code):  # torch reading it (clip, step) is no use
                    self._guard("accumulation", self._grad_read, args[0], frame)
            return None
        if "mode" in self._failed:
            return None
        # The frame that called the op (before <- __torch_function__ <- caller): read by the rare
        # paths that ask "is this the user's own code?"; held only while the op runs.
        self._op_frame = sys._getframe(2)
        pre = None
        try:
            pre = self._before(action, func, args, kwargs)
        finally:
            if pre is None:
                self._op_frame = None
        return pre

    def after(self, pre: Any, out: Any) -> None:
        try:
            self._after(pre, out)
        finally:
            self._op_frame = None

    def _after(self, pre: Any, out: Any) -> None:
        what = pre[0]
        if what == "write":
            self._after_write(pre[1], pre[2])
        elif what == "cut":
            self._after_no_grad_op(pre[1], pre[2], out)
        elif what == "detach":
            self._guard("grad flow", self._detached, pre[1], pre[2], out)
        elif what == "data_set":
            self._after_data_set(*pre[1:])

    def mode_failed(self, exc: BaseException) -> None:
        self._fail("mode", exc)

    def _before(self, action: int, func: Any, args: tuple, kwargs: dict) -> Any:
        A = Action
        first = args[0] if args else None
        if action == A.NO_GRAD_OP:
            if "grad flow" in self._failed:
                return None
            for a in args:
                if isinstance(a, _Tensor) and a.requires_grad:
                    try:
                        return ("cut", func, a) if a.is_leaf else None
                    except RuntimeError:  # e.g. a view made under no_grad: no is_leaf
                        return None
            return None
        targets: tuple = ()
        op = func
        grad_mode = None
        if action == A.INPLACE:
            targets = (first,)
        elif action == A.FOREACH:
            seq = first if first is not None else kwargs.get("self")
            if isinstance(seq, (list, tuple)):
                targets = tuple(seq)
        elif action == A.KWARG_WRITE:
            if kwargs.get("inplace") is True:
                targets = (first,)
            else:
                out = kwargs.get("out")
                targets = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        elif action == A.INIT:
            target = kwargs.get("tensor", first)
            if isinstance(target, _Tensor) and _version(target) == 0:
                return None  # a new tensor's first values (a module being built): no edit
            targets = (target,)
            grad_mode = "no_grad"
        elif action == A.EMBEDDING:
            if kwargs.get("max_norm") is None or len(args) < 2:
                return None
            targets, op, grad_mode = (args[1],), torch.embedding_renorm_, "no_grad"
        elif action == A.GRAD_SET:
            if len(args) >= 2:
                self._guard("accumulation", self._grad_replaced, first, args[1])
            return None
        elif action == A.DATA_SET:
            return self._before_data_set(first, args[1] if len(args) > 1 else None)
        elif action == A.DETACH:
            if isinstance(first, _Tensor) and first.requires_grad:
                return ("detach", func, first)
            return None
        targets = tuple(t for t in targets if isinstance(t, _Tensor))
        if not targets:
            return None
        pre = self._before_write(op, targets, grad_mode)
        return None if pre is None else ("write", op, pre)

    def on_no_grad_entered(self) -> None:
        """Remember ``with torch.no_grad():`` blocks written in user code (not decorated torch
        utilities) for the "does not require grad" note."""
        if "grad flow" in self._failed:
            return
        try:
            frame = sys._getframe(2)  # on_no_grad_entered <- (mode or light switch) <- torch
            while frame is not None and (frame.f_code.co_filename in _SKIP_FILES
                                         or frame.f_code.co_filename.startswith(_OWN_DIR)):
                frame = frame.f_back
            if frame is not None and not is_internal(frame.f_code):
                self._no_grad_regions.append(((frame.f_code, frame.f_lineno), self.step))
        except Exception as exc:
            self._fail("grad flow", exc)

    def _after_no_grad_op(self, func: Any, source: torch.Tensor, out: Any) -> None:
        if not isinstance(out, _Tensor):
            return
        try:
            # (a Parameter's arithmetic gives a plain Tensor: ``p = p - lr * p.grad``)
            same = ((type(out) is type(source)
                     or (type(source) is _Parameter and type(out) is _Tensor))
                    and not out.is_nested and source.shape == out.shape)
        except Exception:  # odd tensors (nested, symbolic shapes): no provenance for them
            return
        if same and not out.requires_grad:
            self._guard("grad flow", self._cut, func, source, out)

    def _user_code_called_op(self) -> bool:
        frame = self._op_frame
        return frame is not None and not is_internal(frame.f_code)

    @property
    def _acc_off(self) -> bool:
        return "accumulation" in self._failed

    # ------------------------------------------------------------------ in-place writes
    def _before_write(self, func: Any, targets: tuple, grad_mode: str | None) -> Any:
        grad_on = _grad_enabled() if grad_mode is None else grad_mode == "enabled"
        if grad_mode is None:
            grad_mode = "inference_mode" if _inference_enabled() else "enabled" if grad_on else "no_grad"
        saved = self._saved
        in_step = self._user_step_depth > 0
        tracked: list[list[Any]] = []
        hits: list[tuple[Any, Any]] = []
        where = None
        for t in targets:
            try:
                if not isinstance(t, _Tensor):
                    continue
                key = None
                if saved:
                    key = storage_key(t)
                    s = saved.pending(key)
                    if s is not None:
                        if where is None:
                            where = caller()
                        hits.append((t, s))
                        if self.config.on_anomaly == "raise":
                            self._saved_mutation(func, t, s, key, where, grad_mode, after=False)
                requires = t.requires_grad
                if grad_on and requires:
                    continue  # autograd records this one
                st = self._acc.owner_of_grad(t)
                if not requires and st is None:
                    if key is None:
                        key = storage_key(t)
                    if not in_step and (not self._names.has_storage(key) or (
                            grad_on and not self._names.storage_requires_grad(key))):
                        # with grad on, only an alias of a tensor that requires grad (.data,
                        # .detach()) writes behind autograd's back; a buffer update in forward
                        # (BatchNorm's num_batches_tracked) is no edit under no_grad
                        continue
                if st is not None and func in _ZEROING:
                    if where is None:
                        where = caller()
                    self._grad_zeroing(st, t, where, func)
                try:
                    version = t._version
                except Exception:
                    version = None
                tracked.append([t, key, version, st])
            except AnomalyError:
                raise
            except Exception:  # an odd tensor (nested, fake, ...): skip it, keep watching
                continue
        if not tracked and not hits:
            return None
        if where is None:
            where = caller()
        # Values are checked only for writes made by user code (your loop, your optimizer): torch's
        # own utilities (clip_grad_norm_, zero_grad, ...) do not create NaN from finite values.
        checks: list[torch.Tensor] = []
        before_flags: list[torch.Tensor] = []
        samples = None
        if tracked and (in_step or self._user_code_called_op()):
            if self.config.check_nonfinite:
                checks = [e[0] for e in tracked if checkable(e[0])]
                before_flags = max_abs(checks) if checks else []
            if self.config.change_stats and not in_step and self.step % self.config.stats_every == 0:
                samples = [_sample(e[0]) for e in tracked]
        return (tracked, hits, where, grad_mode, in_step, checks, before_flags, samples)

    def _after_write(self, func: Any, pre: Any) -> None:
        tracked, hits, where, grad_mode, in_step, checks, before_flags, samples = pre
        step = self.step
        for t, s in hits:
            if self.config.on_anomaly != "raise":
                self._saved_mutation(func, t, s, storage_key(t), where, grad_mode, after=True)
        if not tracked:
            return
        after_flags = max_abs(checks) if checks else []
        flag_of = {id(t): i for i, t in enumerate(checks)}
        infos = []
        for i, (t, key, vb, _st) in enumerate(tracked):
            try:
                va = t._version
            except Exception:
                va = None
            if _st is not None:
                leaf = _st.leaf()
                pname = self._names.param_name(leaf) if leaf is not None else None
                name = f"{pname}.grad" if pname else None
            else:
                name = self._names.lookup(t, key)
            change = None
            if samples is not None:
                change = _change(samples[i], t)
            raw = Raw(K.INPLACE_NO_GRAD, func, name, tuple(t.shape), t.dtype, t.device, vb, va,
                      grad_mode, change, where, step)
            if not in_step:
                self._record(raw)
                leaf_state = self._acc.get(t)
                if leaf_state is not None:  # the edit a later stale accumulation will point to
                    leaf_state.last_edit = where
            self._recent.recent.append(raw)
            j = flag_of.get(id(t))
            if j is not None:
                infos.append((j, raw))
        if infos:
            full = self._nonfinite.queue(
                [before_flags[j] for j, _ in infos], [after_flags[j] for j, _ in infos],
                [raw for _, raw in infos],
            )
            if full:
                self._nonfinite.resolve(self._report_nonfinite)

    def _saved_mutation(self, func: Any, t: torch.Tensor, s: Any, key: int | None,
                        where: Any, grad_mode: str, *, after: bool) -> None:
        name = self._names.name_of(t, key)
        try:
            version = t._version
        except Exception:
            version = None
        vb = (version - 1) if (after and version is not None) else version
        first = s[0]
        silent = after and first.alias._version == first.version
        op = _op_str(func)
        mutation = Mutation(name, tuple(t.shape), vb, version if after else None, op, where, self.step)
        if self._saved is not None:
            self._saved.mark(s, mutation, t if after and grad_mode == "enabled" else None)
        self._recent.recent.append(mutation)
        if silent:
            msg = (f"`{name}` was written in place by {op} through an alias with its own version "
                   "counter (.data/.detach()) while a pending graph saved it: torch cannot detect "
                   "this, backward will silently use the new values")
            vb = va = None
        else:
            msg = (f"`{name}` is modified in place by {op} while a graph that has not run backward "
                   f"yet saved it at version {first.version}: backward through that graph will fail "
                   "(or use the new values)")
            va = version if after else None
        self._anomaly(
            Raw(K.SAVED_TENSOR_MUTATED, op, name, tuple(t.shape), t.dtype, t.device, vb, va,
                grad_mode, None, where, self.step, msg, saved_tensor.HINT),
        )

    def _before_data_set(self, t: Any, value: Any) -> Any:
        if not isinstance(t, _Tensor) or _same_data(t, value):
            return None  # (``module.to()`` to the device it is on sets each .data to itself)
        name = self._names.param_name(t)
        if name is None and not t.requires_grad:
            return None
        return ("data_set", t, name, _version(t), caller())

    def _after_data_set(self, t: torch.Tensor, name: str | None, vb: int | None, where: Any) -> None:
        if self._user_step_depth:
            return
        mode = "inference_mode" if _inference_enabled() else (
            "enabled" if _grad_enabled() else "no_grad")
        self._record(Raw(K.INPLACE_NO_GRAD, "data.__set__", name, tuple(t.shape), t.dtype,
                         t.device, vb, _version(t), mode, None, where, self.step))
        if name is not None:
            self._names._add(name, t, param=True)

    # ------------------------------------------------------------------ grad flow
    def _cut(self, func: Any, source: torch.Tensor, out: torch.Tensor) -> None:
        name = self._names.param_name(source)
        frame = user_frame(2)
        where = (frame.f_code, frame.f_lineno) if frame is not None else None
        var = local_name(frame, source) or rebound_name(where)
        cut = Cut(_op_str(func), out, source, name or describe(source), where, self.step, var)
        st = self._acc.get(source)
        cut.trained = bool(id(source) in self._acc.trained or (st is not None and st.optimized))
        self._cuts.add(cut, source, watch_source=True)

    def _detached(self, func: Any, source: torch.Tensor, out: Any) -> None:
        frame = self._op_frame
        if frame is None or is_internal(frame.f_code):
            return
        if isinstance(out, _Tensor):
            name = self._names.param_name(source)
            op = "detach" if getattr(func, "__name__", "") == "detach" else ".data"
            cut = Cut(op, out, source, name or describe(source), (frame.f_code, frame.f_lineno),
                      self.step)
            self._cuts.add(cut, source, watch_source=False)

    def _raise_replaced(self) -> None:
        if not self._cuts.replaced:
            return
        for cut in self._cuts.take_replaced():
            r = cut.result()
            self._anomaly(Raw(
                K.GRAD_FLOW_CUT, cut.op, cut.source_name, cut.shape,
                r.dtype if r is not None else None, r.device if r is not None else None,
                None, None, "no_grad", None, cut.where, self.step,
                f"`{cut.var or cut.source_name}` was trained but has been replaced by a tensor "
                f"computed from it under no_grad ({cut.op}); the new tensor does not require grad "
                "and will never be trained",
                grad_flow.HINT_REBIND,
            ))

    # ------------------------------------------------------------------ accumulation
    def _hook_leaf(self, p: torch.Tensor) -> None:
        """Track ``p.grad``: each backward pass compares it before and after (no per-leaf hook)."""
        if id(p) in self._hooked or not p.requires_grad or not p.is_leaf:
            return
        self._hooked.add(id(p))
        self._leaf_refs.append(weakref.ref(p, functools.partial(_discard, self._hooked, id(p))))

    def _accumulations(self, refs: list[weakref.ref[torch.Tensor]], before: list[Any]) -> None:
        """After a backward pass: the leaves whose ``.grad`` it changed were accumulated into.
        ``refs`` is the list ``before`` was read from (pruning replaces the list, never edits it;
        leaves tracked since were appended: no ``.grad`` before)."""
        if "accumulation" in self._failed:
            return
        t0 = time.perf_counter()
        where = self._backward_where
        step = self._step if self._step_override is None else self.step
        entries = None
        if not any(before) and not self._cuts._watching:
            # The usual loop: no tracked leaf had a .grad; one record for the whole pass.
            try:
                entries = [(ref, id(p), id(g), g._version, p._version) for ref in refs
                           if (p := ref()) is not None and (g := p.grad) is not None]
            except RuntimeError:  # a tensor without a version counter: leaf by leaf below
                entries = None
        if entries is not None:
            if entries:
                self._acc.fresh_pass(entries, where)
                self._buffer.add_batch(LeafBatch(K.GRAD_ACCUMULATED, "backward",
                                                 [e[0] for e in entries], None, where, step,
                                                 self._names))
            self._busy += time.perf_counter() - t0
            return
        n = len(before)
        leaves = []
        fresh = []  # (leaf, grad): no .grad before this pass
        added = []  # (leaf, grad): summed into an existing .grad
        for i, ref in enumerate(refs):
            p = ref()
            if p is None:
                continue
            g = p.grad
            if g is None:
                continue
            prev = before[i] if i < n else None
            if prev is None:
                fresh.append((p, g))
            elif prev[0] == id(g) and prev[1] == g._version:
                continue  # not reached by this backward
            else:
                added.append((p, g))
            leaves.append(ref)
        if not leaves:
            self._busy += time.perf_counter() - t0
            return
        acc = self._acc
        if fresh:
            acc.fresh(fresh, where)
        stale = []
        for p, g in added:
            finding = acc.accumulated(p, g, False, where)
            if finding is not None:  # reported at once: an in-place edit changed the leaf
                stale.append((finding, p))
        if self._cuts._watching:
            for p, _ in fresh + added:
                self._cuts.source_trained(p)
        self._buffer.add_batch(LeafBatch(K.GRAD_ACCUMULATED, "backward", leaves, None, where,
                                         step, self._names))
        self._busy += time.perf_counter() - t0
        for st, p in stale:
            self._stale(st, where, p, edited=True)

    def _leaf_name(self, p: torch.Tensor | None) -> str:
        if p is None:
            return "tensor"
        return self._names.param_name(p) or describe(p)

    def _stale(self, st: acc_mod.LeafState, where: Any, p: torch.Tensor | None = None,
               edited: bool = False) -> None:
        p = p if p is not None else st.leaf()
        name = self._leaf_name(p)
        edit = location_of(st.last_edit) if edited and st.last_edit is not None else None
        cause = f"; it was last edited at {edit} (`{edit.code}`)" if edit is not None else ""
        self._anomaly(Raw(
            K.STALE_GRAD_ACCUMULATION, "backward", name,
            tuple(p.shape) if p is not None else None, p.dtype if p is not None else None,
            p.device if p is not None else None, None, None, "enabled", None, where, self.step,
            f"`{name}.grad` now sums gradients taken at different versions of `{name}` (it "
            f"changed between two backward passes and .grad was not zeroed{cause})",
            acc_mod.HINT_STALE,
        ))

    def _grad_read(self, p: Any, frame: Any) -> None:
        if not isinstance(p, _Tensor):
            return
        st = self._acc.get(p)
        if st is None or st.accum == 0 or st.read:
            return
        self._acc.grad_read(p, (frame.f_code, frame.f_lineno))

    def _grad_replaced(self, p: Any, value: Any) -> None:
        if not isinstance(p, _Tensor):
            return
        st = self._acc.get(p)
        if st is None:
            return
        old = p.grad
        if old is None or value is old:
            return
        # the user's line is looked up only when the dropped gradient was never used
        where = caller() if id(p) in self._acc.unconsumed else None
        self._grad_zeroing(st, old, where, "grad = None" if value is None else "grad =")

    def _grad_zeroing(self, st: acc_mod.LeafState, grad: torch.Tensor, where: Any, op: Any) -> None:
        if not self._acc.resetting(st, where) or self._acc_off:
            return
        if not finite_nonzero(grad):
            return
        p = st.leaf()
        name = self._leaf_name(p)
        self._anomaly(Raw(
            K.ACCUMULATED_GRAD_DISCARDED, op if isinstance(op, str) else _op_str(op),
            f"{name}.grad", tuple(grad.shape), grad.dtype, grad.device, None, None,
            "no_grad" if not _grad_enabled() else "enabled", None, where, self.step,
            f"`{name}.grad` held {st.accum} accumulated gradient(s) that no optimizer step used; "
            "they are discarded here",
            acc_mod.HINT_DISCARDED,
        ))

    def _wrap_zero_grad(self, wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        if (self.suspended or instance is None or "accumulation" in self._failed
                or _dynamo_compiling() or _compiler._is_compiling_flag):
            return wrapped(*args, **kwargs)
        try:
            # Usual case, right after a step with set_to_none: nothing unconsumed to check, and the
            # next backward sees each .grad start afresh (None before it): no per-leaf work here.
            set_to_none = args[0] if args else kwargs.get("set_to_none", True)
            if self._acc.has_unconsumed() or not set_to_none:
                t0 = time.perf_counter()
                with torch._C.DisableTorchFunction():
                    self._zero_grad_check(instance)
                self._busy += time.perf_counter() - t0
            # The resets are recorded: torch's own .grad reads and writes inside need no mode
            # (full). zero_grad switches no grad mode: light has nothing to step aside from.
            paused = self._full and self._pause_mode()
        except AnomalyError:
            raise
        except Exception as exc:
            self._fail("accumulation", exc)
            return wrapped(*args, **kwargs)
        if not paused:
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            self._resume_mode()

    def _zero_grad_check(self, owner: Any) -> None:
        if isinstance(owner, torch.optim.Optimizer):
            params = [p for g in owner.param_groups for p in g["params"]]
        elif isinstance(owner, torch.nn.Module):
            params = list(owner.parameters())
        else:
            return
        self._acc.sync()
        leaves = self._acc.leaves
        if not self._acc.unconsumed:  # the usual case right after a step: only mark the resets
            for p in params:
                st = leaves.get(id(p))
                if st is not None:
                    st.reset = True
            return
        where = None
        for p in params:
            st = leaves.get(id(p))
            if st is None or st.leaf() is not p or p.grad is None:
                continue
            if where is None:
                where = caller()
            self._grad_zeroing(st, p.grad, where, "zero_grad")

    def _call_paused(self, call: Callable, args: tuple, kwargs: dict) -> Any:
        """``call`` with the mode stepped aside (see :meth:`_pause_mode`), put back after."""
        if self._pause_mode():
            try:
                return call(*args, **kwargs)
            finally:
                self._resume_mode()
        return call(*args, **kwargs)

    # ------------------------------------------------------------------ data loading
    def _wrap_data_fetch(self, call: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        return self._call_paused(call, args, kwargs)

    # ------------------------------------------------------------------ gradient clipping
    def _wrap_clip(self, op: str, call: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        """``clip_grad_norm_`` and friends run as one bracketed unit, like an optimizer step: the
        mode and the grad-mode switch stay out of torch's own ops inside, and each ``.grad`` they
        changed is recorded afterwards as one ``inplace_no_grad`` event with its versions."""
        if self.suspended or self._closed or _dynamo_compiling() or _compiler._is_compiling_flag:
            return call(*args, **kwargs)
        t0 = time.perf_counter()
        args, kwargs, params = _with_parameter_list(args, kwargs)
        disabled = torch._C.DisableTorchFunction()
        with disabled:
            if self._saved:
                before = self._grads_before_write(op, params)
            else:
                before = [(p, g, g._version) for p in params
                          if isinstance(p, _Tensor) and (g := p.grad) is not None]
        where = caller(1)  # skip the boundary wrapper: the next frame called the function
        self.suspended = True  # grad-mode switches and the (light) mode: nothing to see inside
        paused = self._pause_mode()
        self._busy += time.perf_counter() - t0
        try:
            return call(*args, **kwargs)
        finally:
            self.suspended = False
            if paused:
                self._resume_mode()
            with disabled:
                try:
                    self._grads_written(op, before, where)
                except AnomalyError:
                    raise
                except Exception as exc:
                    self._fail("clipping", exc)

    def _grads_before_write(self, op: str, params: list[Any]) -> list[tuple[Any, Any, int]]:
        before = []
        saved = self._saved
        for p in params:
            g = p.grad if isinstance(p, _Tensor) else None
            if g is None:
                continue
            if saved:
                key = storage_key(g)
                s = saved.pending(key)
                if s is not None:
                    self._saved_mutation(op, g, s, key, caller(), "no_grad",
                                         after=False)
            before.append((p, g, g._version))
        return before

    def _grads_written(self, op: str, before: list[tuple[Any, Any, int]], where: Any) -> None:
        if "clipping" in self._failed:
            return
        t0 = time.perf_counter()
        changed = [(p, vb, va) for p, g, vb in before
                   if p.grad is g and (va := g._version) != vb]
        if changed:
            self._buffer.add_batch(LeafBatch(
                K.INPLACE_NO_GRAD, op, [weakref.ref(c[0]) for c in changed],
                [(c[1], c[2]) for c in changed], where,
                self._step if self._step_override is None else self.step, self._names))
        self._busy += time.perf_counter() - t0

    # ------------------------------------------------------------------ module discovery
    def _on_module_call(self, module: torch.nn.Module, args: Any) -> None:
        if _is_compiling():  # traced by dynamo: stay out of the graph
            return
        try:
            if self.suspended or self._names.knows_module(module):
                return
            prefix = ""
            if self._names.has_roots():  # a second model: prefix it by the user's variable name
                var = local_name(user_frame(2), module)
                prefix = f"{var or type(module).__name__}."
            with torch._C.DisableTorchFunction():
                for p in self._names.add_module(module, prefix):
                    self._hook_leaf(p)
                self._hook_fast_path_modules(module)
            self._last_discovery = self.step
        except Exception as exc:
            self._fail("naming", exc)

    # ------------------------------------------------------------------ fused inference paths
    def _hook_fast_path_modules(self, module: torch.nn.Module) -> None:
        """Attention and Transformer encoder modules in eval mode take a fused fast path unless
        a function mode is active: with gradwatch's mode their outputs would differ in the last
        bits, and so would any training they feed (distillation, pseudo-labels, EMA teachers).
        Their forward runs with the mode aside (library code that writes no tracked tensor),
        bracketed by per-module hooks (a wrapper around ``forward`` would break dynamo)."""
        for sub in module.modules():
            if isinstance(sub, _FAST_PATH_MODULES) and sub not in self._fast_path_modules:
                self._fast_path_modules.add(sub)
                pre = sub.register_forward_pre_hook(self._hook("mode", self._fast_path_enter))
                post = sub.register_forward_hook(self._hook("mode", self._fast_path_exit),
                                                 always_call=True)
                self._installed.add(pre.remove)
                self._installed.add(post.remove)

    def _fast_path_enter(self, module: torch.nn.Module, args: Any) -> None:
        if module.training or self._closed or _is_compiling():
            return  # (training never takes the fast path)
        paused = self._pause_mode()  # full: the mode off the stack; light: torch's own switch
        popped = (not self._full and self._light_mode_pushed
                  and threading.get_ident() == self._thread and _mode_stack_top() is self._mode)
        if popped:  # light, inside the user's no_grad block
            _pop_function_mode()
        if paused or popped:
            self._fast_path_stack.append((module, paused, popped, self.suspended))
            self.suspended = True

    def _fast_path_exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self._fast_path_stack
        if not stack or stack[-1][0] is not module:
            return
        _, paused, popped, self.suspended = stack.pop()
        if popped and not self._closed:
            _push_function_mode(self._mode)
        if paused:
            self._resume_mode()

    # ------------------------------------------------------------------ optimizer hooks
    def _optimizer_info(self, opt: torch.optim.Optimizer) -> _OptimizerInfo:
        last = self._last_optimizer
        if last is not None and last[0]() is opt:  # the usual case: the same optimizer again
            return last[1]
        info = self._optimizers.get(opt)
        if info is not None:
            self._last_optimizer = (weakref.ref(opt), info)
        if info is None:
            index = len(self._optimizers)
            step = inspect.unwrap(type(opt).step)
            code = getattr(step, "__code__", None)
            foreign = code is None or is_internal(code) or _is_library(code.co_filename)
            info = _OptimizerInfo(foreign, index, f"{type(opt).__name__}")
            self._optimizers[opt] = info
            if foreign:
                self._wrap_step_of(type(opt))
            for p in self._names.add_optimizer(opt):
                self._hook_leaf(p)
            for g in opt.param_groups:
                for p in g["params"]:
                    self._hook_leaf(p)
                    st = self._acc.state(p)
                    st.optimized = True
                    entry = self._cuts._watching.get(id(p))
                    if entry is not None:
                        entry[1].trained = True
        return info

    def _wrap_step_of(self, cls: type) -> None:
        """Step aside (see :meth:`_pause_mode`) for the whole ``step`` of a library optimizer
        class, from before torch's step wrapper (at full its ``record_function`` would otherwise
        pass through the mode twice per step) to after the post hooks, and step back in even if
        the step raised. The step hooks do the checking as before."""
        owner = next((c for c in cls.__mro__ if "step" in c.__dict__), None)
        if owner is None or owner in self._steps_wrapped or owner is torch.optim.Optimizer:
            return
        self._steps_wrapped.add(owner)  # (AdamW runs Adam's step: wrapped once, on Adam)
        self._installed.wrap_attribute(owner, "step", self._wrap_optimizer_step)

    def _wrap_optimizer_step(self, wrapped: Callable, instance: Any, args: tuple,
                             kwargs: dict) -> Any:
        if (instance is None or self._outer_step or self._closed or _dynamo_compiling()
                or _compiler._is_compiling_flag):
            return wrapped(*args, **kwargs)
        try:
            last = self._last_optimizer
            info = last[1] if last is not None and last[0]() is instance else \
                self._optimizers.get(instance)
            paused = info is not None and info.foreign and self._pause_mode()
        except Exception as exc:
            self._fail("optimizer hooks", exc)
            return wrapped(*args, **kwargs)
        if not paused:
            return wrapped(*args, **kwargs)
        suspended, self._outer_step = self.suspended, True
        try:
            return wrapped(*args, **kwargs)
        finally:  # also when the step raised (no post hook then): watching resumes at once
            self._outer_step = False
            self.suspended = suspended
            self._resume_mode()

    def _on_step_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        if (self._closed or _dynamo_compiling() or _compiler._is_compiling_flag
                or "optimizer hooks" in self._failed):
            return None
        t0 = time.perf_counter()
        result = None
        try:
            if self._mode_paused and not self._outer_step:
                self._resume_mode()  # a step that raised left it paused
            with torch._C.DisableTorchFunction():
                self.suspended = False
                last = self._last_optimizer  # the usual case: the same optimizer again
                info = (last[1] if last is not None and last[0]() is opt
                        else self._optimizer_info(opt))
                where = caller(1)  # skip the boundary hook: torch's step wrapper, then the caller
                state = {"where": where, "info": info, "samples": None, "updated": False}
                self._step_state[id(opt)] = state
                closure = args[1] if len(args) > 1 else kwargs.get("closure")
                if closure is not None:
                    result = self._wrap_closure(opt, state, args, kwargs, closure)
                else:
                    self._about_to_update(opt, state)
        except AnomalyError:
            self._busy += time.perf_counter() - t0
            raise
        except Exception as exc:
            self._fail("optimizer hooks", exc)
            return None
        if info.foreign:
            self.suspended = True
            self._pause_mode()
        else:
            self._user_step_depth += 1
        self._busy += time.perf_counter() - t0
        return result

    def _wrap_closure(self, opt: Any, state: dict, args: tuple, kwargs: dict, closure: Callable) -> Any:
        session = self

        def closure_watched(*a: Any, **k: Any) -> Any:
            suspended, depth = session.suspended, session._user_step_depth
            session.suspended = False
            session._user_step_depth = 0
            paused = session._resume_mode()
            try:
                out = closure(*a, **k)
            finally:
                session.suspended, session._user_step_depth = suspended, depth
                if paused:
                    session._pause_mode()
            with torch._C.DisableTorchFunction():
                if not state["updated"]:
                    session._guard("optimizer hooks", session._about_to_update, opt, state)
                else:  # called again within the step (LBFGS): the step reads these gradients
                    session._guard("accumulation", session._closure_grads_used, opt)
            return out

        if len(args) > 1:
            return (args[0], closure_watched, *args[2:]), kwargs
        kwargs = dict(kwargs)
        kwargs["closure"] = closure_watched
        return args, kwargs

    def _closure_grads_used(self, opt: torch.optim.Optimizer) -> None:
        self._acc.used_by_step([p for g in opt.param_groups for p in g["params"]
                                if p.grad is not None])

    def _about_to_update(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Right before the optimizer writes: saved-tensor, stale and consumption checks."""
        state["updated"] = True
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        state["params"] = params
        saved = self._saved
        if saved:
            where = state["where"]
            for p in params:
                s = saved.pending(storage_key(p))
                if s is not None:
                    self._saved_mutation("optimizer.step", p, s, storage_key(p), where,
                                         "no_grad", after=False)
        due = self._acc.stepped(params)
        for st in due:
            w = st.stale_where
            st.stale_where = None
            self._stale(st, w, st.leaf())
        try:
            state["versions"] = [p._version for p in params]
        except Exception:  # a tensor without a version counter (inference, odd subclasses)
            state["versions"] = [_version(p) for p in params]
        step = self._step if self._step_override is None else self.step
        if step % self.config.stats_every == 0:
            state["samples"] = _without_grad(_sample_step, params)

    def _on_step_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._closed or _dynamo_compiling() or _compiler._is_compiling_flag:
            return
        t0 = time.perf_counter()
        state = self._step_state.pop(id(opt), None)
        info = state["info"] if state is not None else None
        if info is not None and not info.foreign:
            self._user_step_depth = max(0, self._user_step_depth - 1)
        self.suspended = False
        if self._mode_paused and not self._outer_step:
            self._resume_mode()
        if state is None or "optimizer hooks" in self._failed:
            return
        # the step the events being flushed belong to
        step_before = self._step if self._step_override is None else self.step
        try:
            with torch._C.DisableTorchFunction():
                self._after_update(opt, info, state)
        except AnomalyError:
            raise
        except Exception as exc:
            self._fail("optimizer hooks", exc)
        self._busy += time.perf_counter() - t0
        if "flush" not in self._failed:
            try:
                self._step_boundary(step=step_before)
            except AnomalyError:
                raise
            except Exception as exc:
                self._fail("flush", exc)

    def _after_update(self, opt: Any, info: _OptimizerInfo, state: dict) -> None:
        params = state.get("params") or []
        versions = state.get("versions") or []
        where = state["where"]
        step = self._step if self._step_override is None else self.step
        self._recent_steps.append((where, step, list(map(id, params)), versions))
        change = None
        ratios = None
        samples = state.get("samples")
        if samples is not None:
            change, ratios = self._update_statistics(info, params, versions, samples, where, step)
        self._step += 1
        n = len(params)
        self._buffer.add(Raw(K.OPTIMIZER_UPDATE, "optimizer.step", info.label, None, None, None,
                             None, None, "no_grad", change, where, step,
                             info.messages.get(n) or info.message(n), "", ratios))

    def _update_statistics(self, info: _OptimizerInfo, params: list[Any], versions: list[Any],
                           samples: list[Any], where: Any, step: int) -> tuple[Any, Any]:
        """A statistics step: the update's size from the samples taken before it, and the queued
        NaN/Inf probe of the updated parameters, all from one fused norm call (read lazily)."""
        views, copies, pointers = samples
        kept, before, after = [], [], []
        for p, vb, view, copy, pointer in zip(params, versions, views, copies, pointers):
            if copy is None:  # not sampled
                continue
            if view is None or p.data_ptr() != pointer:  # no view kept, or .data rebound
                view = _sample(p)
                if view is None or view.shape != copy.shape:
                    continue
            kept.append((p, vb))
            before.append(copy)
            after.append(view)
        if not kept:
            return None, None
        params = [p for p, _ in kept]
        versions = [vb for _, vb in kept]
        k = len(params)
        check = self.config.check_nonfinite
        # One fused norm call for ‖before‖, ‖after‖, ‖Δ‖ of the samples and, for the NaN/Inf
        # probe, of each whole parameter; one vector, read at the flush (no sync here).
        vec = _without_grad(_update_norms, before, after, params if check else [])
        names = [self._names.param_name(p) or f"{info.name}{info.index}.param{i}"
                 for i, p in enumerate(params)]
        if check:
            lazy = [functools.partial(self._update_raw, weakref.ref(p), vb, where, step)
                    for p, vb in zip(params, versions)]
            self._nonfinite.queue_vector(vec, 0, 3 * k, lazy)  # sample before, whole after
        return None, UpdateStats(vec, names)

    # ------------------------------------------------------------------ backward
    def _wrap_backward(self, accumulates: bool, wrapped: Callable, instance: Any, args: tuple,
                       kwargs: dict) -> Any:
        if (self._closed or self._in_backward or "backward" in self._failed
                or _dynamo_compiling() or _compiler._is_compiling_flag):
            # torch.autograd.backward re-dispatches itself through the function mode: once is enough
            return wrapped(*args, **kwargs)
        before = None
        refs = self._leaf_refs
        disabled = torch._C.DisableTorchFunction()
        disabled.__enter__()
        try:
            roots = args[0] if args else kwargs.get("tensors", kwargs.get("outputs"))
            if isinstance(roots, _Tensor):
                roots = (roots,)
            elif roots:
                roots = tuple(r for r in roots if isinstance(r, _Tensor))
            else:
                roots = ()
            try:
                self._before_backward(roots)
            except AnomalyError:
                raise
            except Exception as exc:
                self._fail("backward", exc)
            if accumulates and "accumulation" not in self._failed:
                try:  # per tracked leaf: (id, version) of its .grad, None without one
                    before = [None if (g := None if (p := ref()) is None else p.grad) is None
                              else (id(g), g._version) for ref in refs]
                except Exception as exc:
                    self._fail("accumulation", exc)
        finally:
            disabled.__exit__(None, None, None)
        self._in_backward = True
        try:
            out = wrapped(*args, **kwargs)
        except RuntimeError as exc:
            self._in_backward = False
            self._guard("backward", self._annotate, exc, roots)
            if before is not None:  # what was accumulated before torch raised still counts
                try:
                    with torch._C.DisableTorchFunction():
                        self._guard("accumulation", self._accumulations, refs, before)
                except AnomalyError:
                    pass  # recorded; torch's own error is the one to see
            self._backward_where = None
            raise
        finally:
            self._in_backward = False
        if self._saved is not None:
            self._saved.sweep()  # this pass's graph is freed (unless retained): drop its entries
        if before is not None:
            disabled.__enter__()
            try:
                self._accumulations(refs, before)
            except AnomalyError:
                raise
            except Exception as exc:
                self._fail("accumulation", exc)
            finally:
                disabled.__exit__(None, None, None)
                self._backward_where = None
        self._backward_where = None
        return out

    def _before_backward(self, roots: tuple) -> None:
        t0 = time.perf_counter()
        self.suspended = False
        if self._mode_paused:
            self._resume_mode()
        self._user_step_depth = 0
        # skip _wrap_backward and the boundary wrapper (wrapt adds no frame)
        self._backward_where = caller(2)
        if self._discover_leaves > 0 and roots:
            new = self._discover(roots)
            self._discover_leaves = 8 if new else self._discover_leaves - 1
        if self._cuts.replaced:
            self._raise_replaced()
        self._busy += time.perf_counter() - t0

    def _discover(self, roots: tuple, limit: int = 20000) -> bool:
        """Find leaves of this graph not yet hooked (plain tensors with requires_grad)."""
        seen: set[int] = set()
        stack = [r.grad_fn for r in roots if r.grad_fn is not None]
        found = False
        while stack and len(seen) < limit:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if isinstance(var, _Tensor):
                if id(var) not in self._hooked:
                    self._names.add_leaf(var)
                    self._hook_leaf(var)
                    found = True
                continue
            stack.extend(nf for nf, _ in fn.next_functions if nf is not None)
        return found

    def _annotate(self, exc: RuntimeError, roots: tuple) -> None:
        if saved_tensor.is_version_error(exc):
            reported = key = None
            if self._saved is not None:
                reported, self._saved.last_failure = self._saved.last_failure, None
                key, self._saved.last_failure_key = self._saved.last_failure_key, None
            mutation = reported or self._explain_version(str(exc), key)
            exc.add_note(saved_tensor.note_text(mutation, light=not self._full))
            if mutation is not None and reported is None:
                self._anomaly(Raw(
                    K.SAVED_TENSOR_MUTATED, mutation.op, mutation.name, mutation.shape, None, None,
                    mutation.version_before, mutation.version_after, "no_grad", None,
                    mutation.where, mutation.step,
                    f"`{mutation.name}` was modified in place after a graph saved it; backward "
                    "failed on it", saved_tensor.HINT,
                ), raise_now=False)
        elif grad_flow.is_no_grad_root_error(exc):
            cut = self._cuts.explain(roots)
            if cut is not None:
                exc.add_note(f"gradwatch: the gradient was cut here: {cut.describe()}. "
                             f"Fix: {grad_flow.HINT_ROOT}.")
                r = cut.result()
                self._anomaly(Raw(
                    K.GRAD_FLOW_CUT, cut.op, cut.source_name, cut.shape,
                    r.dtype if r is not None else None, r.device if r is not None else None,
                    None, None, "no_grad", None, cut.where, self.step,
                    f"{cut.describe()}; backward was then called on a result without grad",
                    grad_flow.HINT_ROOT,
                ), raise_now=False)
            elif self._no_grad_regions:
                where, _ = self._no_grad_regions[-1]
                exc.add_note(
                    f"gradwatch: the loss does not require grad; the last no_grad block was "
                    f"entered at {location_of(where)} (`{_code(where)}`). Fix: {grad_flow.HINT_ROOT}."
                )
                self._anomaly(Raw(
                    K.GRAD_FLOW_CUT, "no_grad", describe(roots[0]) if roots else "loss",
                    tuple(roots[0].shape) if roots else None, None, None, None, None,
                    "no_grad", None, where, self.step,
                    "backward was called on a tensor computed without grad", grad_flow.HINT_ROOT,
                ), raise_now=False)

    def _explain_version(self, message: str, key: int | None = None) -> Mutation | None:
        """The write behind torch's version error: a recorded in-place write, else a recent
        optimizer step's write into a parameter that fits the error — on the failing storage
        (``key``, full), else of the error's shape (transposed first for 2-D), else its size."""
        m = self._recent.note_for(message)
        parsed = saved_tensor.parse_version_error(message)
        if parsed is None:
            return m
        shape, _now, expected = parsed
        if m is not None and m.version_before == expected:
            return m
        best, best_rank = None, 4
        for where, step, ids, versions in reversed(self._recent_steps):
            for pid, vb in zip(ids, versions):
                entry = self._names._params.get(pid)
                p = entry[1]() if entry else None
                if p is None or vb != expected or p.numel() != saved_tensor._numel(shape):
                    continue
                own = tuple(p.shape)
                # nn.Linear saves weight.t(): a 2-D error shape is the transpose most often
                rank = (0 if key is not None and storage_key(p) == key else
                        1 if (own[::-1] if len(own) == 2 else own) == shape else
                        2 if own == shape else 3)
                if rank < best_rank:
                    best_rank, best = rank, Mutation(entry[0], own, vb, vb + 1,
                                                     "optimizer.step", where, step)
            if best_rank == 0:
                break
        return best or m

    # ------------------------------------------------------------------ nonfinite
    def _update_raw(self, ref: weakref.ref[torch.Tensor], vb: int | None, where: Any,
                    step: int) -> Raw:
        """The record of an optimizer step's write into one parameter (built only when its NaN
        check fails)."""
        p = ref()
        return Raw(K.NONFINITE_INTRODUCED, "optimizer.step",
                   self._names.param_name(p) if p is not None else None,
                   tuple(p.shape) if p is not None else None, p.dtype if p is not None else None,
                   p.device if p is not None else None, vb, _version(p) if p is not None else None,
                   "no_grad", None, where, step)

    def _report_nonfinite(self, raw: Raw | Callable[[], Raw]) -> None:
        if callable(raw):
            raw = raw()
        name = raw.name or describe_raw(raw)
        if name in self._nonfinite.reported:
            return
        self._nonfinite.reported.add(name)
        op = raw.op if isinstance(raw.op, str) else _op_str(raw.op)
        self._anomaly(raw._replace(
            kind=K.NONFINITE_INTRODUCED, change=None,
            message=f"{op} wrote NaN/Inf into `{name}`, which was finite before",
            hint=nonfinite.HINT,
        ))


_LIGHT_TARGET: list[weakref.ref[Watch] | None] = [None]
_original_set_grad_enabled = torch._C._set_grad_enabled


def _light_set_grad_enabled(mode: bool) -> None:
    """Stands in for ``torch._C._set_grad_enabled`` during a light watch: push the function mode
    while grad is off. One module-level function (memoised once), holding the watch weakly."""
    _original_set_grad_enabled(mode)
    if _is_compiling():
        return
    ref = _LIGHT_TARGET[0]
    session = ref() if ref is not None else None
    if session is not None:
        session._on_grad_mode(mode)


def _discard(ids: set[int], key: int, _ref: Any) -> None:
    ids.discard(key)


_CLIP_OWNERS = (torch.nn.utils, torch.nn.utils.clip_grad)
# modules whose inference fast path is skipped while any function mode is active
_FAST_PATH_MODULES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                      torch.nn.TransformerEncoder)
_CLIP_FUNCTIONS = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "clip_grads_with_norm_")


def _with_parameter_list(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[Any]]:
    """The ``parameters`` argument of a clipping function as a list, and the call's arguments
    with an equivalent in its place: the list itself, or, for an empty generator, a fresh empty
    generator (torch warns about those; a generator can be read only once)."""
    if args:
        given = args[0]
    elif "parameters" in kwargs:
        given = kwargs["parameters"]
    else:
        return args, kwargs, []
    if isinstance(given, _Tensor):
        return args, kwargs, [given]
    params = list(given)
    again = params if params or not isinstance(given, types.GeneratorType) else (p for p in ())
    if args:
        return (again, *args[1:]), kwargs, params
    return args, {**kwargs, "parameters": again}, params


def describe_raw(raw: Raw) -> str:
    from ._records import describe_shape

    return describe_shape(raw.shape, raw.dtype)


def _op_str(func: Any) -> str:
    from ._records import _op

    return _op(func)


def _code(where: Any) -> str:
    loc = location_of(where)
    return loc.code if loc else ""


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:
        return None


def _stride(n: int) -> int:
    """Stride of the sample of an ``n``-element tensor: every element up to ``_SAMPLE_MIN``,
    else about one in ``1 / _SAMPLE_SHARE`` and at most ``_SAMPLE`` elements, so that the two
    copies a statistics step holds stay within 5% of the parameters' bytes."""
    k = min(_SAMPLE, max(_SAMPLE_MIN, int(n * _SAMPLE_SHARE)))
    return 1 if k >= n else -(-n // k)


def _sample(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of evenly strided elements of ``t`` (see :func:`_stride`); None for tensors
    whose values cannot be sampled cheaply (sparse, nested, meta, subclasses)."""
    if not checkable(t):
        return None
    flat = t.detach().reshape(-1)
    step = _stride(flat.numel())
    if step > 1:
        flat = flat[::step]
    return flat.clone()


def _without_grad(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with grad mode off, switched by torch's own function (no hook of ours)."""
    enabled = _grad_enabled()
    _original_set_grad_enabled(False)
    try:
        return fn(*args)
    finally:
        _original_set_grad_enabled(enabled)


def _sample_step(params: list[torch.Tensor]) -> tuple[list[Any], list[Any], list[int]]:
    """For a statistics step, before the optimizer writes: a strided view into each contiguous
    parameter (it shows the values after the update, no second sample needed), the sampled
    values now (one fused copy), and each parameter's data pointer (a rebound ``.data`` is
    sampled afresh). Other sampleable tensors get a copy and no view. Call without grad."""
    views: list[Any] = []
    copies: list[Any] = [None] * len(params)
    pointers: list[int] = []
    live, where = [], []
    for i, t in enumerate(params):
        view = None
        if checkable(t):
            if t.is_contiguous():
                step = _stride(t.numel())
                view = t.view(-1)[::step] if step > 1 else t.view(-1)
                live.append(view)
                where.append(i)
            else:
                copies[i] = _sample(t)
        views.append(view)
        pointers.append(t.data_ptr() if view is not None else 0)
    if live:
        try:
            fused = torch._foreach_mul(live, 1.0)  # exact copies (×1), one dispatch
        except Exception:
            fused = [v.clone() for v in live]
        for i, c in zip(where, fused):
            copies[i] = c
    return views, copies, pointers


def _update_norms(before: list[torch.Tensor], after: list[torch.Tensor],
                  whole: list[torch.Tensor]) -> torch.Tensor:
    """One vector: ‖before‖, ‖after‖, ‖after − before‖ per sample, then ‖p‖ per whole tensor."""
    delta = list(torch._foreach_sub(after, before))
    norms = torch._foreach_norm(before + after + delta + whole)
    try:
        return torch.stack(norms)
    except RuntimeError:  # mixed dtypes or devices
        return torch.stack([n.float().to(norms[0].device) for n in norms])


def _change(before: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor | None:
    if before is None or not checkable(t):
        return None
    after = _sample(t)
    if after.shape != before.shape:
        return None
    delta = (after - before).abs().float()
    l2 = delta.norm()
    ref = before.abs().float().norm()
    return torch.stack([l2, l2 / ref.clamp_min(1e-12), delta.max(),
                        (~torch.isfinite(after).all()).float()])


def _same_data(t: torch.Tensor, value: Any) -> bool:
    """Whether ``t.data = value`` changes nothing (the same memory, seen the same way)."""
    if value is t:
        return True
    try:
        return (isinstance(value, _Tensor) and value.data_ptr() == t.data_ptr()
                and value.device == t.device and value.dtype == t.dtype
                and value.shape == t.shape and value.stride() == t.stride())
    except Exception:  # no storage (meta, sparse, nested...): a change
        return False


def _is_library(filename: str) -> bool:
    return ("site-packages" in filename or "dist-packages" in filename
            or filename.startswith(sys.prefix + os.sep + "lib"))


def _process_group() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    env = os.environ
    rank = next((int(env[v]) for v in ("RANK", "LOCAL_RANK") if env.get(v, "").isdigit()), 0)
    world = int(env["WORLD_SIZE"]) if env.get("WORLD_SIZE", "").isdigit() else 1
    return rank, world
