"""Odd tensors and neighbours: no crash, no internal-error warning, sensible events (exact kinds,
ops, names and versions), and unchanged results next to other modes, hooks and tools."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradwatch

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = ["full", "light"]
HERE = __file__


def _line(marker: str) -> int:
    with open(HERE) as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, marker
    return hits[0]


class Watched:
    """``with Watched(level=...) as r:`` runs a watch, records GradWatchWarnings; ``r.w``."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer
        self.kwargs = kwargs

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        self.w = gradwatch.watch(self.model, self.optimizer, **self.kwargs)
        self.w.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.w.__exit__(*exc)
        finally:
            self._cm.__exit__(None, None, None)
        return False

    @property
    def internal(self) -> list[str]:
        return [str(c.message) for c in self.caught
                if issubclass(c.category, gradwatch.GradWatchWarning)
                and "internal error" in str(c.message)]

    def rows(self, kind: str = "inplace_no_grad"):
        return [(e.op, e.tensor, e.version_before, e.version_after, e.grad_mode,
                 e.location.lineno if e.location else None)
                for e in self.w.events if e.kind == kind]


# ----------------------------------------------------------------------------- inference tensors
@pytest.mark.parametrize("level", LEVELS)
def test_inference_tensors_have_no_version(level: str) -> None:
    with torch.inference_mode():
        model = nn.Linear(2, 2)  # parameters are inference tensors: no version counter
    p = nn.Parameter(torch.ones(2))
    with Watched(model, level=level) as r:
        with torch.inference_mode():
            model.weight.mul_(2)  # <inf-mul>
            t = torch.ones(2)
            t.add_(1)  # plain inference tensor: not tracked
        with torch.no_grad():
            p.copy_(t)  # <inf-copy>
    assert r.internal == []
    expected = [("copy_", "tensor float32[2]", 0, 1, "no_grad", _line("inf-copy"))]
    if level == "full":  # light does not see inference_mode being entered (documented miss)
        expected.insert(0, ("mul_", "weight", None, None, "inference_mode", _line("inf-mul")))
    assert r.rows() == expected
    assert torch.equal(p.detach(), torch.full((2,), 2.0))


# ----------------------------------------------------------------------------- views and aliases
@pytest.mark.parametrize("level", LEVELS)
def test_data_and_detach_aliases_of_a_parameter(level: str) -> None:
    m = nn.Linear(3, 3)
    with Watched(m, level=level) as r:
        m.weight.data.mul_(2)  # <data>
        m.weight.detach().add_(1)  # <detach>
    assert r.internal == []
    # light intercepts only while grad mode is off (documented miss): these run with grad on
    assert r.rows() == ([] if level == "light" else [
        ("mul_", "weight", 0, 1, "enabled", _line("data")),
        ("add_", "weight", 1, 2, "enabled", _line("detach")),
    ])


@pytest.mark.parametrize("level", LEVELS)
def test_views_of_an_unnamed_leaf_under_no_grad(level: str) -> None:
    with Watched(level=level) as r:
        q = torch.ones(4, requires_grad=True)
        with torch.no_grad():
            q[1:].add_(1)  # <v1>
            q.view(2, 2).mul_(2)  # <v2>
        vg = q[:2]  # a view taken with grad on
        with torch.no_grad():
            vg.sub_(1)  # <v3>
    assert r.internal == []
    assert r.rows() == [
        ("add_", "tensor float32[3]", 0, 1, "no_grad", _line("v1")),
        ("mul_", "tensor float32[2,2]", 1, 2, "no_grad", _line("v2")),
        ("sub_", "tensor float32[2]", 2, 3, "no_grad", _line("v3")),
    ]


@pytest.mark.parametrize("level", LEVELS)
def test_views_of_a_named_parameter_are_named(level: str) -> None:
    m = nn.Linear(3, 3)
    with Watched(m, level=level) as r, torch.no_grad():
        m.weight[0].add_(1)  # <nv1>
        m.weight.T.sub_(1)  # <nv2>
    assert r.rows() == [
        ("add_", "weight", 1, 2, "no_grad", _line("nv1")),  # nn.Linear's init made version 1
        ("sub_", "weight", 2, 3, "no_grad", _line("nv2")),
    ]


