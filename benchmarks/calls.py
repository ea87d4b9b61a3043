"""Calls per training step at each boundary between the loop and gradwatch: deterministic counts.

    python -m benchmarks.calls --model mlp --level full
    python -m benchmarks.calls --model mlp --level light --json runs/calls_mlp_light.json
    python -m benchmarks.calls --model mlp --level full --baseline runs/calls_mlp_full.json
    python -m benchmarks.calls --models mlp,shapes --levels none,full,light   # a summary table
    PYTHONPATH=/other/checkout/src python -m benchmarks.calls ...   # another gradwatch

Times scatter on a shared machine; these counts do not. Each entry into gradwatch between torch
kernels costs a few µs with cold caches, so the counts are what a refactor must keep (or cut).

The boundaries are found from what the watch installs, not from gradwatch's internal names, so
the same command measures code whose functions moved to other modules:

- ``mode``: the ``__torch_function__`` (``__torch_dispatch__``) of the torch modes gradwatch
  defines (``gradwatch._intercept.mode.WatchMode``; any such class in a gradwatch module);
- ``saved tensors``: the pack / unpack pair on top of torch's saved-tensor hook stack while the
  watch is active (``torch._C._autograd._top_saved_tensors_default_hooks``);
- ``wrapt``: every attribute of a torch module or class that the watch replaced by a wrapt
  ``FunctionWrapper`` (``torch.autograd.backward``, ``Optimizer.zero_grad``,
  ``clip_grad_norm_``, the optimizer's ``step``, ...), found by diffing the namespaces before and
  after entering the watch, and counted one by one;
- ``hook``: every gradwatch callable added to a hook dict: torch's global optimizer step pre/post
  hooks, the global module hooks, and the hook dicts of the model's modules, parameters and
  optimizer (one row per kind, summed over modules and parameters);
- ``replaced``: a torch attribute replaced by a plain gradwatch function (``light``'s grad-mode
  switch ``torch._C._set_grad_enabled``).

How they are counted: ``wrapt`` and ``hook`` rows by a counting layer put around each installed
object while the counted steps run (and taken off before the watch exits); the other rows, and
the per-function table, by a ``sys.setprofile`` hook that counts Python calls per code object
(generators count each resumption). The counting layer's frames carry a file name inside torch's
package so that gradwatch's user-frame lookup skips them as it skips torch's own frames. Two
passes over ``steps`` steps each: pass 1 counts by profile only (the function table); pass 2 adds
the counting layers (the boundary table), after one uncounted step with them on (gradwatch
memoises its frame filter per code object: the layers' code is new to it). If gradwatch's own
call counts differ between the passes, the report says so (and exits 1): the warmup was too short
for gradwatch's per-step work to settle (it drops its naming hook after the first steps), or the
layers perturbed gradwatch.

The per-function table is keyed by function name, whatever file the function lives in (for
comprehensions and lambdas: ``enclosing.<listcomp>``), so that the same table can be compared
across a refactor that moves functions between modules. Use ``steps`` a multiple of
``stats_every`` (10): statistics steps are then counted at their real rate (0.1/step = once per
statistics step). CPU only: a CUDA backward runs on torch's device threads, which the profile
hook does not see. gradwatch prunes dead tensors' entries every 50 optimizer steps: keep
``steps`` a multiple of 50 optimizer steps (the default 50; a GAN steps twice per step) or the
two passes may differ by one prune.

A spec that runs under a mode of the user's (``default_device``: ``torch.set_default_device``
pushes a ``DeviceContext``) also gets that mode's ``__torch_function__`` calls per step; compare
``--level none`` with ``full`` / ``light`` for what gradwatch adds to it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType, ModuleType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch

from ._models import SHAPES, SPECS

GW_DIR = os.path.dirname(os.path.abspath(gradwatch.__file__)) + os.sep
THIS_FILE = os.path.abspath(__file__)
_MISSING = object()

# The counting layers, compiled under a file name inside torch's package (see the docstring).
_COUNTER_FILE = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)),
                             "_benchmarks_calls_counter.py")
_COUNTER_SRC = '''
def wrapt_counter(box):
    def counting_wrapper(wrapped, instance, args, kwargs):
        box[0] += 1
        return wrapped(*args, **kwargs)
    return counting_wrapper


def hook_counter(box, hook):
    def counting_hook(*args, **kwargs):
        box[0] += 1
        return hook(*args, **kwargs)
    return counting_hook
'''
_counters: dict[str, Any] = {}
exec(compile(_COUNTER_SRC, _COUNTER_FILE, "exec"), _counters)


# ----------------------------------------------------------------------------------- discovery
def _code_of(obj: Any) -> CodeType | None:
    """The code that runs first when ``obj`` is called: a wrapt wrapper's wrapper function, a
    partial's function, a bound method's function; for a function decorated outside gradwatch
    (``contextmanager``), the decorated one."""
    for _ in range(20):
        if isinstance(obj, CodeType):
            return obj
        if hasattr(type(obj), "_self_wrapper"):  # a wrapt FunctionWrapper
            obj = obj._self_wrapper
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif inspect.ismethod(obj):
            obj = obj.__func__
        elif inspect.isfunction(obj):
            code = obj.__code__
            inner = getattr(obj, "__wrapped__", None)
            if inner is None or os.path.abspath(code.co_filename).startswith(GW_DIR):
                return code  # (gradwatch's own functools.wraps wrapper: itself)
            obj = inner
        elif callable(obj) and not isinstance(obj, type):  # an object with a Python __call__
            call = vars(type(obj)).get("__call__")  # (own class only: enough here)
            if not inspect.isfunction(call):
                return None
            obj = call
        else:
            return None
    return None


def _is_gradwatch(obj: Any) -> bool:
    code = _code_of(obj)
    return code is not None and os.path.abspath(code.co_filename).startswith(GW_DIR)


def _where(code: CodeType | None) -> str:
    if code is None:
        return "?"
    path = os.path.abspath(code.co_filename)
    if path.startswith(GW_DIR):
        path = "gradwatch/" + path[len(GW_DIR):]
    return f"{path}:{code.co_firstlineno} {getattr(code, 'co_qualname', code.co_name)}"


def _owner_label(owner: Any) -> str:
    if isinstance(owner, ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


def _namespaces(extra: list[type]) -> list[Any]:
    """torch's modules, the torch classes they define, and ``extra`` classes (MROs of the
    model's and optimizer's classes, ``torch.Tensor``)."""
    owners: dict[int, Any] = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "torch" or name.startswith("torch.")):
            continue
        owners[id(mod)] = mod
        for value in _vars(mod).values():
            if isinstance(value, type) and str(getattr(value, "__module__", "")).startswith("torch"):
                owners[id(value)] = value
    for cls in extra:
        owners[id(cls)] = cls
    return list(owners.values())


def _vars(owner: Any) -> dict[str, Any]:
    try:
        return dict(vars(owner))
    except TypeError:  # no __dict__
        return {}


def _snapshot(owners: list[Any]) -> dict[tuple[int, str], Any]:
    return {(id(o), k): v for o in owners for k, v in _vars(o).items()}


def _optimizers(opt: Any) -> list[Any]:
    """A spec's optimizer as a list: one, several (a GAN's two), or none (a hand-written update)."""
    if opt is None:
        return []
    return list(opt) if isinstance(opt, (list, tuple)) else [opt]


def _hook_dicts(model: torch.nn.Module, opt: Any) -> list[tuple[str, dict]]:
    """(kind, dict) for every hook dict a watch may add to: torch's global ones, the model's
    modules', its parameters' and the optimizers'."""
    found: list[tuple[str, dict]] = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "torch" or name.startswith("torch.")):
            continue
        for k, v in _vars(mod).items():
            if "hook" in k and isinstance(v, dict):
                found.append((f"{name}.{k}", v))
    for m in model.modules():
        for k, v in vars(m).items():
            if "hook" in k and isinstance(v, dict):
                found.append((f"modules.{k}", v))
    for p in model.parameters():
        for k in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            v = getattr(p, k, None)
            if isinstance(v, dict):
                found.append((f"parameters.{k}", v))
    for o in _optimizers(opt):
        for k, v in vars(o).items():
            if "hook" in k and isinstance(v, dict):
                found.append((f"optimizer.{k}", v))
    unique: dict[int, tuple[str, dict]] = {}  # a dict reached twice (a re-export): once
    for kind, d in found:
        unique.setdefault(id(d), (kind, d))
    return list(unique.values())


