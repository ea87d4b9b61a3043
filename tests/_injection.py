"""Fault and interrupt injection into gradwatch's own code (issue 17): the sites where an
exception is injected, the tracer that raises there, the training loop, and what a run left
behind. Used by ``tests/test_injection.py``.

Sites. Every code object of gradwatch's core (every module under ``src/gradwatch`` but the
edges: ``cli``, ``report``, ``lightning``, ``tb_plugin``, ``__main__``), nested functions,
closures and comprehensions included, gives

* a **call** site: the function raises on entry of its k-th call (as if monkeypatched to
  raise; what a RecursionError, a MemoryError or a Ctrl-C at a call does), and
* a **line** site per source line holding a call (a statement, or the header expression of an
  ``if``/``while``/``for``): it raises just before the k-th execution of that line, inside
  whatever ``try`` encloses it (a failing torch op, a broken user object). Lines that only hand
  the user's own call on (``func(*args, **kwargs)``, ``wrapped(...)``, ``closure(...)``: see
  ``PASSTHROUGH``) are not gradwatch's failures and are left out, and so are ``with`` headers
  (their second line event is the exit, which a raise there would skip: Python itself never
  skips an ``__exit__``).

Faults (``Exception`` subclasses) are not injected into the fail-open barrier itself
(``_failopen.py``, ``Installed.undo``) nor at lines whose only calls go to it or to builtins
that cannot fail on gradwatch's own values (``BARRIER_CALLS``, ``TRIVIAL_CALLS``): a fault
models an error of a part's work, which the barrier is there to catch. Interrupts
(``KeyboardInterrupt``) are injected everywhere (Ctrl-C can arrive anywhere), except in weakref
callbacks, where Python itself prints and drops any exception. A generator's "call" event is
each resumption (its close by the GC included): generators get line sites only.

A **pool** is the sites one clean watched run of :func:`train` executes, each with how many
times (``Counter``); an injected run raises at the k-th hit of one site (``Injector``).
Exceptions are raised from a ``sys.settrace`` function: CPython raises them in the traced
frame, at the function's entry (``call`` event) or at the line (``line`` event), and switches
the tracer off. One fault per run, so a site that runs only after a fault (an ``except`` body,
``warn_internal``) is never in a pool.

Determinism: process-wide memo caches of gradwatch are cleared before every run
(``reset_caches``) and the cyclic GC is paused during it, so that a run repeats the pool's
sequence of calls exactly and the k-th hit is the same point every time.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import gc
import importlib
import inspect
import os
import pkgutil
import sys
import types
import warnings
from collections import Counter as _Counts
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.modules.module as _module
from torch import nn
from torch.optim import optimizer as _optimizer
from torch.utils.data import DataLoader, TensorDataset

import gradwatch

# -- what is injected -------------------------------------------------------------------------


class InjectedFault(Exception):
    """An internal error of gradwatch (an unusual type: nothing real raises it)."""


class InjectedRuntimeError(RuntimeError):
    """An internal error that looks like torch's (``except RuntimeError`` handlers see it)."""


FAULTS: tuple[type[BaseException], ...] = (InjectedFault, InjectedRuntimeError)
INJECTED_TEXT = "injected by tests/_injection.py"

# -- the sites --------------------------------------------------------------------------------

EDGES = ("gradwatch.cli", "gradwatch.report", "gradwatch.lightning", "gradwatch.tb_plugin",
         "gradwatch.__main__")
# Names under which gradwatch holds the user's (or torch's) own callable and calls it on the
# user's behalf: a raise on such a line would be the user's exception, not gradwatch's.
PASSTHROUGH = frozenset({"func", "wrapped", "call", "closure", "forward", "original",
                         "_original_set_grad_enabled"})
# The fail-open barrier itself (``_failopen.py``: guard, hook, wrapper, fail, warn_internal)
# and the calls into it, and builtins that cannot fail on gradwatch's own values: faults are
# not injected there (a fault is an error of a part's work, which the barrier catches).
# Interrupts are: Ctrl-C can arrive anywhere, barriers included.
BARRIER_FILES = ("_failopen.py",)
BARRIER_FUNCTIONS = frozenset({"Installed.undo"})  # the cleanup barrier
BARRIER_CALLS = frozenset({"guard", "fail", "is_off", "_fail", "_failed", "warn_internal",
                           "on_fail", "_on_light_fail", "_mode_failed", "on_error"})
