"""Classify torch functions once (memoised) into what the function mode must do with them."""

from __future__ import annotations

from typing import Any

import torch
import wrapt

__all__ = ["ACTIONS", "Action", "classify"]


class Action:
    """Small ints, compared by identity on the hot path."""

    PASS = 0  # nothing to do (unless kwargs carry out= / inplace=True)
    INPLACE = 1  # mutates args[0]
    FOREACH = 2  # mutates every tensor of args[0]
    INIT = 3  # torch.nn.init.*_: mutates kwargs["tensor"] or args[0]
    GRAD_GET = 4  # reading p.grad
    GRAD_SET = 5  # p.grad = ...
    DATA_SET = 6  # p.data = ...
    DETACH = 7  # .detach() / .data read: a tensor cut from the graph
    EMBEDDING = 8  # F.embedding(max_norm=...) renormalises args[1] in place under no_grad
    KWARG_WRITE = 9  # out=... or inplace=True (decided per call, never memoised)
    NO_GRAD_OP = 10  # an out-of-place op with grad off (decided per call, never memoised)
    CUT = 11  # yields no grad from a tensor that may require it (argmax, comparisons, tensor())
    SCALAR = 12  # a Python value from a tensor (.item(), .tolist(), .numpy(), float())
    ZERO_GRAD = 13  # keeps a grad_fn whose gradient is zero (round, sign, floor, ceil, trunc)
    COUNT = 14  # the size of the mode's handler table


_INPLACE_DUNDERS = frozenset(
    {
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
        "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
        "__imatmul__",
    }
)
# End in "_" but change no values.
_NOT_DATA = frozenset(
    {"requires_grad_", "share_memory_", "detach_", "retain_grad_", "record_stream_",
     "_coalesced_", "_fix_weakref_", "rename_", "refine_names_", "align_to_",
     "_set_grad_enabled_", "set_grad_enabled_"}
)

# Functions whose result never requires grad (or is a Python value) while an input may: a cut
# when they take a tensor that requires grad in user code. Scalar extraction is everywhere in
# correct code (logging): it ranks below the others when a cut is sought (grad_flow).
NONDIFFERENTIABLE = frozenset({
    "argmax", "argmin", "argsort", "eq", "ne", "lt", "gt", "le", "ge", "greater", "less",
    "greater_equal", "less_equal", "__eq__", "__ne__", "__lt__", "__gt__", "__le__", "__ge__",
    "isclose", "bucketize", "searchsorted", "nonzero", "long", "int", "short", "bool", "byte",
    "char", "logical_and", "logical_or", "logical_not", "logical_xor",
    "tensor", "as_tensor",  # re-wrapping a value: the new tensor has no history
})
SCALAR = frozenset({"item", "tolist", "numpy", "__float__", "__int__"})
ZERO_GRADIENT = frozenset({"round", "sign", "floor", "ceil", "trunc", "fix", "special_round"})

ACTIONS: dict[Any, int] = {}
_FunctionWrapper = wrapt.FunctionWrapper


def classify(func: Any) -> int:
    """Decide once per function what the mode must do; remember the answer."""
    try:
        action = _classify(func)
    except Exception:
        action = Action.PASS
    if isinstance(func, _FunctionWrapper):
        return action  # a wrapper (gradwatch's own, around backward): memoised, it would pin it
    try:
        ACTIONS[func] = action
    except TypeError:  # unhashable callables: classify each time
        pass
    return action


def _classify(func: Any) -> int:
    name = getattr(func, "__name__", "") or ""
    owner = getattr(func, "__self__", None)
    if name in ("__get__", "__set__") and owner is not None:
        attr = getattr(owner, "__name__", "")
        if attr == "grad":
            return Action.GRAD_GET if name == "__get__" else Action.GRAD_SET
        if attr == "data":
            return Action.DETACH if name == "__get__" else Action.DATA_SET
        return Action.PASS
    if func is torch.nn.functional.embedding:
        return Action.EMBEDDING
    if name in _INPLACE_DUNDERS:
        return Action.INPLACE
    if name == "detach":
        return Action.DETACH
    if name in NONDIFFERENTIABLE:
        return Action.CUT
    if name in SCALAR:
        return Action.SCALAR
    if name in ZERO_GRADIENT:
        return Action.ZERO_GRAD
    if not name.endswith("_") or name.startswith("__") or name in _NOT_DATA:
        return Action.PASS
    if name.startswith("_foreach_"):
        return Action.FOREACH
    if getattr(func, "__module__", None) == "torch.nn.init":
        return Action.INIT
    if name in ("set_", "resize_", "resize_as_"):
        return Action.INPLACE
    if name.startswith("_") and name not in ("_copy_from_",):
        # private helpers such as _amp_foreach_non_finite_check_and_unscale_ take lists
        if name.startswith("_amp_foreach"):
            return Action.FOREACH
        return Action.PASS
    return Action.INPLACE

