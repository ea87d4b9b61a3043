"""Randomized fault and interrupt injection over gradwatch's own code (issue 17, "Must show").

For a fixed list of seeds, each case draws a configuration (level full/light, with or without
``log_dir`` sinks), a site of gradwatch's core code that a clean watched run of the training loop
executes (a function's entry, or a line holding a call: see ``tests/_injection.py``), a hit
``k`` of it, and raises there once. Then:

* **faults** (an ``Exception`` subclass, as any internal error): 0 changed results (every
  parameter, buffer, optimizer state, loss, clipping norm, eval output and the RNG state
  torch.equal to the unwatched run), 0 user-visible internal faults (nothing reaches the loop;
  internal errors appear only as one ``GradWatchWarning`` "gradwatch: internal error in <part>"
  per part; no other warning, no unraisable exception), 0 leftovers after the watch (conftest's
  ``global_state``, the attributes it does not list, the watch's runtime freed), and a new
  ``watch()`` runs the loop again bit-identical, silent, leaving nothing.
* **interrupts** (``KeyboardInterrupt``, as Ctrl-C): the user catches it around the whole
  ``with gradwatch.watch(...)`` block. It may propagate (that is what Ctrl-C does); if it is
  swallowed the run must be unchanged. Either way: 0 leftovers, no watch active, and a new
  watch runs a clean loop.

Sizes: ``GRADWATCH_INJECTION_FAULTS`` / ``GRADWATCH_INJECTION_INTERRUPTS`` cases (CI default
160 + 80, about 30 s on 2 idle cores, ~0.1 s a case); e.g. ``GRADWATCH_INJECTION_FAULTS=3000
GRADWATCH_INJECTION_INTERRUPTS=1500`` for a long run. ``GRADWATCH_INJECTION_EXHAUSTIVE=1``
adds one test per configuration and kind that injects at every site of the pool at its first
and last hit (about 14 000 cases, 25 minutes).

Open bugs are listed in ``FINDINGS``. A problem a finding explains makes a random case xfail
with the finding's name; each finding also has its own strict-xfail case
(``test_finding_reproduces``): when it is fixed, that case passes and pytest reports it
(XPASS, strict), and the finding is to be removed from the list.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import _injection as inj
import gradwatch
from gradwatch.api import active_watch

pytestmark = pytest.mark.usefixtures("one_thread")

if sys.gettrace() is not None:  # a debugger or coverage owns the tracer
    pytest.skip("injection needs sys.settrace (a tracer is already active)",
                allow_module_level=True)

N_FAULTS = int(os.environ.get("GRADWATCH_INJECTION_FAULTS", "160"))
N_INTERRUPTS = int(os.environ.get("GRADWATCH_INJECTION_INTERRUPTS", "80"))
EXHAUSTIVE = os.environ.get("GRADWATCH_INJECTION_EXHAUSTIVE", "") not in ("", "0")
CONFIGS = (("full", False), ("full", True), ("light", False), ("light", True))
STATS_EVERY = 3


# -- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    config: tuple[str, bool]
    site: inj.Site
    k: int
    exc_type: type[BaseException]
    n: int  # hits of the site in the pool's run

    @property
    def interrupt(self) -> bool:
        return self.exc_type is KeyboardInterrupt

    def __str__(self) -> str:
        level, sinks = self.config
        return (f"{self.exc_type.__name__} at hit {self.k}/{self.n} of {self.site} "
                f"(level={level}{', log_dir' if sinks else ''})")


@dataclass(frozen=True)
class Problem:
    """One broken promise. ``kind``: escaped (an exception reached the user), swallowed (an
    interrupt did not), changed (results), warning, unraisable, leftover (global state),
    open_sink (a sink never closed), active (a watch still active), outlives (the runtime not
    freed), rewatch (the next watch)."""

    kind: str
    phase: str  # where the injection fired: watch(), __enter__, loop, __exit__
    text: str

    def __str__(self) -> str:
        return f"{self.kind} (fired in {self.phase}): {self.text}"


@dataclass
class Run:
    """What one watched run did and left."""

    result: inj.Result = field(default_factory=inj.Result)
    fired: bool = False
    hits: int = 0
    phase: str = ""
    escaped: str | None = None  # "Type: message" of an exception that reached the user
    interrupted: bool = False  # the KeyboardInterrupt reached the user's except
    warnings: list[tuple[type, str]] = field(default_factory=list)
    unraisable: list[str] = field(default_factory=list)
    watch: Any = None
    runtime: Any = None  # a weak reference to the watch's runtime


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _watched(config: tuple[str, bool], log_dir: str, tracer: Any,
             catch_interrupt: bool = False) -> Run:
    """The user's program: ``with gradwatch.watch(...): train()`` (inside ``try/except
    KeyboardInterrupt`` for interrupts), spelled out so that the phase is known."""
    level, sinks = config
    run = Run()
    phase = ["watch()"]
    if isinstance(tracer, inj.Injector):
        tracer.on_fire = lambda: setattr(run, "phase", phase[0])
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: run.unraisable.append(
        f"{u.exc_type.__name__}: {str(u.exc_value)[:200]} in {u.object!r}"[:400])
    inj.reset_caches()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with inj.tracing(tracer):
                    w = run.watch = gradwatch.watch(level=level, stats_every=STATS_EVERY,
                                                    log_dir=log_dir if sinks else None)
                    run.runtime = weakref.ref(w._runtime)
                    phase[0] = "__enter__"
                    w.__enter__()
                    phase[0] = "loop"
                    try:
                        inj.train(run.result)
                    except BaseException as exc:
                        phase[0] = "__exit__"
                        if not w.__exit__(type(exc), exc, exc.__traceback__):
                            raise
                    else:
                        phase[0] = "__exit__"
                        w.__exit__(None, None, None)
            except KeyboardInterrupt as exc:
                if not catch_interrupt:
                    run.escaped = _text(exc)
                run.interrupted = True
            except BaseException as exc:  # anything reaching the user is a finding
                run.escaped = _text(exc)
        run.warnings = [(c.category, str(c.message)) for c in caught]
    finally:
        sys.unraisablehook = hook
    if isinstance(tracer, inj.Injector):
        run.fired, run.hits = tracer.fired, tracer.n
    return run


_INTERNAL = re.compile(r"gradwatch: internal error in (?P<part>.+?) \((?P<type>\w+): ")


def _leftovers(clean: Callable[[], dict]) -> dict[str, Any]:
    return {**clean(), **inj.extra_diff()}


def _warning_problems(run: Run, exc_type: type[BaseException] | None, phase: str
                      ) -> list[Problem]:
    problems = []
    parts: list[str] = []
    for category, text in run.warnings:
        m = _INTERNAL.match(text)
        if (m and issubclass(category, gradwatch.GradWatchWarning) and exc_type is not None
                and m["type"] == exc_type.__name__ and inj.INJECTED_TEXT in text):
            parts.append(m["part"])
            continue
        problems.append(Problem("warning", phase, f"{category.__name__}: {text[:300]}"))
    for part in sorted(set(parts)):
        if parts.count(part) > 1:
            problems.append(Problem("warning", phase, f"{parts.count(part)} internal-error "
                                                      f"warnings for part {part!r}"))
    problems += [Problem("unraisable", phase, u) for u in run.unraisable]
    return problems


def _open_sinks(run: Run) -> list[str]:
    """The watch's sinks that were not closed (a file, a writer and its thread)."""
    if run.watch is None:
        return []
    open_ = []
    emit = run.watch._runtime.emit
    for sink in emit.sinks:
        if id(sink) in emit._off:  # its own failure, warned: "sink ... is switched off"
            continue
        file = getattr(sink, "_file", None)
        if (file is not None and not file.closed) or getattr(sink, "_closed", True) is False:
            open_.append(type(sink).__name__)
    return open_