TRIVIAL_CALLS = frozenset({"bool", "isinstance", "id", "type", "len"})
# Called by the interpreter when a tensor dies: Python itself prints and drops any exception
# raised there ("Exception ignored in"), a Ctrl-C included, whatever gradwatch does, and no
# callback can guard its own entry. Faults are injected at their lines (a fault there would be
# printed), not at their entry; interrupts not at all.
WEAKREF_CALLBACKS = frozenset({"_discard", "CutTracker.add.<locals>._died"})
_GENERATOR = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def core_modules() -> list[types.ModuleType]:
    mods = []
    for info in pkgutil.walk_packages(gradwatch.__path__, "gradwatch."):
        if info.name.startswith(EDGES):
            continue
        mods.append(importlib.import_module(info.name))
    return [gradwatch, *mods]


def _filename(mod: types.ModuleType) -> str | None:
    f = getattr(mod, "__file__", None)
    return f if f and f.endswith(".py") else None


CORE_FILES: dict[str, str] = {f: m.__name__ for m in core_modules() if (f := _filename(m))}
for _name in getattr(gradwatch, "_EXPORTS", {}):  # resolve the lazy exports once, here: a run
    getattr(gradwatch, _name)                     # never imports (its calls are the pool's)


def _own_exprs(node: ast.stmt) -> list[ast.AST]:
    """The expressions a statement evaluates at its own line (not its body)."""
    if isinstance(node, (ast.If, ast.While)):
        return [node.test]
    if isinstance(node, (ast.For, ast.AsyncFor)):
        return [node.iter]
    if isinstance(node, ast.Match):
        return [node.subject]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Try,
                         ast.With, ast.AsyncWith, ast.Import, ast.ImportFrom)):
        return []
    return [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.expr)]


def _calls(expr: ast.AST) -> Iterator[ast.Call]:
    """Calls evaluated by ``expr`` itself (not inside a lambda, whose body runs later)."""
    stack = [expr]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, ast.Call):
            yield n
        stack.extend(ast.iter_child_nodes(n))


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _barrier(call: ast.Call) -> bool:
    """A call into the fail-open barrier: a FailOpen method (``fail.guard(...)``,
    ``self.fail.fail(...)``, ...) or one of ``BARRIER_CALLS``, or a trivial builtin."""
    f = call.func
    if isinstance(f, ast.Attribute):
        owner = f.value
        if (isinstance(owner, ast.Name) and owner.id == "fail") or (
                isinstance(owner, ast.Attribute) and owner.attr == "fail"):
            return True
    return _callee(call) in BARRIER_CALLS | TRIVIAL_CALLS


_RAISABLE: dict[str, dict[int, str]] = {}
_FAULTABLE: dict[str, set[int]] = {}


def raisable_lines(filename: str) -> dict[int, str]:
    """``{line: source text}`` of the lines of ``filename`` that hold a call of gradwatch's."""
    lines = _RAISABLE.get(filename)
    if lines is None:
        with open(filename, encoding="utf-8") as fh:
            source = fh.read()
        text = source.splitlines()
        lines = {}
        faultable = set()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.stmt):
                continue
            calls = [c for e in _own_exprs(node) for c in _calls(e)]
            if not calls or any(isinstance(c.func, ast.Name) and c.func.id in PASSTHROUGH
                                for c in calls):
                continue
            lines[node.lineno] = text[node.lineno - 1].strip()
            if not all(_barrier(c) for c in calls):
                faultable.add(node.lineno)
        _RAISABLE[filename] = lines
        _FAULTABLE[filename] = set() if filename.endswith(BARRIER_FILES) else faultable
    return lines