def _mode_codes() -> list[tuple[str, CodeType]]:
    """``__torch_function__`` / ``__torch_dispatch__`` of the mode classes gradwatch defines."""
    classes: dict[int, type] = {}
    with contextlib.suppress(Exception):
        from gradwatch._intercept.mode import WatchMode

        classes[id(WatchMode)] = WatchMode
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "gradwatch" or name.startswith("gradwatch.")):
            continue
        for value in _vars(mod).values():
            if (isinstance(value, type) and issubclass(value, (TorchFunctionMode, TorchDispatchMode))
                    and str(value.__module__).startswith("gradwatch")):
                classes[id(value)] = value
    out = []
    for cls in classes.values():
        for meth in ("__torch_function__", "__torch_dispatch__"):
            fn = cls.__dict__.get(meth)
            code = _code_of(fn) if fn is not None else None
            if code is not None:
                out.append((f"mode {cls.__name__}.{meth}", code))
    return out


@dataclass
class Boundary:
    label: str
    kind: str  # mode, saved tensors, wrapt, hook, replaced
    where: str
    code: CodeType | None = None  # counted by profile
    box: list[int] | None = None  # counted by a counting layer
    per_step: list[int] = field(default_factory=list)


@dataclass
class Installed:
    """What the watch installed, as found after its warmup steps."""

    boundaries: list[Boundary]
    layers: list[tuple[Callable[[], None], Callable[[], None]]]  # (put on, take off)
    other_changes: list[str]


