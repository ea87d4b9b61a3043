"""``grad_flow_cut``: a tensor made without grad from one that required grad.

Cheap, weak provenance: a bounded ring of recent cuts (an op under no_grad whose input required
grad, ``.detach()``, ``.data``), each holding only a weak reference to its result. When backward
fails with "element 0 of tensors does not require grad", the ring names the cutting line. When a
trained leaf dies while a same-shaped tensor cut from it lives on (``w = w - lr * w.grad`` under
no_grad), the parameter has silently stopped training: that is reported at the cutting line.
"""

from __future__ import annotations

import linecache
import re
import weakref
from collections import deque
from collections.abc import Callable
from types import CodeType
from typing import Any

import torch

from .._context import RunContext
from .._location import (
    caller_of_forward,
    innermost_user_frame,
    is_internal,
    local_name,
    location_of,
    rebound_name,
    statement_start,
    user_frame,
)
from .._naming import describe
from ..errors import is_no_grad_root_error
from ..events import EventKind
from ..records.emit import Emitter
from ..records.raw import Raw, op_str
from ._cuts import Cut, CutTracker
from ._graph import ZERO_NODES, behind_zero_nodes

__all__ = ["Cut", "CutTracker", "GradFlowDetector"]

K = EventKind
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter

HINT_REBIND = (
    "update the tensor in place (w -= lr * w.grad, or w.copy_(...)) instead of rebinding it "
    "under no_grad, so it stays the leaf that requires grad"
)
_GRAD_READ = re.compile(r"([A-Za-z_][A-Za-z_0-9]*)\.grad\b")
_NO_BACKWARD = re.compile(r"'([\w.]+)' object has no attribute 'backward'")
_BACKWARD_CALL = re.compile(r"([A-Za-z_][A-Za-z_0-9]*)\.backward\(")
_NONE_ATTRIBUTE = re.compile(r"'NoneType' object has no attribute '(\w+)'")
# the types of the Python values each scalar read gives
_SCALAR_TYPES = {
    "item": lambda k: k in ("float", "int", "bool", "complex"),
    "tolist": lambda k: k in ("list", "float", "int", "bool", "complex"),
    "numpy": lambda k: k.startswith("numpy."),
    "__float__": lambda k: k == "float",
    "__int__": lambda k: k == "int",
}
HINT_CLOSURE = (
    "call the closure with grad enabled inside the step: `with torch.enable_grad(): loss = "
    "closure()` (torch's optimizers do this under their @torch.no_grad())"
)
HINT_ZERO = (
    "keep the rounding out of the gradient path, or use a straight-through estimator "
    "(y = x + (torch.round(x) - x).detach()) or a smooth surrogate (sigmoid, tanh) in training"
)
HINT_NONLEAF = (
    "update the tensor in place under torch.no_grad() (with torch.no_grad(): w -= lr * w.grad) "
    "instead of rebinding it to a computed tensor, so it stays the leaf that requires grad"
)
HINT_VALUE = (
    "call backward() on the tensor and take .item() (or float(), .tolist(), .numpy()) only for "
    "logging"
)
HINT_ROOT = (
    "compute the loss with grad enabled from tensors that require grad: do not build it under "
    "torch.no_grad(), from .detach()/.data, or from a tensor rebound under no_grad"
)