@dataclass(frozen=True)
class Site:
    """One place an exception can be injected: a call site (``line`` None) or a line site."""

    code: CodeType = field(compare=True)
    line: int | None

    @property
    def module(self) -> str:
        return CORE_FILES[self.code.co_filename]

    @property
    def qualname(self) -> str:
        return self.code.co_qualname

    @property
    def text(self) -> str:
        return "" if self.line is None else raisable_lines(self.code.co_filename)[self.line]

    @property
    def interruptible(self) -> bool:
        """Whether interrupts are injected here."""
        return self.code.co_qualname not in WEAKREF_CALLBACKS

    @property
    def faultable(self) -> bool:
        """Whether faults are injected here (interrupts are injected everywhere)."""
        filename = self.code.co_filename
        if filename.endswith(BARRIER_FILES) or self.code.co_qualname in BARRIER_FUNCTIONS:
            return False
        if self.line is None:
            return self.code.co_qualname not in WEAKREF_CALLBACKS
        raisable_lines(filename)
        return self.line in _FAULTABLE[filename]

    @property
    def key(self) -> str:
        """Stable across edits elsewhere in the file: module, function, and the line's text
        (and its ordinal among identical lines of the function)."""
        base = f"{self.module.removeprefix('gradwatch.')}:{self.qualname}"
        if self.line is None:
            return f"{base} (call)"
        same = sorted(ln for (c, ln) in _lines_of(self.code) if raisable_lines(
            c.co_filename).get(ln) == self.text)
        nth = same.index(self.line) if self.line in same else 0
        return f"{base}: `{self.text}`" + (f" #{nth + 1}" if len(same) > 1 else "")

    def __str__(self) -> str:
        where = f"{os.path.basename(self.code.co_filename)}:{self.line or self.code.co_firstlineno}"
        return f"{self.key} [{where}]"


def _lines_of(code: CodeType) -> set[tuple[CodeType, int]]:
    raisable = raisable_lines(code.co_filename)
    return {(code, ln) for _, _, ln in code.co_lines() if ln in raisable}


# -- the tracers ------------------------------------------------------------------------------


class Counter:
    """Counts every site a run executes (the pool)."""

    def __init__(self) -> None:
        self.hits: _Counts[Site] = _Counts()
        self._calls: _Counts[CodeType] = _Counts()
        self._lines: _Counts[tuple[CodeType, int]] = _Counts()
        self._raisable = {f: raisable_lines(f) for f in CORE_FILES}

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename not in self._raisable or code.co_name == "<module>":
            return None
        self._calls[code] += 1
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            code = frame.f_code
            if frame.f_lineno in self._raisable[code.co_filename]:
                self._lines[(code, frame.f_lineno)] += 1
        return self._local

    def finish(self) -> None:
        for code, n in self._calls.items():
            if not code.co_flags & _GENERATOR:  # (a generator's "call" is each resumption,
                self.hits[Site(code, None)] = n  # its close by the GC included: lines only)
        for (code, line), n in self._lines.items():
            self.hits[Site(code, line)] = n


class Injector:
    """Raises ``exc_type`` at the ``k``-th hit of ``site`` (then CPython unsets the tracer)."""

    def __init__(self, site: Site, k: int, exc_type: type[BaseException],
                 on_fire: Callable[[], None] | None = None) -> None:
        self.site, self.k, self.exc_type = site, k, exc_type
        self.code, self.line = site.code, site.line
        self.on_fire = on_fire
        self.n = 0  # hits so far
        self.fired = False

    def _raise(self) -> None:
        self.fired = True
        if self.on_fire is not None:
            self.on_fire()
        if self.exc_type is KeyboardInterrupt:
            raise KeyboardInterrupt
        raise self.exc_type(f"{INJECTED_TEXT} at {self.site} (hit {self.k})")

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is not self.code:
            return None
        if self.line is None:
            self.n += 1
            if self.n == self.k:
                self._raise()
            return None
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == self.line:
            self.n += 1
            if self.n == self.k:
                self._raise()
        return self._local


@contextlib.contextmanager
def tracing(tracer: Callable[..., Any] | None) -> Iterator[None]:
    """``tracer`` as this thread's trace function; the cyclic GC paused (determinism)."""
    with warnings.catch_warnings():  # (what earlier runs left to finalize is not this run's)
        warnings.simplefilter("ignore")
        gc.collect()
    gc.disable()
    if tracer is not None:
        sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)
        gc.enable()