def discover(before_ns: dict[tuple[int, str], Any], owners: list[Any],
             before_hooks: dict[int, set], hook_dicts: list[tuple[str, dict]],
             top_before: Any) -> Installed:
    boundaries: list[Boundary] = []
    layers: list[tuple[Callable[[], None], Callable[[], None]]] = []
    other: list[str] = []
    for label, code in _mode_codes():
        boundaries.append(Boundary(label, "mode", _where(code), code=code))
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and (top_before is None or top[0] is not top_before[0]):
        for which, fn in zip(("pack", "unpack"), top):
            code = _code_of(fn)
            boundaries.append(Boundary(f"saved tensors {which}", "saved tensors", _where(code),
                                       code=code))
    for owner in owners:
        for name, value in _vars(owner).items():
            if value is before_ns.get((id(owner), name), _MISSING):
                continue
            label = f"{_owner_label(owner)}.{name}"
            if isinstance(value, property) and any(
                    f is not None and _is_gradwatch(f) for f in (value.fget, value.fset)):
                other.append(label)  # a gradwatch property: its accesses are not counted
                continue
            if not _is_gradwatch(value):
                continue
            code = _code_of(value)
            if hasattr(type(value), "_self_wrapper"):
                box = [0]
                layers.append(_wrapt_layer(owner, name, value, box))
                boundaries.append(Boundary(f"wrapt {label}", "wrapt", _where(code), box=box))
            else:
                boundaries.append(Boundary(f"replaced {label}", "replaced", _where(code),
                                           code=code))
    by_kind: dict[str, Boundary] = {}
    for kind, d in hook_dicts:
        old_keys = before_hooks.get(id(d), set())
        for key, hook in list(d.items()):
            if key in old_keys or not callable(hook) or not _is_gradwatch(hook):
                continue
            label = f"hook {kind}"
            b = by_kind.get(label)
            if b is None:
                b = by_kind[label] = Boundary(label, "hook", _where(_code_of(hook)), box=[0])
                boundaries.append(b)
            assert b.box is not None
            layers.append(_hook_layer(d, key, hook, b.box))
    order = {"mode": 0, "saved tensors": 1, "wrapt": 2, "hook": 3, "replaced": 4}
    boundaries.sort(key=lambda b: (order.get(b.kind, 9), b.label))
    # one code counted by profile for two rows would count twice: merge the rows
    merged: dict[CodeType, Boundary] = {}
    result = []
    for b in boundaries:
        if b.code is not None and b.code in merged:
            merged[b.code].label += f" + {b.label}"
            continue
        if b.code is not None:
            merged[b.code] = b
        result.append(b)
    return Installed(result, layers, other)