class GradFlowDetector:
    """Records cuts (ops under no_grad on a leaf that requires grad, ``.detach()``, ``.data``),
    reports a trained tensor replaced by a cut, and explains "does not require grad"."""

    def __init__(self, ctx: RunContext, emit: Emitter,
                 is_trained: Callable[[torch.Tensor], bool]) -> None:
        self.ctx = ctx
        self.emit = emit
        # whether a leaf is trained (a backward pass reached it, or an optimizer holds it)
        self.is_trained = is_trained
        self.cuts = CutTracker()
        # `with torch.no_grad():` blocks entered in user code: (where, step)
        self.no_grad_regions: deque[tuple[tuple[CodeType, int] | None, int]] = deque(maxlen=8)
        # cuts in user code since the last backward pass, oldest first: (rank, op, where, step);
        # rank 1: an op under a user no_grad block reading a tensor that requires grad (one per
        # user line), 2: a non-differentiable op or a re-wrapped value, 3: a scalar read
        self.window: deque[tuple[int, str, tuple[CodeType, int], int]] = deque(maxlen=64)
        self.region_open = False  # inside a user no_grad block (ops there may cut)
        # leaves re-made from values (torch.tensor(..., requires_grad=True)) since the last pass
        self.remade: list[weakref.ref] = []
        # zero-gradient ops (round, sign, floor, ...) on tensors requiring grad in user code
        # since the last backward: (id, sequence number) of the node -> (op, where); lines
        # seen harmless twice are not recorded any more
        self.zero_ops: dict[tuple[int, int], tuple[str, tuple[CodeType, int]]] = {}
        self._zero_harmless: dict[tuple[CodeType, int], int] = {}
        # an optimizer's step called its closure with grad off (its @torch.no_grad()): where
        # it called it and the optimizer's class name, until the next backward
        self.closure_no_grad: tuple[tuple[CodeType, int], str] | None = None
        self.off = False

    @property
    def watching(self) -> bool:
        return self.cuts.watching

    def no_grad_entered(self, frame: Any) -> None:
        """User code switched grad mode off at ``frame`` (the first frame outside torch)."""
        if not self.off and frame is not None and not is_internal(frame.f_code):
            self.no_grad_regions.append(((frame.f_code, frame.f_lineno), self.ctx.step()))
            self.region_open = True

    def noted(self, rank: int, func: Any, frame: Any) -> None:
        """A cut of ``rank`` (see ``window``) by ``func`` in the code at ``frame``; under no_grad
        (rank 1) once per user line in a row."""
        if rank == 1 and frame.f_code.co_name == "forward":
            frame = caller_of_forward(frame)  # `output = model(x)`, not a layer inside
        where = (frame.f_code, frame.f_lineno)
        window = self.window
        if rank == 1 and window and window[-1][0] == 1 and window[-1][2] == where:
            return
        window.append((rank, op_str(func), where, self.ctx.step()))

    def zero_gradient_op(self, func: Any, where: tuple[CodeType, int], out: Any) -> None:
        """``round``/``sign``/``floor``/``ceil``/``trunc`` on a tensor requiring grad, with grad
        on, at the user's ``where``, made ``out``: its node's gradient is zero everywhere."""
        fn = getattr(out, "grad_fn", None)
        if (fn is not None and type(fn).__name__ in ZERO_NODES
                and self._zero_harmless.get(where, 0) < 2 and len(self.zero_ops) < 64):
            self.zero_ops[(id(fn), fn._sequence_nr())] = (op_str(func), where)

    def zero_gradient_paths(self, roots: tuple, limit: int = 50000) -> None:
        """Before a backward, when zero-gradient ops ran since the last one: the trained leaves
        that this graph reaches only through such nodes get an exactly zero gradient (a
        rounded or sign-ed output in the loss path, no straight-through estimator)."""
        ops, self.zero_ops = self.zero_ops, {}
        found = behind_zero_nodes(roots, limit)
        if found is None:
            return
        reach, behind = found
        by_node: dict[tuple, list[torch.Tensor]] = {}
        for key, (v, node) in behind.items():
            if key not in reach and node in ops and (type(v) is _Parameter or self.is_trained(v)):
                by_node.setdefault(node, []).append(v)
        for node, (_op, where) in ops.items():
            if node not in by_node:  # not in this graph, or other paths carry the gradient
                self._zero_harmless[where] = self._zero_harmless.get(where, 0) + 1
        for node, leaves in by_node.items():
            op, where = ops[node]
            for v in leaves:
                name = self.ctx.names.param_name(v) or describe(v)
                self.emit.anomaly(Raw(
                    K.GRAD_FLOW_CUT, op, name, tuple(v.shape), v.dtype, v.device, None, None,
                    "enabled", None, statement_start(where), self.ctx.step(),
                    f"`{name}` reaches this loss only through {op}, whose gradient is zero "
                    "everywhere: backward gives it an exactly zero gradient, it never trains",
                    HINT_ZERO,
                ))

    def closure_without_grad(self, opt: Any, frame: Any) -> None:
        """``opt.step`` calls its closure (from the code at ``frame``) with grad disabled: the
        closure's loss has no history."""
        if frame is not None and not self.off:
            self.closure_no_grad = ((frame.f_code, frame.f_lineno), type(opt).__name__)

    def backward_done(self) -> None:
        """A backward pass ran (or failed and was explained): a new window of cuts starts."""
        self.closure_no_grad = None
        self.remade = []
        self.window.clear()
        self.region_open = False

    def _in_window(self) -> tuple[str, tuple[CodeType, int], int] | None:
        """The cut of this window most likely behind a root without grad: the latest before the
        backward, at the first line of its statement. Cuts made after the previous backward
        (logging its loss) come before it."""
        if not self.window:
            return None
        _rank, op, where, step = self.window[-1]
        return op, statement_start(where), step

    def no_grad_source(self, args: tuple) -> torch.Tensor | None:
        """Before an op under no_grad: the tensor requiring grad it reads, if any (a cut's
        source; the first tensor argument that requires grad decides)."""
        for a in args:
            if isinstance(a, _Tensor) and a.requires_grad:
                return a
        return None

    def no_grad_op(self, func: Any, source: torch.Tensor, out: Any) -> None:
        """After an op under no_grad read ``source``: a same-shaped result without grad is a
        cut (``p = p - lr * p.grad``)."""
        if not isinstance(out, _Tensor):
            return
        try:
            if not source.is_leaf:
                return
            # (a Parameter's arithmetic gives a plain Tensor: ``p = p - lr * p.grad``)
            same = ((type(out) is type(source)
                     or (type(source) is _Parameter and type(out) is _Tensor))
                    and not out.is_nested and source.shape == out.shape)
        except Exception:  # odd tensors (nested, symbolic shapes): no provenance for them
            return
        if not same or out.requires_grad:
            return
        name = self.ctx.names.param_name(source)
        frame = user_frame(2)
        where = (frame.f_code, frame.f_lineno) if frame is not None else None
        var = local_name(frame, source) or rebound_name(where)
        cut = Cut(op_str(func), out, name or describe(source), where, self.ctx.step(), var)
        cut.trained = self.is_trained(source)
        self.cuts.add(cut, source, watch_source=True)

    def detached(self, func: Any, source: torch.Tensor, out: Any, frame: Any) -> None:
        """``.detach()`` or ``.data`` read by the code at ``frame``."""
        if frame is None or is_internal(frame.f_code) or not isinstance(out, _Tensor):
            return
        name = self.ctx.names.param_name(source)
        op = "detach" if getattr(func, "__name__", "") == "detach" else ".data"
        cut = Cut(op, out, name or describe(source), (frame.f_code, frame.f_lineno),
                  self.ctx.step())
        self.cuts.add(cut, source, watch_source=False)
        self.window.append((2, op, cut.where, cut.step))

    def trained(self, leaves: list[torch.Tensor]) -> None:
        """These leaves received gradients: a cut replacing one of them matters."""
        for p in leaves:
            self.cuts.source_trained(p)

    def end_step(self) -> None:
        """Report each trained tensor that died while a tensor cut from it lives on."""
        if not self.cuts.replaced:
            return
        for cut in self.cuts.take_replaced():
            r = cut.result()
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, cut.op, cut.source_name, cut.shape,
                r.dtype if r is not None else None, r.device if r is not None else None,
                None, None, "no_grad", None, cut.where, self.ctx.step(),
                f"`{cut.var or cut.source_name}` was trained but has been replaced by a tensor "
                f"computed from it under no_grad ({cut.op}); the new tensor does not require grad "
                "and will never be trained",
                HINT_REBIND,
            ))

    def remade_leaf(self, out: Any) -> None:
        """``torch.tensor(values, requires_grad=True)`` in user code after a cut of this window:
        a leaf with no history (kept weakly until the next backward)."""
        if isinstance(out, _Tensor) and out.is_leaf and len(self.remade) < 64:
            self.remade.append(weakref.ref(out))

    def _only_remade(self, root: torch.Tensor, limit: int = 512) -> bool:
        """Whether ``root``'s graph reaches leaves re-made from values and nothing else."""
        remade = {id(t) for ref in self.remade if (t := ref()) is not None}
        if not remade:
            return False
        leaves, seen, stack = set(), set(), [root.grad_fn]
        while stack and len(seen) < limit:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if isinstance(var, _Tensor):
                if id(var) not in remade:
                    return False
                leaves.add(id(var))
                continue
            stack.extend(nf for nf, _ in fn.next_functions if nf is not None)
        return bool(leaves) and not stack

    def rewrapped_roots(self, roots: tuple, tracked: set[int]) -> None:
        """Before a backward: a root that is a fresh leaf (``torch.tensor(loss.item(),
        requires_grad=True)``), or computed only from leaves re-made from values
        (``torch.tensor([lp.item() ...], requires_grad=True).sum()``), reaches no parameter:
        nothing will be trained. Reported at the cut it was re-made from, when this window
        holds one."""
        # (only once an optimizer has stepped: a loop that optimises re-made leaves itself,
        # torch as a gradient calculator for numpy values, trains nothing else)
        remade = bool(self.remade) and self.ctx.steps > 0
        try:
            for r in roots:
                if not r.requires_grad or id(r) in tracked:
                    continue
                if r.grad_fn is not None and not (remade and self._only_remade(r)):
                    continue
                self._rewrapped(r)
                return
        finally:
            self.remade = []

    def _rewrapped(self, r: torch.Tensor) -> None:
        found = self._in_window()
        if found is None:
            return
        op, where, step = found
        loc = location_of(where)
        place = f"{loc} (`{loc.code}`)" if loc else "an unknown line"
        self.emit.anomaly(Raw(
            K.GRAD_FLOW_CUT, op, describe(r), tuple(r.shape), r.dtype, r.device, None, None,
            "enabled", None, where, step,
            f"backward was called on a tensor without history, re-made from a value cut at "
            f"{place} ({op}): the gradient reaches no parameter, nothing is trained",
            HINT_ROOT,
        ))

    def annotate(self, exc: RuntimeError, roots: tuple) -> bool:
        """Add a note naming the cut behind "does not require grad"; False if not that error."""
        if not is_no_grad_root_error(exc):
            return False
        if self.closure_no_grad is not None:
            where, opt = self.closure_no_grad
            loc = location_of(where)
            place = f"{loc} (`{loc.code}`)" if loc else "an unknown line"
            what = (f"{opt}.step calls the closure at {place} with grad disabled (the step runs "
                    "under torch.no_grad()): the loss it computes has no history")
            exc.add_note(f"gradwatch: the gradient was cut here: {what}. Fix: {HINT_CLOSURE}.")
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, "closure", describe(roots[0]) if roots else "loss",
                tuple(roots[0].shape) if roots else None, None, None, None, None, "no_grad",
                None, where, self.ctx.step(),
                f"{what}; backward was then called on it", HINT_CLOSURE,
            ), raise_now=False)
            return True
        cut = self.cuts.explain(roots, exact_only=bool(self.window))
        found = self._in_window() if cut is None else None
        if found is not None:  # a recorded Cut of that line describes it best (variable names)
            cut = next((c for c in reversed(self.cuts.ring) if c.result() is not None
                        and c.where is not None and statement_start(c.where) == found[1]), None)
            if cut is not None:
                found = None
        if found is not None:
            op, where, step = found
            loc = location_of(where)
            place = f"{loc} (`{loc.code}`)" if loc else "an unknown line"
            what = (f"{op} at {place} made a tensor without grad from one that required grad; "
                    "the loss was computed from it")
            exc.add_note(f"gradwatch: the gradient was cut here: {what}. Fix: {HINT_ROOT}.")
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, op, describe(roots[0]) if roots else "loss",
                tuple(roots[0].shape) if roots else None, None, None, None, None,
                "no_grad" if op == "no_grad" else "enabled", None, where, step,
                f"{what}; backward was then called on a result without grad", HINT_ROOT,
            ), raise_now=False)
        elif cut is not None:
            exc.add_note(f"gradwatch: the gradient was cut here: {cut.describe()}. "
                         f"Fix: {HINT_ROOT}.")
            r = cut.result()
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, cut.op, cut.source_name, cut.shape,
                r.dtype if r is not None else None, r.device if r is not None else None,
                None, None, "no_grad", None, cut.where, self.ctx.step(),
                f"{cut.describe()}; backward was then called on a result without grad",
                HINT_ROOT,
            ), raise_now=False)
        elif self.no_grad_regions:
            where, _ = self.no_grad_regions[-1]
            loc = location_of(where)
            exc.add_note(
                f"gradwatch: the loss does not require grad; the last no_grad block was "
                f"entered at {loc} (`{loc.code if loc else ''}`). Fix: {HINT_ROOT}."
            )
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, "no_grad", describe(roots[0]) if roots else "loss",
                tuple(roots[0].shape) if roots else None, None, None, None, None,
                "no_grad", None, where, self.ctx.step(),
                "backward was called on a tensor computed without grad", HINT_ROOT,
            ), raise_now=False)
        return True

    # -- the Python errors that follow a cut (seen when they leave the watch) -----------------
    def explain_error(self, exc: BaseException) -> None:
        """Add a note to a Python error that a cut explains: ``.backward()`` called on a Python
        number (the loss went through ``.item()``/``.tolist()``/``.numpy()``/``float()``), or a
        ``.grad`` that is None because the tensor in use is a cut's result (rebound under
        no_grad) or a computed, non-leaf tensor (rebound with grad on)."""
        if self.off or not isinstance(exc, (AttributeError, TypeError)):
            return
        text = str(exc)
        if "'NoneType'" not in text and "has no attribute 'backward'" in text:
            self._explain_value_error(exc)
        elif "'NoneType'" in text:
            self._explain_none_grad(exc)

    def _explain_value_error(self, exc: BaseException) -> None:
        """``NAME.backward()`` on a Python value that the latest scalar cut made: the value's
        type fits the op and the cut's statement assigns ``NAME``."""
        m = _NO_BACKWARD.search(str(exc))
        frame, lineno = innermost_user_frame(exc)
        if m is None or frame is None:
            return
        called = _BACKWARD_CALL.search(linecache.getline(frame.f_code.co_filename, lineno))
        if called is None:
            return
        name, kind = called.group(1), m.group(1)
        for rank, op, where, step in reversed(self.window):
            if rank != 3 or not _SCALAR_TYPES.get(op, lambda k: False)(kind):
                continue
            where = statement_start(where)
            loc = location_of(where)
            if loc is None or not re.search(rf"\b{re.escape(name)}\s*[-+*/]?=(?!=)", loc.code):
                continue
            what = (f"the loss became a Python value at {loc} (`{loc.code}`) ({op}): it has no "
                    "history")
            exc.add_note(f"gradwatch: {what}. Fix: {HINT_VALUE}.")
            self.emit.anomaly(Raw(
                K.GRAD_FLOW_CUT, op, name, None, None, None, None, None, "enabled", None, where,
                step, f"{what}; backward() was then called on it", HINT_VALUE,
            ), raise_now=False)
            return

    def _explain_none_grad(self, exc: BaseException) -> None:
        frame, lineno = innermost_user_frame(exc)
        if frame is None:
            return
        line = linecache.getline(frame.f_code.co_filename, lineno)
        attr = _NONE_ATTRIBUTE.search(str(exc))
        if attr is not None and f".grad.{attr.group(1)}" not in line:
            return  # some other None on that line
        names = dict.fromkeys(_GRAD_READ.findall(line))  # `w` of each `w.grad` on that line
        if not names:
            return
        try:
            scope = dict(frame.f_globals)
            scope.update(frame.f_locals)  # (the frame is over: its locals live as long as it)
        except Exception:
            return
        live = {id(r): c for c in self.cuts.ring if (r := c.result()) is not None}
        for name in names:
            value = scope.get(name)
            if not isinstance(value, _Tensor) or value.grad is not None:
                continue
            cut = live.get(id(value))
            if cut is not None and cut.result() is value:
                exc.add_note(
                    f"gradwatch: `{name}.grad` is None because `{name}` is no longer the tensor "
                    f"that was trained: {cut.describe()}. Fix: {HINT_REBIND}.")
                self.emit.anomaly(Raw(
                    K.GRAD_FLOW_CUT, cut.op, cut.source_name, cut.shape, value.dtype,
                    value.device, None, None, "no_grad", None, cut.where, self.ctx.step(),
                    f"`{name}` was replaced by a tensor computed from it under no_grad "
                    f"({cut.op}); its .grad stays None and it is never trained", HINT_REBIND,
                ), raise_now=False)
                return
            if value.requires_grad and value.grad_fn is not None:
                node = type(value.grad_fn).__name__
                exc.add_note(
                    f"gradwatch: `{name}.grad` is None because `{name}` is not a leaf: it holds "
                    f"a computed tensor ({node}), rebound with grad enabled, so backward() does "
                    f"not fill its .grad. Fix: {HINT_NONLEAF}.")
                return