def reset_caches() -> None:
    """gradwatch's process-wide memo caches back to their import-time state (each run then
    makes the same calls, cold caches included)."""
    from gradwatch import _location
    from gradwatch._intercept import ops
    from gradwatch.detectors import _saved_registry
    from gradwatch.records import raw

    ops.ACTIONS.clear()
    _location._internal.clear()
    _location._locations.clear()
    _location._codes.clear()
    raw._OP_NAMES.clear()
    raw._DTYPE_NAMES.clear()
    _saved_registry._WORDING.clear()


# -- the training loop ------------------------------------------------------------------------

STEPS = 8  # two LBFGS closure steps (i = 3, 7); stats_every=3: statistics at steps 0, 3, 6


@dataclass
class Result:
    """What a run of :func:`train` produced (compared with torch.equal)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    steps_done: int = 0


def train(result: Result, steps: int = STEPS) -> None:
    """A small but representative loop: an MLP (BatchNorm, Dropout: the global RNG) fed by a
    shuffling DataLoader; SGD with momentum after clip_grad_norm_, zero_grad alternating
    set_to_none and the optimizer's and the module's; an LBFGS closure step every fourth step;
    an in-place edit under no_grad; a user's read of ``.grad``; an eval under no_grad through
    the model and an attention module (its fused fast path)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(2))
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(16, 2))
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3, history_size=3)
    out = result.tensors
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        if i % 4 == 3:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                lbfgs.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            loss = lbfgs.step(closure)
        else:
            loss = F.mse_loss(model(x), y)
            zero_grad = model.zero_grad if i % 3 == 2 else sgd.zero_grad
            zero_grad(set_to_none=i % 2 == 0)
            loss.backward()
            out[f"clip{i}"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with torch.no_grad():
                out[f"gradsum{i}"] = sum(p.grad.abs().sum() for p in model.parameters())
            sgd.step()
        with torch.no_grad():
            model[0].weight.mul_(0.999)
        out[f"loss{i}"] = loss.detach()
        result.steps_done = i + 1
    model.eval()
    attn.eval()
    with torch.no_grad():
        out["eval"] = model(torch.randn(5, 6, generator=g))
        q = torch.randn(2, 3, 8, generator=g)
        out["attn"] = attn(q, q, q, need_weights=False)[0]
    model.train()
    for name, t in model.state_dict().items():
        out[f"state.{name}"] = t.detach().clone()
    for j, st in enumerate(sgd.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"sgd{j}.{k}"] = v.clone()
    out["rng"] = torch.get_rng_state()


def differences(a: Result, b: Result) -> list[str]:
    """Tensors that are not torch.equal (or missing) between two runs."""
    diff = []
    for name in sorted(set(a.tensors) | set(b.tensors)):
        x, y = a.tensors.get(name), b.tensors.get(name)
        if x is None or y is None:
            diff.append(f"{name} missing")
        elif x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            diff.append(f"{name} differs")
    return diff


# -- what a run leaves behind -----------------------------------------------------------------

_CLIP_NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "clip_grads_with_norm_")
_CLIP_OWNERS = (torch.nn.utils, torch.nn.utils.clip_grad)
_ITER = torch.utils.data.dataloader._BaseDataLoaderIter
torch.optim.LBFGS([nn.Parameter(torch.zeros(1))])  # torch patches a class's step at first use
# Already compared by conftest's global_state (restored here all the same).
_IN_CONFTEST = {"autograd.backward", "autograd.grad", "Optimizer.zero_grad", "Module.zero_grad",
                "_C._set_grad_enabled", "graph.disable_saved_tensors_hooks", "Tensor.backward",
                "SGD.step", "Adam.step", "AdamW.step", "MultiheadAttention.forward",
                "TransformerEncoderLayer.forward", "TransformerEncoder.forward"}