def _wrapt_layer(owner: Any, name: str, value: Any, box: list[int]
                 ) -> tuple[Callable[[], None], Callable[[], None]]:
    import wrapt

    layer = wrapt.FunctionWrapper(value, _counters["wrapt_counter"](box))

    def on() -> None:
        setattr(owner, name, layer)

    def off() -> None:
        if vars(owner).get(name) is layer:
            setattr(owner, name, value)

    return on, off


def _hook_layer(d: dict, key: Any, hook: Any, box: list[int]
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    layer = _counters["hook_counter"](box, hook)

    def on() -> None:
        if d.get(key) is hook:
            d[key] = layer

    def off() -> None:
        if d.get(key) is layer:
            d[key] = hook

    return on, off


# ----------------------------------------------------------------------------------- counting
class CallCounter:
    """Python calls per code object, in this thread, while active (``sys.setprofile``)."""

    def __init__(self) -> None:
        self.counts: dict[CodeType, int] = {}

    def _hook(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            self.counts[code] = self.counts.get(code, 0) + 1

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        previous = sys.getprofile()
        sys.setprofile(self._hook)
        try:
            yield
        finally:
            sys.setprofile(previous)


def _count_steps(step: Callable[[], None], steps: int, boundaries: list[Boundary]
                 ) -> dict[CodeType, int]:
    counter = CallCounter()
    counts = counter.counts
    last = [b.box[0] if b.box is not None else 0 for b in boundaries]  # (a layer's earlier calls)
    with counter.active():
        for _ in range(steps):
            step()
            now = [b.box[0] if b.box is not None else counts.get(b.code, 0)  # type: ignore[arg-type]
                   for b in boundaries]
            for b, n, m in zip(boundaries, now, last):
                b.per_step.append(n - m)
            last = now
    return counts


def _function_table(counts: dict[CodeType, int], steps: int) -> tuple[dict[str, float],
                                                                    dict[str, str], float, float]:
    """gradwatch's calls per step by function name (any file), the files, the gradwatch total and
    the all-Python total (this tool's own frames excluded)."""
    per_name: dict[str, float] = {}
    files: dict[str, set[str]] = {}
    total_gw = total_all = 0.0
    for code, n in counts.items():
        path = os.path.abspath(code.co_filename)
        if path in (THIS_FILE, _COUNTER_FILE):
            continue
        total_all += n
        if not path.startswith(GW_DIR):
            continue
        total_gw += n
        name = code.co_name
        if name.startswith("<"):  # <listcomp>, <genexpr>, <lambda>: keyed by the enclosing one
            parts = [p for p in getattr(code, "co_qualname", name).split(".") if p != "<locals>"]
            name = ".".join(parts[-2:])
        per_name[name] = per_name.get(name, 0.0) + n / steps
        files.setdefault(name, set()).add(f"{path[len(GW_DIR):]}:{code.co_firstlineno}")
    return (per_name, {k: ", ".join(sorted(v)) for k, v in files.items()}, total_gw / steps,
            total_all / steps)


# ----------------------------------------------------------------------------------- driver
def _watch_fn() -> Callable[..., Any]:
    """``gradwatch.watch`` (the function, also where a lazy export made it the submodule)."""
    w = gradwatch.watch
    return w.watch if inspect.ismodule(w) else w


def measure(model_name: str, level: str, steps: int, warmup: int) -> dict[str, Any]:
    spec = SPECS[model_name]
    # a process-wide setting the loop runs under (``torch.set_default_device``): on throughout
    with spec.context() if spec.context else contextlib.nullcontext():
        return _measure(model_name, level, steps, warmup)


def _measure(model_name: str, level: str, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    spec = SPECS[model_name]
    model, opt, (x, y), step_fn = spec.build(False, torch.device("cpu"))

    def step() -> None:
        step_fn(model, opt, x, y)

    for _ in range(3):  # optimizer state, allocator caches
        step()
    extra = [*(c for o in _optimizers(opt) for c in type(o).__mro__), *type(model).__mro__,
             torch.Tensor]
    owners = _namespaces([c for c in extra if c is not object])
    before_ns = _snapshot(owners)
    top_before = torch._C._autograd._top_saved_tensors_default_hooks(False)
    hook_dicts_before = _hook_dicts(model, opt)
    before_hooks = {id(d): set(d) for _, d in hook_dicts_before}
    out: dict[str, Any] = {"model": model_name, "level": level, "steps": steps, "warmup": warmup,
                           "torch": torch.__version__, "gradwatch": gradwatch.__version__,
                           "gradwatch_dir": GW_DIR.rstrip(os.sep)}
    ctx: Any = (contextlib.nullcontext() if level == "none"
                else _watch_fn()(*((None, None) if spec.anonymous else (model, opt)),
                                 level=level, on_anomaly="log"))
    with ctx as session:
        for _ in range(warmup):
            step()
        owners = _namespaces([c for c in extra if c is not object])  # (classes created lazily)
        installed = discover(before_ns, owners, before_hooks, _hook_dicts(model, opt), top_before)
        # pass 1: profile only (the function table); pass 2: with the counting layers on
        counts1 = _count_steps(step, steps, [])
        for on, _ in installed.layers:
            on()
        try:
            step()  # uncounted, with the layers on (see the docstring)
            counts2 = _count_steps(step, steps, installed.boundaries)
        finally:
            for _, off in reversed(installed.layers):
                off()
        anomalies = list(getattr(session, "anomalies", None) or [])
    per_name1, files, gw1, all1 = _function_table(counts1, steps)
    per_name2, _, gw2, _ = _function_table(counts2, steps)
    out["boundaries"] = {
        b.label: {"kind": b.kind, "where": b.where, "per_step": sum(b.per_step) / steps,
                  "min": min(b.per_step, default=0), "max": max(b.per_step, default=0)}
        for b in installed.boundaries}
    out["boundary_entries_per_step"] = sum(
        v["per_step"] for v in out["boundaries"].values() if v["kind"] != "replaced") + 0.0
    out["functions"] = dict(sorted(per_name1.items(), key=lambda kv: (-kv[1], kv[0])))
    out["function_files"] = files
    out["gradwatch_calls_per_step"] = gw1
    out["python_calls_per_step"] = all1
    out["perturbed"] = {k: [v, per_name2.get(k, 0.0)] for k, v in per_name1.items()
                        if abs(v - per_name2.get(k, 0.0)) > 1e-9}
    out["gradwatch_calls_per_step_with_layers"] = gw2
    out["other_replaced_attributes"] = installed.other_changes
    if spec.count_mode is not None:  # the user's mode: its calls per step (pass 1)
        mode_cls = spec.count_mode()
        code = _code_of(mode_cls.__dict__["__torch_function__"])
        out["user_mode"] = {"name": f"{mode_cls.__name__}.__torch_function__",
                            "per_step": counts1.get(code, 0) / steps if code else None}
    out["anomalies"] = [ev.describe() if hasattr(ev, "describe") else str(ev) for ev in anomalies]
    return out


def render(res: dict[str, Any], base: dict[str, Any] | None, top: int) -> str:
    b_bound = (base or {}).get("boundaries", {})
    b_fn = (base or {}).get("functions", {})
    col = f" {'before':>8}" if base else ""
    lines = [f"model={res['model']} level={res['level']} steps={res['steps']} (after "
             f"{res['warmup']} warmup steps) torch {res['torch']} gradwatch {res['gradwatch']} "
             f"from {res['gradwatch_dir']}", ""]
    lines.append(f"{'calls/step':>10}{col} {'min':>4} {'max':>4}  boundary  [first gradwatch code]")
    for label, row in res["boundaries"].items():
        before = f" {b_bound[label]['per_step']:8.2f}" if label in b_bound else (
            f" {'–':>8}" if base else "")
        lines.append(f"{row['per_step']:10.2f}{before} {row['min']:4d} {row['max']:4d}  {label}"
                     f"  [{row['where']}]")
    for label in b_bound:
        if label not in res["boundaries"]:
            lines.append(f"{'–':>10} {b_bound[label]['per_step']:8.2f} {'':4} {'':4}  {label}"
                         "  [gone]")
    lines.append("")

    def total(key: str, title: str) -> str:
        before = f" (before {base[key]:.2f})" if base and key in base else ""
        return f"{title}: {res[key]:.2f}{before}"

    lines.append(total("boundary_entries_per_step", "entries into gradwatch per step "
                       "(mode, saved tensors, wrapt, hooks)"))
    lines.append(total("gradwatch_calls_per_step", "Python calls of gradwatch functions per step"))
    lines.append(total("python_calls_per_step", "Python calls per step, all (torch's included)"))
    if res.get("user_mode"):
        um, before = res["user_mode"], (base or {}).get("user_mode")
        b = f" (before {before['per_step']:.2f})" if before else ""
        lines.append(f"calls per step of the loop's own mode {um['name']}: "
                     f"{um['per_step']:.2f}{b} (compare --level none)")
    if res["other_replaced_attributes"]:
        lines.append("replaced, not callable (not counted): "
                     + ", ".join(res["other_replaced_attributes"]))
    if res["perturbed"]:
        lines.append("WARNING: gradwatch's own calls differ between pass 1 (no counting layers) "
                     "and pass 2 (with them): a warmup too short for gradwatch's per-step work to "
                     "settle (try --warmup 20), or the layers perturbed gradwatch. Function: "
                     "[pass 1, pass 2] per step: " + json.dumps(res["perturbed"]))
    if res["anomalies"]:
        lines.append("WARNING: anomalies reported on this clean loop: " + "; ".join(res["anomalies"]))
    lines.append("")
    lines.append(f"{'calls/step':>10}{col}  gradwatch function (by name, any file)  [file:line]")
    names = list(res["functions"])[:top]
    names += [n for n in b_fn if n not in res["functions"]][: max(0, top - len(names))]
    for name in names:
        now = res["functions"].get(name)
        before = f" {b_fn[name]:8.2f}" if name in b_fn else (f" {'–':>8}" if base else "")
        now_s = f"{now:10.2f}" if now is not None else f"{'–':>10}"
        lines.append(f"{now_s}{before}  {name}  [{res['function_files'].get(name, 'gone')}]")
    return "\n".join(lines)


_SUMMARY_KINDS = ("mode", "saved tensors", "wrapt", "hook", "replaced")


def summary_row(res: dict[str, Any]) -> dict[str, Any]:
    """One run's counts per step, by boundary kind, and its totals."""
    kinds = dict.fromkeys(_SUMMARY_KINDS, 0.0)
    for row in res["boundaries"].values():
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["per_step"]
    return {"model": res["model"], "level": res["level"], "by_kind": kinds,
            "entries": res["boundary_entries_per_step"],
            "gradwatch_calls": res["gradwatch_calls_per_step"],
            "python_calls": res["python_calls_per_step"],
            "user_mode": res.get("user_mode"), "perturbed": res["perturbed"],
            "anomalies": res["anomalies"]}


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| loop | level | entries / step: mode | saved-tensor pack + unpack | wrappers | "
             "hooks | total | (replaced) | gradwatch Python calls / step | all Python calls / "
             "step | user mode's calls / step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        um = r["user_mode"]
        ums = f"{um['per_step']:g}" if um and um.get("per_step") is not None else "–"
        k = r["by_kind"]
        if r["level"] == "none":
            lines.append(f"| {r['model']} | unwatched | | | | | | | | {r['python_calls']:.0f} | "
                         f"{ums} |")
            continue
        lines.append(f"| {r['model']} | {r['level']} | {k['mode']:g} | {k['saved tensors']:g} | "
                     f"{k['wrapt']:g} | {k['hook']:g} | {r['entries']:g} | {k['replaced']:g} | "
                     f"{r['gradwatch_calls']:.0f} | {r['python_calls']:.0f} | {ums} |")
    return "\n".join(lines)


def main_many(models: list[str], levels: list[str], args: argparse.Namespace) -> int:
    """Each (model, level) in a process of its own; one summary table (and ``--json``)."""
    import subprocess
    import tempfile

    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for level in levels:
                out = os.path.join(tmp, f"{model}_{level}.json")
                cmd = [sys.executable, "-m", "benchmarks.calls", "--model", model, "--level",
                       level, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--json", out]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      cwd=os.path.dirname(os.path.dirname(THIS_FILE)))
                if not os.path.exists(out):
                    failed.append(f"{model} {level}: exit {proc.returncode}: "
                                  f"{proc.stderr.strip()[-500:]}")
                    continue
                with open(out, encoding="utf-8") as f:
                    res = json.load(f)
                rows.append(summary_row(res))
                if proc.returncode:
                    failed.append(f"{model} {level}: exit {proc.returncode} (perturbed: "
                                  f"{res['perturbed']}, anomalies: {res['anomalies']})")
                print(f"  {model} {level}: {rows[-1]['entries']:g} entries/step",
                      file=sys.stderr, flush=True)
    print(summary_table(rows))
    for line in failed:
        print(f"WARNING: {line}")
    if args.json_path:
        d = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(d, exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "gradwatch_dir": GW_DIR.rstrip(os.sep),
                       "steps": args.steps, "warmup": args.warmup, "rows": rows}, f, indent=1)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp", choices=[n for n, s in SPECS.items() if not s.lightning])
    ap.add_argument("--level", default="full", choices=["full", "light", "none"])
    ap.add_argument("--models", default=None, help="several models ('shapes': the loop shapes of "
                    "issue 18 but Lightning's), each at each of --levels in a process of its "
                    "own: one summary table (--json: its rows)")
    ap.add_argument("--levels", default="none,full,light", help="with --models")
    ap.add_argument("--steps", type=int, default=50, help="counted steps per pass (a multiple of "
                    "stats_every=10)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top", type=int, default=60, help="rows of the function table")
    ap.add_argument("--json", dest="json_path", default=None, help="write the counts here")
    ap.add_argument("--baseline", default=None, help="a --json file of an earlier run: "
                    "print its counts beside these")
    args = ap.parse_args(argv)
    if args.models:
        models = []
        for m in (m.strip() for m in args.models.split(",")):
            for name in ((n for n in SHAPES if not SPECS[n].lightning) if m == "shapes"
                         else (m,) if m else ()):
                if name not in SPECS or SPECS[name].lightning:
                    ap.error(f"--models: {name!r} is not a hand-written loop of {list(SPECS)}")
                models.append(name)
        levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
        if bad := [lv for lv in levels if lv not in ("none", "full", "light")]:
            ap.error(f"--levels: {bad}")
        return main_many(models, levels, args)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    res = measure(args.model, args.level, args.steps, args.warmup)
    base = None
    if args.baseline:
        with open(args.baseline, encoding="utf-8") as f:
            base = json.load(f)
    print(render(res, base, args.top))
    if args.json_path:
        d = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(d, exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 1 if res["perturbed"] or res["anomalies"] else 0


if __name__ == "__main__":
    sys.exit(main())
