"""Interception: every in-place form under no_grad is one inplace_no_grad event with the right
op, versions, grad mode, name and line; optimizers and torch's own in-place work stay silent."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from helpers import line_of, of_kind

HERE = __file__


def _only(w: gradwatch.Watch) -> gradwatch.Event:
    events = of_kind(w, "inplace_no_grad")
    assert len(events) == 1, events
    return events[0]


def test_augmented_sub_under_no_grad_is_one_event_with_versions_and_line() -> None:
    a = torch.tensor([2.0], requires_grad=True)
    with gradwatch.watch(on_anomaly="raise") as w, torch.no_grad():
        a -= 1.0  # <sub>
    ev = _only(w)
    assert ev.kind == gradwatch.EventKind.INPLACE_NO_GRAD == "inplace_no_grad"
    assert ev.severity == "info"
    assert ev.op == "sub_"
    assert (ev.version_before, ev.version_after) == (0, 1)
    assert ev.grad_mode == "no_grad"
    assert ev.tensor == "tensor float32[1]"
    assert ev.shape == (1,) and ev.dtype == "float32" and ev.device == "cpu"
    assert ev.location.filename == HERE and ev.location.lineno == line_of("sub")
    assert ev.location.code == "a -= 1.0  # <sub>"
    assert ev.change is not None and ev.change.l2 == pytest.approx(1.0)
    assert ev.change.rel == pytest.approx(0.5) and ev.change.nonfinite is False
    assert w.anomalies == []


@pytest.mark.parametrize(
    ("op", "edit"),
    [
        ("add_", lambda t: t.add_(1)),
        ("mul_", lambda t: t.__imul__(2)),
        ("div_", lambda t: t.__itruediv__(2)),
        ("pow_", lambda t: t.__ipow__(2)),
        ("clamp_", lambda t: t.clamp_(-0.1, 0.1)),
        ("copy_", lambda t: t.copy_(torch.ones_like(t))),
        ("zero_", lambda t: t.zero_()),
        ("fill_", lambda t: t.fill_(3.0)),
        ("__setitem__", lambda t: t.__setitem__(0, 5.0)),
        ("normal_", lambda t: t.normal_()),
        ("addcmul_", lambda t: t.addcmul_(t, t, value=0.5)),
        ("lerp_", lambda t: t.lerp_(torch.zeros_like(t), 0.5)),
    ],
)
def test_each_inplace_method(op: str, edit) -> None:
    w_ = nn.Parameter(torch.ones(3))
    with gradwatch.watch(on_anomaly="raise") as w, torch.no_grad():
        edit(w_)
    ev = _only(w)
    assert ev.op == op
    assert ev.version_after == ev.version_before + 1


def test_bitwise_augmented_and_out_and_foreach() -> None:
    mask = torch.ones(4, dtype=torch.bool)
    p = nn.Parameter(torch.ones(4))
    q = nn.Parameter(torch.ones(4))
    model = nn.Module()
    model.p, model.q = p, q
    model.register_buffer("mask", mask)
    with gradwatch.watch(model, on_anomaly="raise") as w, torch.no_grad():
        model.mask &= torch.tensor([True, False, True, False])  # <iand>
        torch.add(p, 1, out=p)  # <out>
        torch._foreach_mul_([p, q], 2.0)  # <foreach>
    evs = of_kind(w, "inplace_no_grad")
    got = [(e.op, e.tensor, e.location.lineno, e.version_before, e.version_after) for e in evs]
    assert got == [
        ("__iand__", "mask", line_of("iand"), 0, 1),
        ("add", "p", line_of("out"), 0, 1),
        ("_foreach_mul_", "p", line_of("foreach"), 1, 2),
        ("_foreach_mul_", "q", line_of("foreach"), 0, 1),
    ]


def test_grad_modes_inference_mode_and_decorator() -> None:
    p = nn.Parameter(torch.ones(2))

    @torch.no_grad()
    def decorated() -> None:
        p.mul_(2)  # <decorated>

    with gradwatch.watch(on_anomaly="raise") as w:
        decorated()
        with torch.set_grad_enabled(False):
            p.add_(1)  # <set_grad>
        with torch.inference_mode():
            p.sub_(1)  # <inference>
    evs = of_kind(w, "inplace_no_grad")
    assert [(e.op, e.grad_mode, e.location.lineno) for e in evs] == [
        ("mul_", "no_grad", line_of("decorated")),
        ("add_", "no_grad", line_of("set_grad")),
        ("sub_", "inference_mode", line_of("inference")),
    ]
    assert [(e.version_before, e.version_after) for e in evs] == [(0, 1), (1, 2), (2, 3)]


def test_inference_tensor_has_no_version() -> None:
    with torch.inference_mode():
        t = torch.ones(3)
    p = nn.Parameter(torch.ones(3))
    with gradwatch.watch(on_anomaly="raise") as w, torch.inference_mode():
        t.add_(1)  # an untracked inference tensor: nothing
        p.copy_(t)  # <copy>
    ev = _only(w)
    assert ev.op == "copy_" and ev.location.lineno == line_of("copy")
    assert ev.grad_mode == "inference_mode"


def test_data_alias_and_data_assignment_are_named_by_storage() -> None:
    model = nn.Linear(3, 2)
    with gradwatch.watch(model, on_anomaly="raise") as w:
        model.weight.data.mul_(0.5)  # <data_mul>
        model.bias.data = torch.zeros(2)  # <data_set>
    evs = of_kind(w, "inplace_no_grad")
    assert [(e.op, e.tensor, e.grad_mode, e.location.lineno) for e in evs] == [
        ("mul_", "weight", "enabled", line_of("data_mul")),
        ("data.__set__", "bias", "enabled", line_of("data_set")),
    ]


def test_relu_inplace_kwarg_on_tracked_tensor_and_nn_init() -> None:
    model = nn.Linear(4, 4)
    with gradwatch.watch(model, on_anomaly="raise") as w:
        with torch.no_grad():
            F.relu(model.weight, inplace=True)  # <relu>
        nn.init.normal_(model.bias)  # <init>
        nn.init.zeros_(model.weight)  # <zeros>
    evs = of_kind(w, "inplace_no_grad")
    assert [(e.op, e.tensor, e.location.lineno) for e in evs] == [
        ("relu", "weight", line_of("relu")),
        ("normal_", "bias", line_of("init")),
        ("zero_", "weight", line_of("zeros")),
    ]
    assert w.anomalies == []


@pytest.mark.parametrize("level", ["full", "light"])
def test_building_and_moving_a_model_inside_the_watch_is_no_edit(level: str) -> None:
    """A module built inside the watch initialises new tensors (nn.init on version 0), and
    ``model.to()`` to its own device sets each ``.data`` to itself: neither is an edit. A later
    re-initialisation and a real ``.data`` replacement are."""
    with gradwatch.watch(level=level, on_anomaly="raise") as w:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        model.to("cpu")
        model.to(torch.float32)
        model(torch.randn(2, 3))  # (zero configuration: modules are named when they run)
        with torch.no_grad():
            nn.init.zeros_(model[2].bias)  # <reinit>
            model[0].weight.data = torch.zeros(4, 3)  # <replace>
    assert [(e.op, e.tensor, e.location.lineno) for e in of_kind(w, "inplace_no_grad")] == [
        ("zero_", "2.bias", line_of("reinit")),
        ("data.__set__", "0.weight", line_of("replace")),
    ]


def test_grad_edit_is_named_dot_grad() -> None:
    model = nn.Linear(2, 1)
    with gradwatch.watch(model, on_anomaly="raise") as w:
        model(torch.ones(1, 2)).sum().backward()
        with torch.no_grad():
            model.weight.grad.mul_(0.5)  # <grad_mul>
    ev = _only(w)
    assert (ev.tensor, ev.op, ev.location.lineno) == ("weight.grad", "mul_", line_of("grad_mul"))


def test_untracked_tensors_and_grad_enabled_activations_are_not_events() -> None:
    x = torch.zeros(3)
    model = nn.Linear(3, 3)
    with gradwatch.watch(model, on_anomaly="raise") as w:
        with torch.no_grad():
            x.add_(1)  # a plain tensor: not tracked
        h = model(x)
        h = F.relu(h, inplace=True)  # grad enabled, recorded by autograd
        h.sum().backward()
    assert of_kind(w, "inplace_no_grad") == []
    assert w.anomalies == []


@pytest.mark.parametrize("level", ["full", "light"])
def test_buffer_updates_in_forward_are_not_edits_under_no_grad(level: str) -> None:
    """BatchNorm's ``num_batches_tracked.add_(1)`` runs in forward with grad on: no
    ``inplace_no_grad`` at either level; the same buffer edited under no_grad is one."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise") as w:
        for _ in range(3):
            model(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model[1].running_mean.mul_(0.5)  # <buffer_edit>
    assert [(e.tensor, e.grad_mode, e.location.lineno) for e in of_kind(w, "inplace_no_grad")] == [
        ("1.running_mean", "no_grad", line_of("buffer_edit"))]
    assert w.counts == {"grad_accumulated": 12, "optimizer_update": 3, "inplace_no_grad": 1}


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
    ],
    ids=["sgd", "sgd-foreach", "sgd-fused", "adam", "adam-foreach", "adam-fused", "adamw",
         "adamw-foreach", "adamw-fused"],
)
def test_optimizers_report_one_update_per_step_and_no_anomaly(make) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = make(model.parameters())
    with gradwatch.watch(model, opt, on_anomaly="raise", stats_every=1) as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # <clip>
            opt.step()  # <step>
    updates = of_kind(w, "optimizer_update")
    assert [(e.step, e.op, e.location.lineno) for e in updates] == [
        (0, "optimizer.step", line_of("step")),
        (1, "optimizer.step", line_of("step")),
        (2, "optimizer.step", line_of("step")),
    ]
    assert w.step == 3
    ratios = updates[0].update_ratios
    assert sorted(ratios) == ["0.bias", "0.weight", "1.bias", "1.weight", "3.bias", "3.weight"]
    assert ratios["0.weight"] > 0 and ratios["3.weight"] > 0 and ratios["1.weight"] > 0
    assert all(r < 10 for r in ratios.values())  # 1.bias starts at 0: ratio uses ‖w‖ after
    assert updates[0].change is not None and updates[0].change.l2 > 0
    assert w.counts["grad_accumulated"] == 3 * 6
    assert w.anomalies == []
    # clip_grad_norm_ scales each .grad under no_grad: inplace_no_grad, never an anomaly
    # (one event per .grad and call, named by the function the user called, at that line)
    clip = [e for e in of_kind(w, "inplace_no_grad") if e.tensor.endswith(".grad")]
    assert len(clip) == 3 * 6
    assert {(e.op, e.location.lineno, e.grad_mode) for e in clip} == {
        ("clip_grad_norm_", line_of("clip"), "no_grad")}
    assert sorted(e.tensor for e in clip[:6]) == sorted(f"{n}.grad" for n in ratios)
    assert all(e.version_after == e.version_before + 1 for e in clip)
    assert all(e.shape == tuple(model.get_parameter(e.tensor[:-5]).shape) for e in clip)