def _slots() -> list[tuple[str, Any, str]]:
    """Attributes gradwatch replaces: (label, owner, attribute)."""
    slots = [("autograd.backward", torch.autograd, "backward"),
             ("autograd.grad", torch.autograd, "grad"),
             ("Optimizer.zero_grad", torch.optim.Optimizer, "zero_grad"),
             ("Module.zero_grad", torch.nn.Module, "zero_grad"),
             ("_C._set_grad_enabled", torch._C, "_set_grad_enabled"),
             ("graph.disable_saved_tensors_hooks", torch.autograd.graph,
              "disable_saved_tensors_hooks"),
             ("Tensor.backward", torch.Tensor, "backward"),
             ("_BaseDataLoaderIter.__next__", _ITER, "__next__")]
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.LBFGS):
        slots.append((f"{cls.__name__}.step", cls, "step"))
    for cls in (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder):
        slots.append((f"{cls.__name__}.forward", cls, "forward"))
    for owner in _CLIP_OWNERS:
        for name in _CLIP_NAMES:
            if name in vars(owner):
                slots.append((f"{owner.__name__}.{name}", owner, name))
    return slots


_SLOTS = _slots()
_MISSING = object()
_PRISTINE_VALUES = {label: vars(owner).get(attr, _MISSING) for label, owner, attr in _SLOTS}
_HOOK_DICTS = {
    "optimizer_pre_hooks": _optimizer._global_optimizer_pre_hooks,
    "optimizer_post_hooks": _optimizer._global_optimizer_post_hooks,
    "module_forward_pre_hooks": _module._global_forward_pre_hooks,
}
_PRISTINE_HOOKS = {k: list(d) for k, d in _HOOK_DICTS.items()}


def extra_state() -> dict[str, Any]:
    """What conftest's ``global_state`` does not look at: the other patched attributes, the
    active watch, light's stand-in target, torch-function and inference mode. (What atexit
    holds cannot be listed: the test checks instead that the watch's runtime is freed.)"""
    from gradwatch._intercept import gate

    state: dict[str, Any] = {label: id(vars(owner).get(attr)) for label, owner, attr in _SLOTS
                             if label not in _IN_CONFTEST}
    state.update({
        "active_watch": gradwatch.api.active_watch() is None,
        "light_target": gate._LIGHT_TARGET[0] is None,
        "torch_function_enabled": torch._C._is_torch_function_enabled(),
        "torch_function_stack": torch._C._len_torch_function_stack(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "saved_tensors_hooks_enabled": torch._C._autograd._saved_tensors_hooks_is_enabled(),
    })
    return state


PRISTINE_EXTRA = extra_state()


def refresh_pristine() -> None:
    """Take the pristine state now (at the module's first test), not at import: earlier test
    modules may have changed it legitimately (torch.compile wraps optimizer classes' step)."""
    global PRISTINE_EXTRA
    _PRISTINE_VALUES.update(
        {label: vars(owner).get(attr, _MISSING) for label, owner, attr in _SLOTS})
    PRISTINE_EXTRA = extra_state()


def extra_diff() -> dict[str, Any]:
    now = extra_state()
    return {k: (PRISTINE_EXTRA[k], now[k]) for k in now if now[k] != PRISTINE_EXTRA.get(k)}


def force_clean(watch: Any) -> None:
    """Put back everything a run left behind (so that the next case starts clean)."""
    from gradwatch import api
    from gradwatch._intercept import gate
    from gradwatch._intercept.mode import WatchMode

    if watch is not None:
        with contextlib.suppress(BaseException), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            watch._runtime.installed.undo()
        with contextlib.suppress(BaseException):
            atexit.unregister(watch._runtime.close)
        if api._active is watch:
            api._active = None
    gate._LIGHT_TARGET[0] = None
    for label, owner, attr in _SLOTS:
        value = _PRISTINE_VALUES[label]
        if vars(owner).get(attr, _MISSING) is not value:
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
    for key, hooks in _HOOK_DICTS.items():
        for handle in [h for h in hooks if h not in _PRISTINE_HOOKS[key]]:
            del hooks[handle]
    autograd = torch._C._autograd
    while autograd._top_saved_tensors_default_hooks(False) is not None:
        autograd._pop_saved_tensors_default_hooks()
    while torch._C._len_torch_function_stack() and isinstance(
            torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), WatchMode):
        torch._C._pop_torch_function_stack()
    torch._C._set_grad_enabled(True)
