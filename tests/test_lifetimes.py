"""No retention: gradwatch holds no tensor, module, optimizer or graph alive (while watching and
after), removes every hook on exit (also on exceptions), and keeps its event buffer bounded
while ``counts`` stay exact."""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import gradwatch

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = ["full", "light"]


class Marker:
    """Lives exactly as long as the autograd graph that holds it (through ``ctx``)."""


class Tag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, marker):
        ctx.marker = marker
        ctx.save_for_backward(x)
        return x * 1

    @staticmethod
    def backward(ctx, g):
        return g, None


def _model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _alive(refs: dict[str, weakref.ref]) -> list[str]:
    gc.collect()
    return sorted(k for k, r in refs.items() if r() is not None)


@pytest.mark.parametrize("level", LEVELS)
def test_nothing_retained_after_exit(level: str, clean) -> None:
    model, opt = _model()
    with gradwatch.watch(model, opt, level=level, stats_every=1, on_anomaly="log") as w:
        for _ in range(3):
            x = torch.randn(5, 4)
            act = model[0](x)
            done = Marker()
            loss = model[2](model[1](Tag.apply(act, done))).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model[0].weight.mul_(0.9)
                model[2].bias.div_(0)  # queued nonfinite check
        pending = Marker()
        pending_loss = Tag.apply(model(x), pending).sum()  # a graph never backwarded
    refs = {"model": weakref.ref(model), "optimizer": weakref.ref(opt),
            "param": weakref.ref(model[0].weight), "grad": weakref.ref(model[0].weight.grad),
            "activation": weakref.ref(act), "graph": weakref.ref(done),
            "pending graph": weakref.ref(pending), "adam state": weakref.ref(
                opt.state[model[0].weight]["exp_avg"])}
    del model, opt, x, act, done, loss, pending, pending_loss
    assert _alive(refs) == []
    assert clean() == {}
    assert [a.kind for a in w.anomalies] == ["nonfinite_introduced"]


@pytest.mark.parametrize(
    "level",
    ["full", "light"],
)
def test_watch_object_collectable_after_exit(level: str) -> None:
    p = nn.Parameter(torch.ones(3))
    with gradwatch.watch(level=level) as w, torch.no_grad():
        p.mul_(0.9)
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("level", LEVELS)
def test_dropped_model_and_graph_collectable_while_watching(level: str, clean) -> None:
    with gradwatch.watch(level=level, stats_every=1) as w:
        model, opt = _model()
        x = torch.randn(5, 4)
        act = model[0](x)
        done = Marker()
        loss = model[2](model[1](Tag.apply(act, done))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model[0].weight.mul_(0.9)
        pending = Marker()
        pending_loss = Tag.apply(model(x), pending).sum()
        refs = {"model": weakref.ref(model), "optimizer": weakref.ref(opt),
                "param": weakref.ref(model[0].weight), "activation": weakref.ref(act),
                "graph": weakref.ref(done), "pending graph": weakref.ref(pending)}
        del model, opt, act, done, loss, pending, pending_loss
        assert _alive(refs) == []
        # and the watch still works afterwards
        q = nn.Parameter(torch.ones(2))
        with torch.no_grad():
            q.add_(1)
    assert w.counts["inplace_no_grad"] >= 2
    assert w.events[-1].op == "add_" and w.events[-1].version_after == 1
    assert clean() == {}


@pytest.mark.parametrize("level", LEVELS)
def test_saved_tensor_registry_does_not_keep_large_activations(level: str) -> None:
    """A pending graph dropped without backward frees its saved activations."""
    with gradwatch.watch(level=level):
        w_ = nn.Parameter(torch.randn(64, 64))
        for _ in range(5):
            h = torch.randn(256, 64) @ w_
            y = h.sigmoid()  # saves its output
            ref = weakref.ref(h)
            keep = weakref.ref(y)
            del h, y
            gc.collect()
            assert ref() is None and keep() is None


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_everything_uninstalled_when_body_raises(level: str, exc: BaseException, clean) -> None:
    model, opt = _model()
    with pytest.raises(type(exc)) as info, gradwatch.watch(model, opt, level=level):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        with torch.no_grad():
            model[0].weight.mul_(2)
            raise exc
    assert info.value is exc
    assert clean() == {}
    assert torch.is_grad_enabled()
    with gradwatch.watch():  # a new watch can start
        pass


@pytest.mark.parametrize("level", LEVELS)
def test_everything_uninstalled_on_normal_exit(level: str, clean) -> None:
    with gradwatch.watch(level=level):
        assert clean() != {}  # it did install something
    assert clean() == {}


@pytest.mark.parametrize("level", LEVELS)
def test_nested_watch_is_refused_clearly(level: str, clean) -> None:
    p = nn.Parameter(torch.ones(2))
    with gradwatch.watch(level=level) as outer:
        inside = clean()
        refused = pytest.raises(RuntimeError, match=r"already active.*nested watches are not")
        with refused, gradwatch.watch():
            pass
        assert clean() == inside  # the refused inner watch changed nothing
        with torch.no_grad():
            p.add_(1)
    assert [e.op for e in outer.events] == ["add_"]
    assert clean() == {}


def test_reentering_a_closed_watch_is_refused_or_clean(clean) -> None:
    w = gradwatch.watch()
    with w:
        pass
    try:
        with w:
            pass
    except RuntimeError:
        pass  # refusing is fine
    assert clean() == {}


def test_close_is_idempotent(clean) -> None:
    w = gradwatch.watch()
    with w:
        pass
    w.close()
    w.close()
    assert clean() == {}


@pytest.mark.parametrize("level", LEVELS)
def test_event_buffer_bounded_counts_exact(level: str) -> None:
    n, bound = 300, 50
    p = nn.Parameter(torch.ones(4))
    q = nn.Parameter(torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.watch(level=level, max_events=bound) as w:
            for i in range(n):
                with torch.no_grad():
                    p.add_(1)
                (q * i).sum().backward()  # a grad_accumulated each
                if i % 3 == 0:
                    with torch.no_grad():
                        q.grad.mul_(0)  # edits .grad under no_grad
    events = w.events
    assert len(events) == bound
    assert w.counts["inplace_no_grad"] == n + len(range(0, n, 3))
    assert w.counts["grad_accumulated"] == n
    # the buffer keeps the most recent ones
    adds = [e for e in events if e.op == "add_"]
    assert adds[-1].version_after == n
    assert len(w.anomalies) <= bound


def test_events_hold_no_tensors() -> None:
    model, opt = _model()
    with gradwatch.watch(model, opt, stats_every=1) as w:
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            with torch.no_grad():
                model[0].weight.mul_(0.5)
            opt.zero_grad()
    assert w.events

    def walk(value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from walk(getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(k)
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)
        else:
            yield value

    for ev in w.events:
        for leaf in walk(ev):
            assert not isinstance(leaf, torch.Tensor), ev
            assert leaf is None or isinstance(leaf, (str, int, float, bool)), (type(leaf), ev)


@pytest.mark.parametrize("level", ["full", "light"])
def test_event_buffer_bound_counts_events_not_records(level: str) -> None:
    """One backward over many leaves is one record internally: the bound still counts events."""
    from gradwatch import Watch

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])  # 20 leaves
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, level=level, max_events=30) as w:
        for _ in range(50):
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
        assert isinstance(w, Watch)
        held = w._runtime.emit.buffer.held
    assert 30 <= held < 30 + 20  # the bound, plus at most one batch less one event
    assert len(w.events) == 30
    assert w.counts["grad_accumulated"] == 50 * 20