def test_lifetime_nothing_kept_alive_and_everything_removed() -> None:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    from torch.overrides import _get_current_function_mode_stack

    model = nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters())
    with gradwatch.watch(model, opt) as w:
        for _ in range(3):
            x = torch.randn(4, 8)
            act = model(x)
            act_ref = weakref.ref(act)
            act.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            del act
            gc.collect()
            assert act_ref() is None
        graph = model(torch.randn(2, 8)).sum()  # a pending graph, dropped while watching
        graph_ref = weakref.ref(graph)
        del graph
        gc.collect()
        assert graph_ref() is None
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(model.weight)]
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert _get_current_function_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not hasattr(torch.autograd.backward, "__wrapped__")
    assert w.counts["optimizer_update"] == 3


def test_removed_on_exception_and_user_exception_unchanged() -> None:
    from torch.overrides import _get_current_function_mode_stack

    with pytest.raises(KeyError, match="boom") as info, gradwatch.watch():
        raise KeyError("boom")
    assert type(info.value) is KeyError
    assert _get_current_function_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_bounded_buffer_exact_counts_over_hundreds_of_steps() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, max_events=50) as w:
        for _ in range(300):
            opt.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert len(w.events) == 50
    assert w.counts == {"grad_accumulated": 600, "optimizer_update": 300}
    assert w.events[-1].kind == "optimizer_update" and w.events[-1].step == 299


