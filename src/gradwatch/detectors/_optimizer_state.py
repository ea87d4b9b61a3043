"""Reading optimizers from outside: where a step keeps a state entry, and which live optimizers
hold which tensors (rare paths of :mod:`.accumulation`)."""

from __future__ import annotations

import ast
import gc
import inspect
import textwrap
import weakref
from typing import Any

import torch

__all__ = ["assignment_of", "grad_kept_in_state", "kept_each_step", "optimizers_holding"]


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