def test_step_that_raises_leaves_no_sample_views_behind() -> None:
    """A statistics step keeps views into the parameters from the pre-step hook to the post-step
    hook; when the step raises, the post hook never runs: closing the watch drops them."""

    class Failing(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            raise RuntimeError("boom")

    model = nn.Linear(4, 4)
    opt = Failing(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        model(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="boom"):
            opt.step()  # step 0: a statistics step
        running = w._runtime.optimizers.running
        views = running[id(opt)].samples[0]
        assert [v is not None and v._base is not None for v in views] == [True, True]
    assert running == {}


def test_library_optimizer_step_runs_with_the_mode_aside_and_is_restored(clean) -> None:
    """full: torch's own step wrapper (profiler record, hooks) runs with gradwatch's mode set
    aside: the mode sees no call of a library optimizer's step; the class is restored at exit,
    and the step still shows in torch's profiler under its usual name."""
    from gradwatch._intercept import mode as mode_module

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    original = torch.optim.SGD.__dict__["step"]
    seen: list[str] = []
    real = mode_module.WatchMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        seen.append(getattr(func, "__name__", str(func)))
        return real(self, func, types, args, kwargs)

    mode_module.WatchMode.__torch_function__ = counting
    try:
        with gradwatch.watch(optimizer=opt, on_anomaly="raise") as w:
            assert torch.optim.SGD.__dict__["step"] is not original
            (p * 2).sum().backward()
            seen.clear()
            with torch.profiler.profile() as prof:
                opt.step()
            assert seen == []
            assert torch.optim.SGD.__dict__["step"].hooked  # torch's own marker, seen through
            opt.zero_grad()
    finally:
        mode_module.WatchMode.__torch_function__ = real
    assert torch.optim.SGD.__dict__["step"] is original
    assert "Optimizer.step#SGD.step" in {e.name for e in prof.events()}
    assert w.counts["optimizer_update"] == 1
    assert clean() == {}


@pytest.mark.parametrize("level", ["full", "light"])
def test_library_step_that_raises_puts_the_mode_back(level: str, clean) -> None:
    """The mode set aside for a library step is back right after a step that raised, and an
    in-place edit in a closure (user code) run by a library step is still seen."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)

    class Boom(Exception):
        pass

    def closure():  # type: ignore[no-untyped-def]
        with torch.no_grad():
            p.mul_(1.0)  # <closure-edit>
        loss = (p * 2).sum()
        loss.backward()
        return loss

    def failing_closure():  # type: ignore[no-untyped-def]
        raise Boom

    with gradwatch.watch(optimizer=opt, on_anomaly="log", level=level) as w:
        with pytest.raises(Boom):
            opt.step(failing_closure)
        with torch.no_grad():
            p.add_(0.0)  # <after-raise>
        opt.zero_grad()
        opt.step(closure)
    lines = {}
    with open(__file__) as f:
        for i, text in enumerate(f, 1):
            if "# <" in text:
                lines[text.rstrip().rsplit("# <", 1)[1].rstrip(">")] = i
    edits = [(e.op, e.location.lineno) for e in w.events if e.kind == "inplace_no_grad"]
    assert edits == [("add_", lines["after-raise"]), ("mul_", lines["closure-edit"])]
    assert clean() == {}