@pytest.mark.parametrize("level", LEVELS)
def test_detach_alias_of_a_plain_leaf_is_reported_by_its_variable(level: str) -> None:
    with Watched(level=level) as r:
        q = torch.ones(4, requires_grad=True)
        (q * 2).sum().backward()
        with torch.no_grad():
            q.detach().add_(1)  # <ua1>
    assert [row[:4] for row in r.rows()] == [("add_", "q", 0, 1)]


# ----------------------------------------------------------------------------- dtypes, layouts
@pytest.mark.parametrize("level", LEVELS)
def test_complex_tensors(level: str) -> None:
    c = torch.randn(3, dtype=torch.cfloat, requires_grad=True)
    with Watched(level=level, on_anomaly="log") as r:
        c.abs().sum().backward()
        with torch.no_grad():
            c.mul_(1j)  # <c1>
            c.div_(0)  # <c2>
        c.grad = None
        c.abs().sum().backward()
    assert r.internal == []
    assert r.rows() == [
        ("mul_", "c", 0, 1, "no_grad", _line("c1")),
        ("div_", "c", 1, 2, "no_grad", _line("c2")),
    ]
    (a,) = r.w.anomalies
    assert (a.kind, a.op, a.location.lineno) == ("nonfinite_introduced", "div_", _line("c2"))
    assert r.w.counts["grad_accumulated"] == 2


@pytest.mark.parametrize("level", LEVELS)
def test_integer_and_bool_tensors_are_not_tracked(level: str) -> None:
    with Watched(level=level) as r:
        i = torch.arange(4)
        b = torch.zeros(4, dtype=torch.bool)
        i.add_(1)
        b.logical_not_()
        i[0] = 5
        with torch.no_grad():
            i.add_(1)
            b |= True
            torch.add(i, 1, out=i)
    assert r.internal == []
    assert r.w.counts == {}
    assert i.tolist() == [7, 4, 5, 6] and b.all()


def _sparse_body():
    idx = torch.tensor([[0, 1], [1, 0]])
    s = torch.sparse_coo_tensor(idx, torch.tensor([1.0, 2.0]), (2, 2), requires_grad=True)
    d = torch.randn(2, 2, requires_grad=True)
    torch.sparse.mm(s, d).sum().backward()
    with torch.no_grad():
        s.mul_(2)  # <sp1>
    return s


@pytest.mark.parametrize("level", LEVELS)
def test_sparse_tensors(level: str) -> None:
    with Watched(level=level) as r:
        s = _sparse_body()
        p = nn.Parameter(torch.ones(2))
        with torch.no_grad():
            p.add_(1)  # <sp2>: the mode must still be on after the sparse write
    assert torch.equal(s.detach().to_dense(), torch.tensor([[0.0, 2.0], [4.0, 0.0]]))
    assert r.internal == []
    assert [row[:4] for row in r.rows()] == [
        ("mul_", "s", 0, 1), ("add_", "tensor float32[2]", 0, 1)]


def test_sparse_tensors_never_crash() -> None:
    """Whatever the diagnosis, a sparse write never breaks the run."""
    with Watched() as r:
        s = _sparse_body()
    assert torch.equal(s.detach().to_dense(), torch.tensor([[0.0, 2.0], [4.0, 0.0]]))
    assert r.w.counts["grad_accumulated"] == 2


@pytest.mark.parametrize("level", LEVELS)
def test_nested_tensor_under_no_grad(level: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
        a = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], requires_grad=True)
    p = nn.Parameter(torch.ones(2))
    with Watched(level=level) as r, torch.no_grad():
        b = a * 2
        p.add_(1)  # still observed after the nested op  # <nested-after>
    assert b.is_nested
    assert r.internal == []
    assert r.rows() == [("add_", "tensor float32[2]", 0, 1, "no_grad", _line("nested-after"))]


def test_nested_tensor_never_crashes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], requires_grad=True)
    with Watched() as r:
        with torch.no_grad():
            b = a * 2
        (a * 3).values().sum() if a.layout == torch.jagged else None
    assert b.is_nested
    assert r.w is not None


def test_jagged_nested_tensor_inplace() -> None:
    a = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)], layout=torch.jagged,
                                   requires_grad=True)
    with Watched() as r, torch.no_grad():
        a.mul_(2)
    assert r.internal == []