def test_nested_watch_is_refused() -> None:
    with gradwatch.watch(), pytest.raises(RuntimeError, match="already active"), gradwatch.watch():
        pass


@pytest.mark.parametrize("level", ["full", "light"])
def test_clipping_is_one_unit_per_call_with_torchs_behaviour_unchanged(level: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    unused = nn.Parameter(torch.ones(3))  # no .grad: clipping leaves it alone, no event
    opt = torch.optim.SGD([*model.parameters(), unused], lr=0.1)
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise") as w:
        model(torch.randn(16, 4)).pow(2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_((p for p in [*model.parameters(), unused]), 1.0)  # <norm>
        torch.nn.utils.clip_grad_value_(model[0].weight, 1e-3)  # <value>
        with pytest.warns(UserWarning, match="empty generator"):
            torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
        opt.step()
    assert isinstance(norm, torch.Tensor) and norm > 0
    clip = [e for e in of_kind(w, "inplace_no_grad") if e.tensor.endswith(".grad")]
    assert [(e.op, e.location.lineno) for e in clip] == (
        [("clip_grad_norm_", line_of("norm"))] * 4 + [("clip_grad_value_", line_of("value"))])
    assert [e.tensor for e in clip] == ["0.weight.grad", "0.bias.grad", "2.weight.grad",
                                        "2.bias.grad", "0.weight.grad"]
    # clip_grad_value_ clamps twice (clamp_min_, clamp_max_): two versions
    assert [(e.version_before, e.version_after) for e in clip] == [(0, 1)] * 4 + [(1, 3)]
    assert (model[0].weight.grad.abs() <= 1e-3).all()
    assert w.anomalies == []


def test_dataloader_batches_are_loaded_outside_the_mode_and_the_loop_stays_watched() -> None:
    """full: a num_workers=0 DataLoader indexes and collates every sample in this process; that
    runs with the mode stepped aside, and the loop body around it is watched as before."""
    from torch.overrides import _get_current_function_mode_stack

    from gradwatch._intercept.mode import WatchMode

    ds = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    model = nn.Linear(4, 1)
    seen = []

    class Spy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            seen.append([type(m) for m in _get_current_function_mode_stack()])
            return ds[i]

    with gradwatch.watch(model, on_anomaly="raise") as w:
        for x, y in loader:
            assert [type(m) for m in _get_current_function_mode_stack()] == [WatchMode]
            (model(x) - y).pow(2).mean().backward()
            with torch.no_grad():
                model.weight -= 0.1 * model.weight.grad  # <edit>
            model.zero_grad()
        for _ in torch.utils.data.DataLoader(Spy(), batch_size=6):
            pass
    assert seen == [[]] * 12
    edits = [e for e in of_kind(w, "inplace_no_grad") if e.tensor == "weight"]
    assert [(e.op, e.location.lineno, e.version_after) for e in edits] == [
        ("sub_", line_of("edit"), v) for v in (2, 3, 4)]  # nn.Linear init wrote version 1
    assert _get_current_function_mode_stack() == []