def _after(run: Run, phase: str, clean: Callable[[], dict]) -> list[Problem]:
    """What the run left: global state, an active watch, open sinks, a runtime still
    referenced."""
    problems = []
    sinks = _open_sinks(run)
    if sinks:
        problems.append(Problem("open_sink", phase, f"sinks never closed: {sinks}"))
        for sink in run.watch._runtime.emit.sinks:
            with contextlib.suppress(Exception):
                sink.close()
    left = _leftovers(clean)
    if left:
        problems.append(Problem("leftover", phase, str(left)[:600]))
        inj.force_clean(run.watch)
    if active_watch() is not None:
        problems.append(Problem("active", phase, "a watch is still active"))
        inj.force_clean(active_watch())
    elif not left and not sinks and run.runtime is not None:
        run.watch = None
        gc.collect()  # (cheap: the module's fixture froze everything older)
        runtime = run.runtime()
        if runtime is not None:
            holders = sorted({type(r).__name__ for r in gc.get_referrers(runtime)})
            del runtime
            problems.append(Problem("outlives", phase, f"the watch's runtime is still "
                                                       f"referenced (by {holders})"))
    if problems:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc.collect()  # what the leak kept is finalized now, not during the next case
    return problems


def _rewatch(config: tuple[str, bool], log_dir: str, reference: inj.Result,
             clean: Callable[[], dict]) -> list[Problem]:
    """A new watch after the case: accepted, the loop bit-identical, silent, nothing left."""
    again = _watched(config, log_dir, None)
    problems = []
    if again.escaped is not None:
        problems.append(Problem("rewatch", "next watch", f"failed: {again.escaped}"))
    diff = inj.differences(reference, again.result)
    if diff and again.escaped is None:
        problems.append(Problem("rewatch", "next watch", f"changed results: {diff[:6]}"))
    problems += [Problem("rewatch", "next watch", str(p))
                 for p in _warning_problems(again, None, "next watch")]
    problems += [Problem("rewatch", "next watch", str(p))
                 for p in _after(again, "next watch", clean)]
    return problems