# ----------------------------------------------------------------------------- meta and fake
@pytest.mark.parametrize("level", LEVELS)
def test_meta_init_then_materialise(level: str) -> None:
    """Deferred init: build on meta, materialise with to_empty, then train. (Before c4f9378
    the meta init's change statistics broke the flush: events were lost for the run.)"""
    with Watched(level=level) as r:
        with torch.device("meta"):
            m = nn.Linear(3, 3)
        m.to_empty(device="cpu")
        with torch.no_grad():
            m.weight.fill_(0.5)
            m.bias.zero_()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            m(torch.ones(2, 3)).sum().backward()
            opt.step()
    assert r.internal == []
    assert len(r.w.events) == sum(r.w.counts.values())
    assert r.w.counts["optimizer_update"] == 2


@pytest.mark.parametrize("level", LEVELS)
def test_meta_tensors_do_not_crash(level: str) -> None:
    with Watched(level=level) as r:
        m = nn.Linear(3, 3, device="meta")
        m(torch.randn(2, 3, device="meta")).sum().backward()
        with torch.no_grad():
            m.weight.add_(1)
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert r.internal == []
    assert len(r.w.events) == sum(r.w.counts.values())
    assert r.w.counts["grad_accumulated"] == 2
    assert r.w.counts["optimizer_update"] == 1


