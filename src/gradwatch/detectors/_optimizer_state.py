"""Reading optimizers from outside: where a step keeps a state entry, which live optimizers
hold which tensors, and a state entry that is ``.grad`` itself (rare paths of
:mod:`.accumulation`)."""

from __future__ import annotations

import ast
import gc
import inspect
import textwrap
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._context import RunContext
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw

__all__ = ["HINT_STATE_ALIAS", "StateAliasCheck", "assignment_of", "grad_kept_in_state",
           "kept_each_step", "optimizers_holding"]

HINT_STATE_ALIAS = (
    "store a copy (state[...] = grad.clone(), or copy_ into a buffer made once), not the .grad "
    "tensor itself"
)


def assignment_of(cls: type, key: Any) -> tuple[tuple[Any, int] | None, bool]:
    """``(code, line)`` of the statement in ``cls.step`` that assigns ``...[key] = ...`` (where an
    optimizer state entry is kept), if the source can be read; and whether that statement runs
    at every step (not only in a first-step ``if not state:`` / ``if len(state) == 0:`` block)."""
    try:
        fn = inspect.unwrap(cls.step)
        code = fn.__code__
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except Exception:
        return None, False
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for t in node.targets:
            if (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                    and t.slice.value == key):
                every = True
                up = parents.get(id(node))
                while up is not None:
                    if isinstance(up, ast.If) and "state" in ast.unparse(up.test):
                        every = False  # allocated once, when the state is created
                    up = parents.get(id(up))
                return (code, start + node.lineno - 1), every
    return None, False


def kept_each_step(cls: type, key: Any) -> bool:
    """Whether ``cls.step`` stores ``state[key]`` anew at every step (DiffGrad's
    ``state["previous_grad"] = grad``), not once when the state is created: a buffer kept
    on purpose is no stale reference."""
    return assignment_of(cls, key)[1]


def optimizers_holding() -> dict[int, tuple[str, weakref.ref]]:
    """id(tensor) -> (optimizer class name, weak reference to the tensor) for every tensor some
    live optimizer holds: one scan of the objects the garbage collector tracks."""
    found: dict[int, tuple[str, weakref.ref]] = {}
    optimizer = torch.optim.Optimizer
    for obj in gc.get_objects():
        if issubclass(type(obj), optimizer):  # (the real type: no __class__ lookup on obj)
            try:
                for group in obj.param_groups:
                    for p in group["params"]:
                        found.setdefault(id(p), (type(obj).__name__, weakref.ref(p)))
            except Exception:
                continue
    return found


def grad_kept_in_state(opt: Any, params: list[torch.Tensor]) -> tuple[torch.Tensor, Any] | None:
    """(parameter, key) of an entry of ``opt``'s state that *is* the parameter's current
    ``.grad`` (the same tensor, or its memory) and that ``opt.step`` stores anew at every step;
    None if there is none. Empty and sparse gradients are skipped."""
    state = opt.state
    for p in params:
        g = p.grad
        if g is None or g.layout != torch.strided or g.numel() == 0:
            continue
        entries = state.get(p)
        if not entries or not isinstance(entries, dict):
            continue
        for key, v in entries.items():
            if (v is g or (isinstance(v, torch.Tensor) and v.layout == torch.strided
                           and v.shape == g.shape and v.device == g.device
                           and v.data_ptr() == g.data_ptr())) and kept_each_step(type(opt), key):
                return p, key
    return None


class StateAliasCheck:
    """Before a step of an optimizer updates: an optimizer state entry that *is* a parameter's
    current ``.grad`` was kept by reference at an earlier step (``state["prev"] = grad``);
    zeroing in place and the next backward rewrote it, so the "previous" gradient the step
    reads is the current one. Checked at the first steps with state only (a structural bug: the
    same code runs every step), reported once per optimizer."""

    def __init__(self, ctx: RunContext, emit: Emitter, name: Callable[[Any], str]) -> None:
        self.ctx = ctx
        self.emit = emit
        self.name = name
        self._checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, opt: Any, params: list[torch.Tensor], where: Any) -> None:
        checks = self._checks
        n = checks.get(opt, 0)
        if n >= 3 or not opt.state:
            return
        checks[opt] = n + 1
        found = grad_kept_in_state(opt, params)
        if found is not None:
            checks[opt] = 3  # once per optimizer
            self._report(opt, *found, where)

    def _report(self, opt: Any, p: torch.Tensor, key: Any, where: Any) -> None:
        name = self.name(p)
        kept = assignment_of(type(opt), key)[0]
        self.emit.anomaly(Raw(
            EventKind.GRAD_READ_MID_WINDOW, "optimizer.step", f"{name}.grad", tuple(p.shape),
            p.dtype, p.device, None, None, "no_grad", None, kept or where, self.ctx.step(),
            f"{type(opt).__name__}'s state[{key!r}] of `{name}` is `{name}.grad` itself, kept by "
            "reference at an earlier step: zeroing .grad in place and the next backward "
            "rewrote it, so the step reads the current gradient where it expects an earlier one",
            HINT_STATE_ALIAS,
        ))