class NotFired(Exception):
    """The run made fewer hits of the site than the pool's run (ids reused differently)."""


def check(case: Case, reference: inj.Result, clean: Callable[[], dict], tmp_path: Any
          ) -> list[Problem]:
    """Run ``case``; every promise it broke (empty: all kept)."""
    injector = inj.Injector(case.site, case.k, case.exc_type)
    run = _watched(case.config, str(tmp_path / "case"), injector,
                   catch_interrupt=case.interrupt)
    if not run.fired:
        inj.force_clean(run.watch)
        raise NotFired(f"{case}: only {run.hits} hit(s) in this run")
    phase = run.phase
    problems: list[Problem] = []
    if run.escaped is not None:
        problems.append(Problem("escaped", phase, f"{run.escaped} reached the user"))
    if case.interrupt and not run.interrupted:
        problems.append(Problem("swallowed", phase, "the KeyboardInterrupt did not reach the "
                                                    "user"))
    if not run.interrupted and run.escaped is None:
        diff = inj.differences(reference, run.result)
        if diff:
            problems.append(Problem("changed", phase, ", ".join(diff[:8])))
    problems += _warning_problems(run, None if case.interrupt else case.exc_type, phase)
    problems += _after(run, phase, clean)
    problems += _rewatch(case.config, str(tmp_path / "again"), reference, clean)
    return problems


# -- the pools --------------------------------------------------------------------------------