@pytest.mark.parametrize("level", LEVELS)
def test_fake_tensor_mode(level: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with Watched(level=level) as r:
        with FakeTensorMode():
            m = nn.Linear(3, 3)
            m(torch.randn(2, 3)).sum().backward()
            with torch.no_grad():
                m.weight.add_(1)
        assert m.weight.grad.shape == (3, 3)
    assert r.internal == []


# ----------------------------------------------------------------------------- subclasses, modes
class LoggingTensor(torch.Tensor):
    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        LoggingTensor.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("level", LEVELS)
def test_tensor_subclass_with_torch_function(level: str) -> None:
    LoggingTensor.calls = 0
    with Watched(level=level) as r:
        p = torch.ones(3).as_subclass(LoggingTensor).requires_grad_()
        (p * 2).sum().backward()
        with torch.no_grad():
            p.add_(1)  # <sub>
    assert r.internal == []
    assert LoggingTensor.calls > 0
    assert r.rows() == [("add_", "p", 0, 1, "no_grad", _line("sub"))]
    assert r.w.counts["grad_accumulated"] == 1


class CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", "?"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("level", LEVELS)
def test_nested_function_modes(level: str, clean) -> None:
    p = nn.Parameter(torch.ones(3))
    outer = CountingMode()
    with outer, Watched(level=level) as r:
        with torch.device("cpu"):
            t = torch.ones(3)
        with CountingMode() as inner, torch.no_grad():
            p.add_(t)  # <m1>
        with torch.no_grad():
            p.mul_(2)  # <m2>
    assert r.internal == []
    assert "add_" in inner.names and "add_" in outer.names
    assert [row[:5] for row in r.rows()] == [
        ("add_", "tensor float32[3]", 0, 1, "no_grad"),
        ("mul_", "tensor float32[3]", 1, 2, "no_grad"),
    ]
    assert clean() == {}




@pytest.mark.parametrize(
    ("placement", "level"),
    [("outer", "full"),
     ("outer", "light"),
     ("inner", "full"),
     ("inner", "light")],
)
def test_location_with_a_user_mode(placement: str, level: str) -> None:
    p = nn.Parameter(torch.ones(3))
    if placement == "outer":
        with CountingMode(), Watched(level=level) as r, torch.no_grad():
            p.add_(1)  # <outer-mode>
        marker = "outer-mode"
    else:
        with Watched(level=level) as r, CountingMode(), torch.no_grad():
            p.add_(1)  # <inner-mode>
        marker = "inner-mode"
    assert [row[5] for row in r.rows()] == [_line(marker)]


def test_user_mode_left_open_at_exit_is_reported_not_broken(clean) -> None:
    from torch.overrides import _get_current_function_mode_stack

    user = CountingMode()
    with pytest.warns(gradwatch.GradWatchWarning, match="another TorchFunctionMode"), gradwatch.watch():
        user.__enter__()
    assert _get_current_function_mode_stack() == [user]  # ours taken from beneath it
    n = len(user.names)
    assert torch.ones(2).add(1).sum().item() == 4.0
    assert len(user.names) > n  # the user's mode still sees calls
    user.__exit__(None, None, None)
    assert clean() == {}


@pytest.mark.parametrize("nested", [False, True])
def test_light_mode_under_user_mode_left_open_is_removed(clean, nested: bool) -> None:
    """light pushes its mode for a no_grad block; a user mode entered inside it and left open
    when the watch ends: gradwatch's mode is taken from beneath, the user's stays."""
    from torch.overrides import _get_current_function_mode_stack

    outer = CountingMode() if nested else None
    if outer is not None:
        outer.__enter__()
    user = CountingMode()
    no_grad = torch.no_grad()
    w = gradwatch.watch(level="light")
    w.__enter__()
    no_grad.__enter__()
    user.__enter__()
    with pytest.warns(gradwatch.GradWatchWarning, match="another TorchFunctionMode"):
        w.__exit__(None, None, None)
    assert _get_current_function_mode_stack() == ([outer] if outer else []) + [user]
    user.__exit__(None, None, None)
    no_grad.__exit__(None, None, None)
    if outer is not None:
        outer.__exit__(None, None, None)
    assert clean() == {}


@pytest.mark.parametrize("level", LEVELS)
def test_dispatch_mode_flop_counter(level: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def flops() -> int:
        torch.manual_seed(0)
        m = nn.Linear(8, 8)
        with FlopCounterMode(display=False) as f:
            m(torch.randn(4, 8)).sum().backward()
        return f.get_total_flops()

    ref = flops()
    with Watched(level=level) as r:
        got = flops()
    assert got == ref > 0
    assert r.internal == []
    assert r.w.counts["grad_accumulated"] == 2


# ----------------------------------------------------------------------------- torch.compile
def _compile_run(backend: str, compile_module: bool, compile_step: bool, level: str | None):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    fwd = torch.compile(m, backend=backend) if compile_module else m

    def step():
        opt.step()

    step_fn = torch.compile(step, backend=backend) if compile_step else step

    def body():
        for _ in range(3):
            loss = fwd(torch.randn(4, 3)).sum()
            opt.zero_grad()
            loss.backward()
            step_fn()

    t0 = time.perf_counter()
    if level is None:
        body()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: global module hooks + compile
            with gradwatch.watch(m, opt, level=level):
                body()
    stats = dict(counters["stats"])
    return ([p.detach().clone() for p in m.parameters()], stats,
            sum(counters["recompiles"].values()), time.perf_counter() - t0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_module(backend: str) -> None:
    ref, _, _, _ = _compile_run(backend, True, False, None)
    got, _stats, recompiles, _ = _compile_run(backend, True, False, "full")
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert recompiles == 0


@pytest.mark.slow  # ~10 s of dynamo tracing
def test_compiled_optimizer_step_full() -> None:
    _compile_run("eager", False, True, "full")


@pytest.mark.slow  # ~10 s of dynamo tracing
def test_compiled_optimizer_step_light_no_graph_storm() -> None:
    ref, ref_stats, _, _ = _compile_run("eager", False, True, None)
    got, stats, recompiles, _ = _compile_run("eager", False, True, "light")
    for a, b in zip(ref, got):  # results stay identical even so
        assert torch.equal(a, b)
    assert recompiles == 0
    assert stats.get("unique_graphs") == ref_stats.get("unique_graphs")


# ----------------------------------------------------------------------------- autograd tools
def _ckpt_run(reentrant: bool, level: str | None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def body():
        for _ in range(3):
            x = torch.randn(4, 3, requires_grad=True)
            loss = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    if level is None:
        body()
        return [p.detach().clone() for p in m.parameters()], None
    with Watched(m, opt, level=level) as r:
        body()
    return [p.detach().clone() for p in m.parameters()], r


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint(reentrant: bool, level: str) -> None:
    ref, _ = _ckpt_run(reentrant, None)
    got, r = _ckpt_run(reentrant, level)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert r.internal == [] and r.w.anomalies == []
    assert r.w.counts["optimizer_update"] == 3
    named = {e.tensor for e in r.w.events if e.kind == "grad_accumulated"}
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= named


@pytest.mark.parametrize("level", LEVELS)
def test_save_on_cpu(level: str, clean) -> None:
    def run(watched: bool):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)

        def body():
            for _ in range(2):
                with torch.autograd.graph.save_on_cpu():
                    loss = m(torch.randn(4, 3)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()

        if watched:
            with Watched(m, opt, level=level) as r:
                body()
            assert r.internal == [] and r.w.anomalies == []
        else:
            body()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
    assert clean() == {}


@pytest.mark.parametrize("level", LEVELS)
def test_allow_mutation_on_saved_tensors(level: str) -> None:
    """torch allows the mutation here (it keeps a copy): no false saved_tensor_mutated."""

    def run(watched: bool):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(3))

        def body():
            with torch.autograd.graph.allow_mutation_on_saved_tensors():
                y = (p.sin() * 2).sum()
                with torch.no_grad():
                    p.mul_(2)  # <amost>
                y.backward()

        if watched:
            with Watched(level=level) as r:
                body()
            assert r.internal == [] and r.w.anomalies == []
            assert r.rows() == [("mul_", "tensor float32[3]", 0, 1, "no_grad", _line("amost"))]
        else:
            body()
        return p.grad.clone()

    assert torch.equal(run(False), run(True))


@pytest.mark.parametrize("level", LEVELS)
def test_torch_func_grad_and_vmap(level: str, clean) -> None:
    x = torch.randn(4, 3)

    def f(v):
        return (v.sin() ** 2).sum()

    ref = (torch.func.grad(f)(x[0]), torch.func.vmap(torch.func.grad(f))(x))
    with Watched(level=level) as r:
        hooks_before = torch._C._autograd._top_saved_tensors_default_hooks(False)
        got = (torch.func.grad(f)(x[0]), torch.func.vmap(torch.func.grad(f))(x))
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) == hooks_before
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert r.internal == [] and r.w.anomalies == []
    assert clean() == {}


# ----------------------------------------------------------------------------- threads, workers
@pytest.mark.parametrize("level", LEVELS)
def test_other_threads_documented_behaviour(level: str) -> None:
    """The watched loop is the thread that entered the watch: another thread's in-place edits
    (the mode is thread-local) and its backward passes (the wrappers check the thread) are not
    seen. Nothing crashes on either side."""
    p = nn.Parameter(torch.ones(3))
    seen: dict[str, object] = {}

    def work():
        with torch.no_grad():
            p.add_(1)  # invisible to gradwatch (other thread)
        (p * 2).sum().backward()
        seen["modes"] = len(torch.overrides._get_current_function_mode_stack())

    with Watched(level=level) as r:
        th = threading.Thread(target=work)
        th.start()
        th.join()
        with torch.no_grad():
            p.mul_(2)  # <main-thread>
    assert seen["modes"] == 0
    assert r.internal == []
    assert r.rows() == [("mul_", "tensor float32[3]", 1, 2, "no_grad", _line("main-thread"))]
    assert r.w.counts.get("grad_accumulated", 0) == 0


class _Noisy(torch.utils.data.Dataset):
    """Does torch work in the worker, including in-place ops under no_grad."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        with torch.no_grad():
            x.sub_(x.mean()).div_(x.std() + 1e-6)
        return x, torch.tensor(float(i % 2))


@pytest.mark.parametrize("level", LEVELS)
def test_dataloader_workers(level: str, tmp_path) -> None:
    def run(log_dir):
        torch.manual_seed(0)
        m = nn.Linear(4, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(_Noisy(), batch_size=8, num_workers=2,
                                             multiprocessing_context="fork")

        def body():
            for x, y in loader:
                loss = (m(x).squeeze(1) - y).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        if log_dir is None:
            body()
            return [p.detach().clone() for p in m.parameters()], None
        with Watched(m, opt, level=level, log_dir=log_dir) as r:
            body()
        return [p.detach().clone() for p in m.parameters()], r

    ref, _ = run(None)
    got, r = run(str(tmp_path))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert r.internal == [] and r.w.anomalies == []
    assert r.w.counts["optimizer_update"] == 4
    assert "inplace_no_grad" not in r.w.counts  # the workers' writes are not the trainer's
    lines = (tmp_path / "gradwatch.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]  # every line is valid JSON
    assert kinds.count("optimizer_update") == 4


@pytest.mark.parametrize("level", LEVELS)
def test_keyboard_interrupt_inside_the_loop(level: str, clean, tmp_path) -> None:
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    steps = 0
    watching = gradwatch.watch(m, opt, level=level, log_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt), watching as w:
        for i in range(100):
            opt.zero_grad()
            m(torch.randn(2, 3)).sum().backward()
            opt.step()
            steps += 1
            if i == 4:
                raise KeyboardInterrupt
    assert steps == 5 and w.counts["optimizer_update"] == 5
    assert clean() == {}
    lines = (tmp_path / "gradwatch.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines].count("optimizer_update") == 5
