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
# gradwatch's functions torch calls directly (no frame of gradwatch's above them)
TORCH_CALLS = {"WatchMode.__torch_function__", "SavedTensorRegistry.pack",
               "SavedTensorRegistry.unpack", "Optimizers._wrap_closure.<locals>.closure_watched",
               "_bracketed.<locals>.bracketed"}
F, R = inj.InjectedFault, inj.InjectedRuntimeError
FULL, FULL_LOG, LIGHT, LIGHT_LOG = CONFIGS

FINDINGS: list[Finding] = [
    Finding(
        "F05b-exit-entry",
        "an error or Ctrl-C at the very entry of Watch.__exit__ leaves the watch installed",
        "leftover, an active watch (and, for an error, a user-visible fault): Python's `with` "
        "calls Watch.__exit__ itself; an exception raised as that call starts (a Ctrl-C, a "
        "RecursionError, a MemoryError) comes before any line of gradwatch's runs, so nothing "
        "can undo what the watch installed or catch the error (every later step of the close "
        "path is guarded, retried after an interrupt, and idempotent; only atexit closes this "
        "watch then)",
        lambda c, p: p.phase == "__exit__" and _qual(c) == "Watch.__exit__" and c.site.line is None
        and p.kind in ("escaped", "leftover", "active", "outlives", "open_sink", "rewatch"),
        (FULL, "api:Watch.__exit__ (call)", 1, R)),
    Finding(
        "F02b-setup-entry",
        "an error at the very entry of watch() or Watch.__enter__ reaches the user",
        "user-visible fault: watch() and Watch.__enter__ are called by the user's own line; an "
        "error raised as such a call starts (a RecursionError, a MemoryError), before any line "
        "of gradwatch's runs, cannot be caught by gradwatch (every error after that fails open: "
        "a warning, the watch watches nothing, nothing stays installed)",
        lambda c, p: p.kind == "escaped" and p.phase in SETUP and c.site.line is None
        and _qual(c) in ("watch", "Watch.__enter__"),
        (FULL, "api:Watch.__enter__ (call)", 1, R)),
    Finding(
        "F07c-light-grad-switch-entry",
        "an error or Ctrl-C at the very entry of light's grad-mode stand-in",
        "user-visible fault or grad mode left off (light): torch's no_grad calls "
        "torch._C._set_grad_enabled, which light replaces by _light_set_grad_enabled; an "
        "exception raised as that call starts (a RecursionError, a MemoryError, a Ctrl-C), "
        "before its first line, fails the user's `with torch.no_grad():` (entering) or leaves "
        "grad mode off (a Ctrl-C as the block exits: torch's __exit__ calls it directly). Its "
        "body is guarded and puts grad mode back on an interrupt; nothing of gradwatch's runs "
        "between torch's call and that entry to guard it",
        lambda c, p: _qual(c) == "_light_set_grad_enabled" and c.site.line is None and (
            (p.kind == "escaped" and p.phase == "loop")
            or (p.kind in ("leftover", "changed", "rewatch") and (
                "grad_enabled" in _left(p) or "does not require grad" in p.text
                or p.kind == "changed"))),
        (LIGHT, "_intercept.gate:_light_set_grad_enabled (call)", 1, F)),
    Finding(
        "F07e-callback-entry",
        "an error at the very entry of a gradwatch function that torch calls directly",
        "user-visible fault: torch itself calls some of gradwatch's functions, with no "
        "gradwatch frame between to guard them: the function mode's __torch_function__ (per "
        "op), the saved-tensors pack/unpack hooks (per saved tensor), the closure wrapper an "
        "LBFGS step calls, the attention modules' forward bracket (the module's call). Their "
        "bodies are guarded (an internal error fails open), but an error raised as such a "
        "call starts (a RecursionError, a MemoryError), before its first line, fails the "
        "user's op, forward, backward or step; a guard layer above them would cost a Python "
        "call each time (per op, per saved tensor) or is torch's own code",
        lambda c, p: p.kind == "escaped" and p.phase == "loop" and _qual(c) in TORCH_CALLS
        and c.site.line is None,
        (FULL, "detectors._saved_registry:SavedTensorRegistry.unpack (call)", 1, F)),
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