class Pools:
    """The unwatched reference result and, per configuration, the sites a clean watched run
    executes with their hits (sorted by key: a draw depends on the seed and the source only)."""

    def __init__(self, tmp: Any) -> None:
        self.tmp = tmp
        self.reference = inj.Result()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inj.train(self.reference)
        assert not caught, [str(c.message) for c in caught]
        again = inj.Result()
        inj.train(again)
        assert inj.differences(self.reference, again) == []  # the loop is deterministic
        self._pools: dict[tuple[str, bool], list[tuple[inj.Site, int]]] = {}

    def pool(self, config: tuple[str, bool]) -> list[tuple[inj.Site, int]]:
        if config not in self._pools:
            counts = []
            for i in range(2):  # sites whose hits vary from run to run (ids reused) are left out
                counter = inj.Counter()
                run = _watched(config, str(self.tmp / f"pool{i}-{config[0]}-{config[1]}"),
                               counter)
                counter.finish()
                assert run.escaped is None and not run.warnings, (run.escaped, run.warnings)
                assert inj.differences(self.reference, run.result) == []
                assert inj.extra_diff() == {} and not _open_sinks(run)
                counts.append(counter.hits)
            stable = [(site, n) for site, n in counts[0].items() if counts[1].get(site) == n]
            self._pools[config] = sorted(stable, key=lambda e: (e[0].key, e[0].line or 0))
        return self._pools[config]

    def sites(self, config: tuple[str, bool], interrupt: bool) -> list[tuple[inj.Site, int]]:
        return [e for e in self.pool(config)
                if (e[0].interruptible if interrupt else e[0].faultable)]

    def case(self, seed: int, interrupt: bool) -> Case:
        rng = random.Random(seed * 2 + interrupt)
        config = CONFIGS[rng.randrange(len(CONFIGS))]
        pool = self.sites(config, interrupt)
        calls = [e for e in pool if e[0].line is None]
        lines = [e for e in pool if e[0].line is not None]
        site, n = rng.choice(calls if rng.random() < 0.5 else lines)
        k = rng.randint(1, n)
        exc_type = KeyboardInterrupt if interrupt else inj.FAULTS[rng.randrange(len(inj.FAULTS))]
        return Case(config, site, k, exc_type, n)

    def find(self, config: tuple[str, bool], key: str) -> tuple[inj.Site, int]:
        for site, n in self.pool(config):
            if site.key == key:
                return site, n
        raise LookupError(f"no site {key!r} in the {config} pool: the source changed; update "
                          "the finding's example")


@pytest.fixture(scope="module")
def pools(one_thread, tmp_path_factory) -> Iterator[Pools]:
    inj.refresh_pristine()
    gc.collect()
    gc.freeze()  # what exists now is never garbage: a collection then costs microseconds
    try:
        yield Pools(tmp_path_factory.mktemp("injection"))
    finally:
        gc.unfreeze()


# -- the open findings ------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """An open bug: the problems it explains, and an example case that reproduces it
    (configuration, site key, hit (or "last"), exception)."""

    name: str
    short: str
    summary: str
    explains: Callable[[Case, Problem], bool]
    example: tuple[tuple[str, bool], str, int | str, type[BaseException]] | None = None


def _qual(case: Case) -> str:
    return case.site.qualname


def _left(p: Problem) -> set[str]:
    """The names of the leftover state in a ``leftover`` problem."""
    return set(re.findall(r"'([\w.]+)': \(", p.text))


SETUP = ("watch()", "__enter__")
# The close path: Watch.__exit__ -> Watch.close -> Runtime.close -> gate.close,
# step_boundary(final), uninstall -> gate.close, Installed.undo; then Emitter.close_sinks.
CLOSE_PATH = {"Watch.__exit__", "Watch.close", "Runtime.close", "Runtime.uninstall",
              "ModeGate.close", "Runtime.step_boundary", "Emitter.close_sinks",
              "Emitter._call", "ModeGate.suspended"}
MODE_PREAMBLE = {"WatchMode.__torch_function__", "classify", "ModeGate._no_grad_entered",
                 "switch_frame"}
EPILOGUES = {"ModeGate.resume", "ModeGate.pause", "ModeGate.call_paused", "ZeroGrad._wrapper",
             "Clipping._wrapper", "Optimizers._wrap_step",
             "Optimizers._wrap_closure.<locals>.closure_watched", "ModeGate.fast_path_exit",
             "_bracketed.<locals>.bracketed", "Modules._fast_path_enter", "ModeGate.suspended",
             "_stack_top"}
LIGHT_SWITCH = {"_light_set_grad_enabled", "ModeGate.grad_mode_switched"}
BACKWARD_EPILOGUE = {"Backward._wrapper", "SavedTensorDetector.end_step",
                     "SavedTensorDetector.after_backward", "SavedTensorRegistry.sweep",
                     "GradFlowDetector.backward_done"}
SAVED_HOOKS = {"SavedTensorRegistry.pack", "SavedTensorRegistry.unpack"}
STEP_CLASSES = {"LBFGS.step", "SGD.step", "Adam.step", "AdamW.step"}
F, R = inj.InjectedFault, inj.InjectedRuntimeError
FULL, FULL_LOG, LIGHT, LIGHT_LOG = CONFIGS

FINDINGS: list[Finding] = [
    Finding(
        "F01b-fault-in-fast-path-step-aside-takes-slow-path",
        "an internal error inside the attention bracket's step-aside: that call takes torch's "
        "slow path (outputs differ)",
        "changed result: F01's fix (3d18746) makes the bracket step aside also once the mode "
        "part is off; an error inside ModeGate.fast_path_enter itself (its pause(), "
        "_stack_top(), the light pop) still leaves the mode on the stack for that forward: an "
        "eval-mode MultiheadAttention under no_grad takes torch's slow path and its output "
        "differs in the last bits (a fallback that only takes the mode off the stack when the "
        "bookkeeping fails would keep the numerics)",
        lambda c, p: p.kind == "changed" and p.text == "attn differs",
        (LIGHT, "_intercept.gate:ModeGate.fast_path_enter: `paused = self.pause()  # full: the "
                "mode off the stack; light: torch's own switch`", 1, F)),
    Finding(
        "F02-setup-errors-propagate",
        "an internal error in watch()/__enter__ reaches the user (no fail-open at setup)",
        "user-visible fault: an internal error while watch() builds its parts (Runtime and "
        "every part's __init__, Config.build) or while __enter__ installs them propagates to "
        "the user's `with` line instead of failing open (warn once, run unwatched)",
        lambda c, p: p.kind == "escaped" and p.phase in SETUP and not c.interrupt,
        (FULL, "_intercept.clipping:Clipping.install (call)", 1, R)),
    Finding(
        "F03-registered-before-its-undo",
        "a hook/patch/mode installed before its undo is pushed stays after an error or Ctrl-C",
        "leftover: Installed registers a hook / patches an attribute / pushes the mode and "
        "only then pushes its undo (optimizer_hooks, module_forward_pre_hook, wrap_attribute, "
        "replace_attribute, saved_tensors_hooks, ModeGate.install, Runtime.install's "
        "atexit.register): an error or Ctrl-C between the two leaves it installed for good; "
        "also when a library optimizer's step is wrapped lazily during the loop",
        lambda c, p: (p.phase in SETUP and p.kind in ("leftover", "outlives"))
        or (p.phase == "loop" and p.kind == "leftover" and bool(_left(p))
            and _left(p) <= STEP_CLASSES),
        (FULL, "_intercept.installed:Installed.optimizer_hooks: "
               "`self.add(h1.remove)`", 1, R)),
    Finding(
        "F05-close-not-failsafe",
        "close path: internal errors reach the user; an error or Ctrl-C skips uninstall",
        "user-visible fault and leftovers: in the close path (Watch.__exit__ -> Watch.close -> "
        "Runtime.close -> ModeGate.close / step_boundary(final) / uninstall; "
        "Emitter.close_sinks) an internal error propagates to the user, and an error or a "
        "Ctrl-C before `self.installed.undo()` leaves every hook, wrapper and the mode "
        "installed (Runtime.close calls gate.close() outside its try/finally; uninstall calls "
        "gate.close() before undo() without a finally; ctx.closed/Watch._closed are set "
        "first, so nothing retries)",
        lambda c, p: p.phase == "__exit__" and _qual(c) in CLOSE_PATH
        and p.kind in ("escaped", "leftover", "warning", "outlives", "active", "open_sink"),
        (FULL, "_assembly:Runtime.close: `self.gate.close()`", 1, R)),
    Finding(
        "F06-failed-cleanup-step-left-installed",
        "a failed or interrupted undo step leaves its item installed (RuntimeWarning)",
        "leftover (and a warning that is not a GradWatchWarning): an undo step that fails "
        "(restore of a wrapped attribute, the saved-tensors pop, ModeGate._exit_full / "
        "_exit_light) is warned as RuntimeWarning 'gradwatch: cleanup step failed' and what it "
        "should have removed stays installed; a Ctrl-C in Installed.undo drops the step it "
        "interrupted (popped before it ran, never retried)",
        lambda c, p: p.phase == "__exit__" and _qual(c) not in CLOSE_PATH and (
            p.kind == "leftover" or (p.kind == "warning" and "cleanup step failed" in p.text)),
        (FULL, "_intercept.installed:Installed.wrap_attribute.<locals>.restore (call)", 1, F)),
    Finding(
        "F07a-mode-preamble-unguarded",
        "WatchMode.__torch_function__ code before its try fails the user's op",
        "user-visible fault: WatchMode.__torch_function__ runs code outside its handler try "
        "(the memo lookup / classify, the out=/inplace check, grad mode, the no_grad "
        "notification: on_no_grad -> ModeGate._no_grad_entered evaluates switch_frame(3) "
        "before the GRAD_FLOW hook guard): an error there fails the user's torch op",
        lambda c, p: p.kind == "escaped" and p.phase == "loop" and _qual(c) in MODE_PREAMBLE,
        (FULL, "_intercept.gate:ModeGate._no_grad_entered (call)", 1, F)),
    Finding(
        "F07b-wrapper-epilogue-unguarded",
        "gate pause/resume around library calls is unguarded: errors reach the user",
        "user-visible fault: the gate's pause/resume around library calls runs outside any "
        "guard, after (or, for the fast path, around) the user's call: Clipping._wrapper, "
        "ZeroGrad._wrapper, ModeGate.call_paused (DataLoader), Optimizers._wrap_step, "
        "closure_watched (LBFGS), the attention bracket: an error there reaches the user "
        "although the user's call succeeded (FailOpen.wrapper re-raises once `called`)",
        lambda c, p: p.kind == "escaped" and p.phase == "loop" and _qual(c) in EPILOGUES,
        (FULL, "_intercept.gate:ModeGate.resume (call)", 1, R)),
    Finding(
        "F07c-light-grad-switch-entry",
        "an error at the very entry of light's grad-mode stand-in fails the user's no_grad",
        "user-visible fault (light): only an error raised at the entry of "
        "_light_set_grad_enabled itself (before its first line runs: a RecursionError, a "
        "MemoryError) still fails the user's `with torch.no_grad():`; its body is guarded",
        lambda c, p: p.kind == "escaped" and p.phase == "loop" and _qual(c) in LIGHT_SWITCH,
        (LIGHT, "_intercept.gate:_light_set_grad_enabled (call)", 1, F)),
    Finding(
        "F07d-backward-epilogue-unguarded",
        "Backward._wrapper's work after torch's backward is unguarded",
        "user-visible fault: after torch's backward returned, Backward._wrapper calls "
        "grad_flow.backward_done(), saved.after_backward() and saved.end_step() (-> "
        "registry.sweep) outside any guard: an error there reaches the user after a "
        "successful backward",
        lambda c, p: p.kind == "escaped" and p.phase == "loop"
        and _qual(c) in BACKWARD_EPILOGUE,
        (FULL, "detectors.saved_tensor:SavedTensorDetector.end_step (call)", 1, R)),
    Finding(
        "F07e-saved-tensor-hooks-unguarded",
        "the saved-tensors pack entry and unpack are unguarded",
        "user-visible fault (full): the saved-tensors hooks torch calls directly are guarded "
        "only inside pack's try (pack's entry) and not at all in unpack: an error there fails "
        "the user's forward or backward",
        lambda c, p: p.kind == "escaped" and p.phase == "loop" and _qual(c) in SAVED_HOOKS,
        (FULL, "detectors._saved_registry:SavedTensorRegistry.unpack (call)", 1, F)),
    Finding(
        "F07f-wrapper-prepare-outside-guard",
        "FailOpen.wrapper runs prepare() outside its try",
        "user-visible fault: FailOpen.wrapper runs `prepare` (clipping's "
        "_with_parameter_list) before its try: an error there fails clip_grad_norm_",
        lambda c, p: p.kind == "escaped" and p.phase == "loop"
        and _qual(c) == "_with_parameter_list",
        (FULL, "_intercept.clipping:_with_parameter_list (call)", 1, F)),
    Finding(
        "F08-grad-mode-left-off",
        "grad mode stays off after an error/Ctrl-C in without_grad or light's stand-in",
        "leftover and changed result: grad mode stays off after the watch when an error or a "
        "Ctrl-C hits _stats.without_grad's restore (its finally) or the light stand-in after "
        "it switched grad off (the user's `with torch.no_grad():` then fails in __enter__, so "
        "its __exit__ never restores grad mode); the next backward fails with 'element 0 of "
        "tensors does not require grad'",
        lambda c, p: (p.kind == "leftover" and "grad_enabled" in _left(p))
        or (_qual(c) == "without_grad" and p.kind in ("escaped", "warning")),
        (FULL, "_stats:without_grad: `_set_grad_enabled(enabled)`", 1, R)),
    Finding(
        "F12-interrupted-sink-close-leaves-it-open",
        "a Ctrl-C as a sink's close() starts leaves that sink open",
        "leftover: Emitter.close_sinks goes on to the other sinks through an interrupt, but the "
        "sink whose close() the Ctrl-C cut short is never closed again: its TensorBoard "
        "SummaryWriter (file and writer thread) or gradwatch.jsonl stays open (a close "
        "interrupted this way could run once more, as undo steps should: sinks' close() is "
        "idempotent)",
        lambda c, p: p.kind == "open_sink" and p.phase == "__exit__"
        and c.site.module.startswith("gradwatch.sinks"),
        (FULL_LOG, "sinks.tensorboard:TensorBoardSink.close (call)", 1, KeyboardInterrupt)),
    Finding(
        "F13-traceback-trimming-unguarded",
        "without_own_frames failing replaces the user's exception",
        "user-visible fault: when an exception passes through a boundary (the mode, the fail-open "
        "hooks and wrappers, the optimizer step wrapper), the boundary calls "
        "_location.without_own_frames in its except clause with nothing around the call: an "
        "error raised as it is called (its body now catches its own; a RecursionError when "
        "the user's exception is one, a Ctrl-C) replaces the user's (or torch's) exception, "
        "e.g. the DataLoader's StopIteration, by gradwatch's",
        lambda c, p: p.kind == "escaped" and _qual(c) == "without_own_frames",
        (FULL, "_location:without_own_frames (call)", 1, R)),
]
FINDINGS_WITH_EXAMPLES = [f for f in FINDINGS if f.example is not None]


def explained(case: Case, problems: list[Problem]) -> tuple[list[str], list[Problem]]:
    """The findings that explain ``problems`` and the problems none explains."""
    names, rest = [], []
    for p in problems:
        hit = [f.name for f in FINDINGS if f.explains(case, p)]
        if hit:
            names += [n for n in hit if n not in names]
        else:
            rest.append(p)
    return names, rest


def _verdict(case: Case, problems: list[Problem]) -> None:
    if not problems:
        return
    message = f"{case}:\n  " + "\n  ".join(map(str, problems))
    names, rest = explained(case, problems)
    if not rest:
        pytest.xfail(f"{', '.join(names)}: {case}")
    pytest.fail(f"{message}\n(not explained by a known finding: "
                f"{'; '.join(map(str, rest))})", pytrace=False)


def _run_case(case: Case, pools: Pools, clean: Callable[[], dict], tmp_path: Any
              ) -> list[Problem]:
    try:
        return check(case, pools.reference, clean, tmp_path)
    except NotFired as exc:
        pytest.skip(f"the injection did not fire: {exc}")


# -- the tests --------------------------------------------------------------------------------


def test_the_clean_loop_is_silent_bit_identical_and_leaves_nothing(pools, clean, tmp_path) -> None:
    for config in CONFIGS:
        run = _watched(config, str(tmp_path / f"{config[0]}-{config[1]}"), None)
        assert run.escaped is None
        assert inj.differences(pools.reference, run.result) == []
        assert _warning_problems(run, None, "") == []
        assert _after(run, "", clean) == []
        assert len(pools.sites(config, False)) > 400  # the pool covers the house
        assert len(pools.sites(config, True)) > 500


@pytest.mark.parametrize("seed", range(N_FAULTS))
def test_fault(seed: int, pools, clean, tmp_path) -> None:
    case = pools.case(seed, interrupt=False)
    _verdict(case, _run_case(case, pools, clean, tmp_path))


@pytest.mark.parametrize("seed", range(N_INTERRUPTS))
def test_interrupt(seed: int, pools, clean, tmp_path) -> None:
    case = pools.case(seed, interrupt=True)
    _verdict(case, _run_case(case, pools, clean, tmp_path))


class Reproduced(AssertionError):
    """A finding's example still shows the problem the finding describes."""


@pytest.mark.parametrize("finding", [
    pytest.param(f, id=f.name, marks=pytest.mark.xfail(strict=True, raises=Reproduced,
                                                       reason=f"{f.name}: {f.short}"))
    for f in FINDINGS_WITH_EXAMPLES])
def test_finding_reproduces(finding, pools, clean, tmp_path) -> None:
    """Each open finding, at its example site: xfails while the bug is there (strict: once it
    is fixed the test passes, which pytest reports as a failure: remove the finding)."""
    config, key, k, exc_type = finding.example
    site, n = pools.find(config, key)
    case = Case(config, site, n if k == "last" else k, exc_type, n)
    problems = _run_case(case, pools, clean, tmp_path)
    mine = [p for p in problems if finding.explains(case, p)]
    if mine:
        raise Reproduced(f"{case}:\n  " + "\n  ".join(map(str, mine)))


@pytest.mark.skipif(not EXHAUSTIVE, reason="set GRADWATCH_INJECTION_EXHAUSTIVE=1")
@pytest.mark.parametrize("interrupt", [False, True], ids=["fault", "interrupt"])
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c[0]}{'-log_dir' if c[1] else ''}"
                                                 for c in CONFIGS])
def test_exhaustive(config, interrupt, pools, clean, tmp_path) -> None:
    """Every site of the pool at its first and last hit; fails listing what no finding
    explains."""
    unexplained: list[str] = []
    seen: dict[str, int] = {}
    i = 0
    for site, n in pools.sites(config, interrupt):
        for k in sorted({1, n}):
            exc = KeyboardInterrupt if interrupt else inj.FAULTS[i % len(inj.FAULTS)]
            case = Case(config, site, k, exc, n)
            d = tmp_path / f"c{i}"
            d.mkdir()
            i += 1
            try:
                problems = check(case, pools.reference, clean, d)
            except NotFired:
                continue
            names, rest = explained(case, problems)
            for name in names:
                seen[name] = seen.get(name, 0) + 1
            unexplained += [f"{case}: {p}" for p in rest]
    assert not unexplained, f"{len(unexplained)} unexplained:\n" + "\n".join(unexplained[:200])
    if seen:
        pytest.xfail(f"{i} cases; explained by open findings: {seen}")


@pytest.mark.parametrize("call", ["backward", "grad"])
def test_a_watch_is_freed_after_a_direct_autograd_call(call: str, clean) -> None:
    """F11 without any fault: ``torch.autograd.backward``/``grad`` called directly inside a
    full watch; once the watch ended, nothing of it may stay referenced."""
    model = nn.Linear(3, 1)
    inj.reset_caches()
    with gradwatch.watch(model) as w:
        loss = model(torch.ones(2, 3)).sum()
        if call == "backward":
            torch.autograd.backward(loss)
        else:
            torch.autograd.grad(loss, model.weight)
    runtime = weakref.ref(w._runtime)
    del w
    gc.collect()
    try:
        assert clean() == {}
        assert runtime() is None, "the runtime is still referenced (ops.ACTIONS)"
    finally:
        inj.reset_caches()  # (drops the memo's reference)
