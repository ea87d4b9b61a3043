"""Each anomaly kind is named at its culprit line (kind, severity, tensor, file:line, note), and
correct loops that look similar stay silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch
from helpers import anomalies, line_of

HERE = __file__
LEVELS = ["full", "light"]


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    from torch.overrides import _get_current_function_mode_stack
    assert torch.is_grad_enabled()
    assert _get_current_function_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


# ----------------------------------------------------------------------------- saved_tensor_mutated
def _gan_step_between_forward_and_backward(level: str, on_anomaly: str = "log"):
    torch.manual_seed(0)
    G, D = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    with gradwatch.watch([G, D], on_anomaly=on_anomaly, level=level) as w:
        fake = G(torch.randn(8, 4))
        loss_g = -D(fake).mean()
        loss_d = D(fake.detach()).mean()
        loss_d.backward()
        opt_d.step()  # <gan_step>
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss_g.backward()
    return w, info.value


@pytest.mark.parametrize("level", LEVELS)
def test_gan_optimizer_step_on_saved_weight(level: str) -> None:
    w, err = _gan_step_between_forward_and_backward(level)
    line = line_of("gan_step")
    assert anomalies(w) == [("saved_tensor_mutated", "D.weight", line)]
    ev = w.anomalies[0]
    assert ev.severity == "error" and ev.op == "optimizer.step"
    assert ev.hint.startswith("call backward on every loss that uses these weights before")
    (note,) = err.__notes__
    assert note.startswith("gradwatch: `D.weight` was modified in place by optimizer.step")
    assert f"{HERE}:{line}" in note and "Fix:" in note


@pytest.mark.parametrize("level", LEVELS)
def test_retained_graph_gan_names_the_weight_torch_names(level: str) -> None:
    """pytorch/pytorch#39141: D steps between ``D_loss.backward(retain_graph=True)`` and
    ``G_loss.backward()`` through the same graph. Torch names a [128, 1] tensor (the last
    layer's weight, saved transposed); D's first bias has as many elements and must not win."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(5, 128), nn.ReLU(), nn.Linear(128, 15))
    D = nn.Sequential(nn.Linear(15, 128), nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid())
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4)
    with gradwatch.watch([G, D], [opt_g, opt_d], level=level, on_anomaly="log") as w:
        prob_real, prob_fake = D(torch.randn(64, 15)), D(G(torch.randn(64, 5)))
        d_loss = -torch.mean(torch.log(prob_real) + torch.log(1.0 - prob_fake))
        g_loss = torch.mean(torch.log(1.0 - prob_fake))
        opt_d.zero_grad()
        d_loss.backward(retain_graph=True)
        opt_d.step()  # <retained_step>
        opt_g.zero_grad()
        with pytest.raises(RuntimeError, match="is at version 2; expected version 1") as info:
            g_loss.backward()
    assert "[torch.FloatTensor [128, 1]]" in str(info.value)
    line = line_of("retained_step")
    assert [a for a in anomalies(w) if a[0] == "saved_tensor_mutated"] == [
        ("saved_tensor_mutated", "D.2.weight", line)]
    (mutated,) = [a for a in w.anomalies if a.kind == "saved_tensor_mutated"]
    assert mutated.shape == (1, 128)
    assert info.value.__notes__[0].startswith("gradwatch: `D.2.weight` was modified in place")


def test_raise_reports_the_mutating_line_when_backward_uses_the_graph() -> None:
    """Certainty before severity: the write is an error once a backward uses the graph (torch's
    own error, with the note naming the write), not while the graph might never be used."""
    a = torch.randn(3, requires_grad=True)
    w_ = nn.Parameter(torch.randn(3))
    with gradwatch.watch(on_anomaly="raise") as w:
        loss = (w_ * a).sum()
        with torch.no_grad():
            w_ -= 0.1  # <raise_here>
        assert w.anomalies == [] and w_._version == 1
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss.backward()
    assert not isinstance(info.value, gradwatch.AnomalyError)  # torch's own error, unchanged
    assert f":{line_of('raise_here')} (`w_ -= 0.1" in info.value.__notes__[0]
    ev = w.anomalies[0]
    assert (ev.kind, ev.location.lineno, ev.version_before) == (
        "saved_tensor_mutated", line_of("raise_here"), 0)


@pytest.mark.parametrize("level", LEVELS)
def test_a_graph_kept_alive_but_never_backwarded_is_no_error(level: str) -> None:
    """``y, _ = f(x)`` keeps the discarded output's graph alive across the step (correct code);
    adversarial training's ``torch.autograd.grad`` on the input with an L2 term likewise."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise") as w:
        for _ in range(3):
            x = torch.randn(2, 4, requires_grad=True)
            out, _ = model(x), model(x * 2)  # `_` and its graph stay alive across the step
            grad_x, = torch.autograd.grad(model(x).pow(2).sum() + model.weight.pow(2).sum(), x)
            loss = (out - (x + 0.01 * grad_x.sign()).detach()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.anomalies == []


@pytest.mark.parametrize("level", LEVELS)
def test_a_fused_step_on_a_saved_weight_is_reported_when_backward_silently_uses_it(
        level: str) -> None:
    """A fused optimizer bumps no version counter: torch raises nothing when the graph that saved
    the weights is backwarded after the step. Full reports it at the step, after the backward."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 3, requires_grad=True)
    with gradwatch.watch(model, opt, level=level, on_anomaly="log") as w:
        first = model(x).sum()
        model(x).sum().backward()
        opt.step()  # <fused_step>
        first.backward()  # uses the new weights: no error from torch
    found = [(a.kind, a.tensor, a.location.lineno) for a in w.anomalies]
    if level == "full":
        assert found == [("saved_tensor_mutated", "weight", line_of("fused_step"))]
    else:
        assert found == []  # light keeps no registry (a documented miss)


@pytest.mark.parametrize("entry", ["tensor.backward", "autograd.backward", "autograd.grad"])
def test_note_on_every_backward_entry(entry: str) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    with gradwatch.watch(on_anomaly="log") as w:
        y = x.sigmoid()
        y /= y.norm()  # <norm_inplace>
        root = y.sum()
        with pytest.raises(RuntimeError, match="is at version 1; expected version 0") as info:
            if entry == "tensor.backward":
                root.backward()
            elif entry == "autograd.backward":
                torch.autograd.backward(root)
            else:
                torch.autograd.grad(root, x)
    line = line_of("norm_inplace")
    assert anomalies(w) == [("saved_tensor_mutated", "tensor float32[4,3]", line)]
    assert (w.anomalies[0].version_before, w.anomalies[0].version_after) == (0, 1)
    assert len(info.value.__notes__) == 1 and f":{line} (`y /= y.norm()" in info.value.__notes__[0]


def test_data_alias_write_on_saved_weight_is_caught_although_torch_is_silent() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    model = nn.Linear(3, 1)
    with gradwatch.watch(model, on_anomaly="log") as w:
        out = model(x).sum()  # saves weight (x requires grad)
        model.weight.data.mul_(2)  # <data_write>
        out.backward()  # torch raises nothing: the gradient of x silently uses 2*W
    assert anomalies(w) == [("saved_tensor_mutated", "weight", line_of("data_write"))]
    assert "silently" in w.anomalies[0].message


def test_embedding_max_norm_renorm_of_saved_weight() -> None:
    emb = nn.Embedding(10, 3, max_norm=0.5)
    q = torch.randn(3, 1, requires_grad=True)
    with gradwatch.watch(emb, on_anomaly="log") as w:
        scores = (emb.weight @ q).sum()
        looked_up = emb(torch.tensor([1, 2])).sum()  # <renorm>
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (scores + looked_up).backward()
    assert anomalies(w) == [("saved_tensor_mutated", "weight", line_of("renorm"))]
    assert w.anomalies[0].op == "embedding_renorm_"


def test_retained_graph_used_once_is_not_reported_at_mutation() -> None:
    p = nn.Parameter(torch.ones(3))
    x = torch.randn(3, requires_grad=True)
    with gradwatch.watch(on_anomaly="log") as w:
        loss = (p * x).sum()
        loss.backward(retain_graph=True)
        with torch.no_grad():
            p.add_(1)  # the graph has been used: only a second backward would fail
        del loss
    assert w.anomalies == []


# ----------------------------------------------------------------------------- grad_flow_cut
@pytest.mark.parametrize("level", LEVELS)
def test_essay_example_1_note_names_the_rebinding_line(level: str) -> None:
    with gradwatch.watch(on_anomaly="log", level=level) as w:
        a = torch.tensor([2.0], requires_grad=True)
        b = torch.tensor([1.0], requires_grad=True)
        with torch.no_grad():
            a = a - b  # <rebind>
        c = a * a
        with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad") as info:
            c.backward()
    line = line_of("rebind")
    assert anomalies(w) == [("grad_flow_cut", "tensor float32[1]", line)]
    (note,) = info.value.__notes__
    assert note.startswith("gradwatch:") and f"{HERE}:{line} (`a = a - b" in note
    assert "`a`" in note


def test_loss_computed_under_no_grad_names_the_cutting_line() -> None:
    """The note names the line in the root's lineage where grad stopped flowing (the model ran
    under no_grad), not only the block around it."""
    model = nn.Linear(3, 1)
    with gradwatch.watch(model, on_anomaly="log") as w:
        with torch.no_grad():
            loss = model(torch.randn(4, 3)).pow(2).mean()  # <cut>
        with pytest.raises(RuntimeError, match="does not require grad") as info:
            loss.backward()
    assert anomalies(w) == [("grad_flow_cut", "tensor float32[]", line_of("cut"))]
    note = info.value.__notes__[0]
    assert note.startswith("gradwatch: the gradient was cut here: linear under no_grad at ")
    assert f":{line_of('cut')} (`loss = model(torch.randn(4, 3))" in note


def test_loss_computed_under_a_no_grad_block_entered_without_a_cut_names_the_block() -> None:
    """No op of the block read a tensor that requires grad (the loss is a plain tensor
    made there): the block is all there is to name."""
    with gradwatch.watch(on_anomaly="log") as w:
        with torch.no_grad():  # <block>
            loss = torch.ones(3).sum()
        with pytest.raises(RuntimeError, match="does not require grad") as info:
            loss.backward()
    assert anomalies(w) == [("grad_flow_cut", "tensor float32[]", line_of("block"))]
    assert "no_grad block" in info.value.__notes__[0]


def test_argmax_in_the_loss_path_names_its_line() -> None:
    model = nn.Linear(3, 4)
    with gradwatch.watch(model, on_anomaly="log") as w:
        logits = model(torch.randn(5, 3))
        metric = (logits.argmax(1) == 0).float().mean().item()  # correct: a metric, logged
        pred = logits.argmax(1).float()  # <argmax>
        loss = (pred - 1.0).pow(2).mean()
        with pytest.raises(RuntimeError, match="does not require grad") as info:
            loss.backward()
    assert anomalies(w) == [("grad_flow_cut", "tensor float32[]", line_of("argmax"))]
    assert "argmax at " in info.value.__notes__[0] and metric >= 0


def test_manual_sgd_rebinding_silently_stops_training() -> None:
    x = torch.randn(16, 3)
    w_ = torch.zeros(3, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(3):
            loss = (x @ w_ + b).pow(2).mean() + b.sum()
            loss.backward()
            with torch.no_grad():
                if w_.grad is not None:
                    w_ = w_ - 0.1 * w_.grad  # <sgd_rebind>
                b -= 0.1 * b.grad
                b.grad.zero_()
    assert anomalies(w) == [("grad_flow_cut", "w_", line_of("sgd_rebind"))]
    assert "`w_` was trained but has been replaced" in w.anomalies[0].message


@pytest.mark.parametrize("level", LEVELS)
def test_functional_call_parameters_rebound_under_no_grad(level: str) -> None:
    """``p - lr * p.grad`` of an nn.Parameter is a plain Tensor: still a cut, at its line."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    params = dict(model.named_parameters())
    with (gradwatch.watch(model, level=level, on_anomaly="log") as w,
          pytest.raises(RuntimeError, match="does not require grad") as info):
        for _ in range(3):
            x, y = torch.randn(4, 8), torch.randn(4, 1)
            loss = (functional_call(model, params, (x,)) - y).pow(2).mean()
            loss.backward()
            with torch.no_grad():
                params = {k: p - 0.1 * p.grad for k, p in params.items()}  # <dict_rebind>
    line = line_of("dict_rebind")
    assert [(a[0], a[2]) for a in anomalies(w)] == [("grad_flow_cut", line)]
    assert w.anomalies[0].tensor in {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert f"{HERE}:{line}" in info.value.__notes__[0]


def test_target_network_and_teacher_outputs_under_no_grad_are_fine() -> None:
    online, target = nn.Linear(4, 2), nn.Linear(4, 2)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    with gradwatch.watch([online, target], opt, on_anomaly="raise") as w:
        for _ in range(3):
            s = torch.randn(8, 4)
            with torch.no_grad():
                y = target(s).max(1).values
            loss = (online(s).max(1).values - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.anomalies == []


# ----------------------------------------------------------------------------- stale accumulation
@pytest.mark.parametrize("level", LEVELS)
def test_essay_example_3_stale_at_second_backward(level: str) -> None:
    with gradwatch.watch(on_anomaly="log", level=level) as w:
        a = torch.tensor([2.0], requires_grad=True)
        b = torch.tensor([1.0], requires_grad=True)
        (a * a).backward()
        with torch.no_grad():
            a -= b  # <the_edit>
        (a * a).backward()  # <second_backward>
    assert a.grad.item() == 6.0
    assert anomalies(w) == [("stale_grad_accumulation", "a", line_of("second_backward"))]
    assert w.anomalies[0].severity == "warning"
    assert f"last edited at {HERE}:{line_of('the_edit')} (`a -= b" in w.anomalies[0].message


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("level", LEVELS)
def test_forgotten_zero_grad(level: str, fused: bool) -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    with gradwatch.watch(model, opt, on_anomaly="log", level=level) as w:
        for _ in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()  # <no_zero>
            opt.step()
    line = line_of("no_zero")
    assert sorted(set(anomalies(w))) == [("stale_grad_accumulation", "bias", line),
                                         ("stale_grad_accumulation", "weight", line)]
    assert w.counts["stale_grad_accumulation"] == 4  # 2 params x steps 2 and 3


def _lbfgs_run(level: str, zero_in_closure: bool, **watch_args) -> gradwatch.Watch:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x = torch.randn(32, 3)
    y = (x ** 2).sum(1, keepdim=True)
    args = (model, opt) if watch_args.pop("named", True) else ()
    with gradwatch.watch(*args, on_anomaly="log", level=level, **watch_args) as w:
        for _ in range(2):
            def closure():  # type: ignore[no-untyped-def]
                if zero_in_closure:
                    opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()  # <lbfgs_backward>
                return loss

            opt.step(closure)
    return w


@pytest.mark.parametrize("level", LEVELS)
def test_lbfgs_closure_called_several_times_per_step_is_silent(level: str) -> None:
    """LBFGS calls the closure (zero_grad, forward, backward) up to max_iter times per step and
    reads .grad after each call: zeroing the previous call's gradients discards nothing."""
    w = _lbfgs_run(level, zero_in_closure=True)
    assert w.anomalies == []
    # 2 steps x 3 closure calls x 4 parameters
    assert w.counts == {"grad_accumulated": 24, "optimizer_update": 2}


@pytest.mark.parametrize("level", LEVELS)
def test_lbfgs_closure_without_zero_grad_is_stale(level: str) -> None:
    w = _lbfgs_run(level, zero_in_closure=False)
    line = line_of("lbfgs_backward")
    assert {a[0] for a in anomalies(w)} == {"stale_grad_accumulation"}
    assert {a[2] for a in anomalies(w)} == {line}
    assert {a[1] for a in anomalies(w)} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_parameters_first_seen_through_the_optimizer_take_their_module_names() -> None:
    """Zero configuration: the optimizer hook names parameters after the optimizer; once their
    module runs (here only inside the closure) its names replace those."""
    w = _lbfgs_run("full", zero_in_closure=True, named=False)
    names = {e.tensor for e in w.events if e.kind == "grad_accumulated"}
    assert names == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_warned_once_per_finding() -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt) as w:
            for _ in range(5):
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
    ours = [c for c in caught if issubclass(c.category, gradwatch.GradWatchWarning)]
    assert len(ours) == 1  # weight and bias, at one line: one finding, warned once
    assert "on weight, bias (2 tensors)" in str(ours[0].message)
    assert w.counts["stale_grad_accumulation"] == 8
    assert all(c.filename == HERE for c in ours)


@pytest.mark.parametrize("level", LEVELS)
def test_intended_accumulation_and_gan_discriminator_pickup_are_silent(level: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    G, D = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g = torch.optim.Adam(G.parameters())
    opt_d = torch.optim.Adam(D.parameters())
    with gradwatch.watch(on_anomaly="raise", level=level) as w:
        for i in range(8):
            (model(torch.randn(4, 3)).pow(2).mean() / 4).backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
        for _ in range(3):  # correct GAN: recompute after the other network's step
            fake = G(torch.randn(8, 4))
            opt_d.zero_grad()
            D(fake.detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-D(fake).mean()).backward()  # also accumulates into D's .grad: zeroed before use
            opt_g.step()
    assert w.anomalies == []


# ----------------------------------------------------------------------------- discarded
@pytest.mark.parametrize("level", LEVELS)
def test_zero_grad_inside_the_accumulation_window(level: str) -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_anomaly="log", level=level) as w:
        for i in range(8):
            opt.zero_grad()  # <zero_in_window>
            model(torch.randn(4, 3)).pow(2).mean().backward()
            if i % 4 == 3:
                opt.step()
    line = line_of("zero_in_window")
    assert sorted(set(anomalies(w))) == [("accumulated_grad_discarded", "bias.grad", line),
                                         ("accumulated_grad_discarded", "weight.grad", line)]
    assert w.counts["accumulated_grad_discarded"] == 2 * 6  # i = 1, 2, 3 and 5, 6, 7
    assert w.anomalies[0].op == "zero_grad"


def test_manual_grad_none_and_zero_are_seen() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with gradwatch.watch(optimizer=opt, on_anomaly="log") as w:
        (p * 2).sum().backward()
        p.grad = None  # <set_none>
        (p * 2).sum().backward()
        with torch.no_grad():
            p.grad.zero_()  # <zero>
    assert [(a.kind.value, a.location.lineno) for a in w.anomalies] == [
        ("accumulated_grad_discarded", line_of("set_none")),
        ("accumulated_grad_discarded", line_of("zero")),
    ]


@pytest.mark.parametrize("level", LEVELS)
def test_skipped_nonfinite_step_and_manual_sgd_and_ema_are_silent(level: str) -> None:
    model = nn.Linear(3, 1)
    ema = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w_ = torch.randn(3, requires_grad=True)
    with gradwatch.watch(on_anomaly="raise", level=level) as w:
        for i in range(4):
            scale = float("inf") if i == 1 else 1.0  # an AMP-style overflow on step 1
            (model(torch.randn(4, 3)).sum() * scale).backward()
            if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.mul_(0.9).add_(p, alpha=0.1)
                for p in model.parameters():
                    p.clamp_(-1, 1)  # weight clipping after step()
            (torch.randn(5, 3) @ w_).pow(2).mean().backward()
            with torch.no_grad():
                w_ -= 0.1 * w_.grad
                w_.grad.zero_()
    assert w.anomalies == []


# ----------------------------------------------------------------------------- nonfinite
def test_custom_optimizer_zero_over_zero() -> None:
    class NormalizedSGD(torch.optim.Optimizer):
        def __init__(self, params) -> None:
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.sub_(p.grad / p.grad.norm())  # <zero_div>

    model = nn.Linear(2, 1)
    opt = NormalizedSGD(model.parameters())
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(3):
            opt.zero_grad()
            (model(torch.randn(4, 2)) * 0).sum().backward()  # zero gradients
            opt.step()
    line = line_of("zero_div")
    assert sorted(anomalies(w)) == [("nonfinite_introduced", "bias", line),
                                    ("nonfinite_introduced", "weight", line)]
    ev = w.anomalies[0]
    assert ev.severity == "error" and ev.op == "sub_" and ev.step == 0


def test_projection_dividing_by_zero_norm_reports_first_line_only() -> None:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, on_anomaly="log") as w:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            with torch.no_grad():
                model.weight /= model.weight.norm()  # <project>
                model.weight.mul_(2)  # already NaN: not a new introduction
    assert anomalies(w) == [("nonfinite_introduced", "weight", line_of("project"))]
    assert w.counts["nonfinite_introduced"] == 1


@pytest.mark.parametrize("level", ["full", "light"])
def test_library_optimizer_writing_nan_is_reported_at_the_step_line(level: str) -> None:
    """torch's own optimizers are checked after the step on statistics steps (batched probes)."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=float("nan"))
    with gradwatch.watch(model, opt, level=level, on_anomaly="log", stats_every=1) as w:
        model(torch.randn(4, 3)).sum().backward()
        opt.step()  # <nan_step>
    found = sorted((e.kind, e.tensor, e.op, e.location.lineno, e.version_before, e.version_after)
                   for e in w.anomalies)
    assert found == [
        ("nonfinite_introduced", "bias", "optimizer.step", line_of("nan_step"), 1, 2),
        ("nonfinite_introduced", "weight", "optimizer.step", line_of("nan_step"), 1, 2),
    ]
    assert all(e.shape == tuple(model.get_parameter(e.tensor).shape) for e in w.anomalies)


def _saved_activation_edited_under_grad():
    x = torch.randn(4, 3, requires_grad=True)
    y = x.sigmoid()  # saves its output
    y /= y.norm()  # a new node for y (Div): torch names that one
    return y.sum()


def _saved_weight_view_edited_under_no_grad():
    m = nn.Linear(3, 1)
    out = m(torch.randn(2, 3, requires_grad=True)).sum()  # saves weight.t(), a view
    with torch.no_grad():
        m.weight.add_(1)  # the view's node is regenerated (AsStrided)
    return out


def _saved_leaf_edited_under_no_grad():
    w = torch.randn(3, requires_grad=True)
    y = (w * w).sum()
    with torch.no_grad():
        w.add_(1)
    return y


def _saved_hidden_edited_then_dropped():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    h = m[1](m[0](torch.randn(2, 3)))
    out = m[2](h).sum()
    with torch.no_grad():
        h.mul_(2)
    return out


def _saved_output_through_a_slice():
    y = torch.randn(5, requires_grad=True).exp()
    y[1:3].add_(1)
    return y.sum()


def _sigmoid_then_setitem() -> torch.Tensor:
    b = torch.tensor([1.0, 2.0, 3.0], requires_grad=True).sigmoid()  # saves its own output
    b[1] = 2
    return b.sum()


def _relu_then_add() -> torch.Tensor:
    out = torch.relu(torch.randn(4, requires_grad=True) * 2)
    out += 1
    return out.sum()


def _mul_input_then_add() -> torch.Tensor:
    y = torch.randn(4, requires_grad=True) * 2
    z = y * y  # saves y, an input of a node of the same type as y's own
    y.add_(1)
    return z.sum()


def _view_of_saved() -> torch.Tensor:
    x = torch.randn(4, 4, requires_grad=True) * 1
    y = x.exp()
    y[0].mul_(2)
    return y.sum()


def _edit_under_no_grad() -> torch.Tensor:
    w = torch.randn(3, 3, requires_grad=True)
    out = (torch.randn(2, 3, requires_grad=True) @ w).sum()  # saves w (for the input's grad)
    with torch.no_grad():
        w.add_(1)
    return out


@pytest.mark.parametrize("make", [_saved_activation_edited_under_grad,
                                  _saved_weight_view_edited_under_no_grad,
                                  _saved_leaf_edited_under_no_grad,
                                  _saved_hidden_edited_then_dropped,
                                  _saved_output_through_a_slice,
                                  _sigmoid_then_setitem, _relu_then_add, _mul_input_then_add,
                                  _view_of_saved, _edit_under_no_grad])
def test_version_error_is_torchs_word_for_word(make) -> None:
    """With our saved-tensor hooks torch skips its own check and our unpack raises in its place:
    same type and message as without gradwatch (only a note is added). A node's own saved output
    is named by that node when it is the one unpacking it (``b[1] = 2`` after ``sigmoid``); a
    saved input by its grad_fn as it is after the write."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as plain:
        make().backward()
    torch.manual_seed(0)
    with gradwatch.watch(on_anomaly="log"), pytest.raises(RuntimeError) as watched:
        make().backward()
    assert type(watched.value) is type(plain.value)
    assert str(watched.value) == str(plain.value)
    assert "is at version" in str(plain.value)
    assert [n[:10] for n in watched.value.__notes__] == ["gradwatch:"]


def test_light_note_on_an_unseen_activation_edit_points_to_full() -> None:
    """light does not watch in-place ops with grad on (documented): torch's error still gets a
    note, which says so and how to find the line."""
    with gradwatch.watch(level="light", on_anomaly="log") as w, \
            pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        _relu_then_add().backward()
    (note,) = info.value.__notes__
    assert note.startswith("gradwatch: no in-place write") and 'rerun with level="full"' in note
    assert w.anomalies == []


def test_failed_graph_is_freed_at_once_no_false_report_at_the_next_step() -> None:
    """full raises torch's version error from its unpack hook: no reference cycle may keep the
    failed graph (and its saved-tensor entries) alive until the next gc."""
    import gc

    gc.disable()
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(model, opt, on_anomaly="log") as w:
            # an input that requires grad: the first layer's weight is saved too (and intact)
            loss = model(torch.randn(2, 3, requires_grad=True)).sum()
            with torch.no_grad():
                model[2].weight.mul_(0.5)  # <edit>
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            loss = model(torch.randn(2, 3)).sum()
            loss.backward()
            opt.step()  # the failed graph is gone: nothing pending saved these weights
    finally:
        gc.enable()
    assert anomalies(w) == [("saved_tensor_mutated", "2.weight", line_of("edit"))]


@pytest.mark.parametrize("level", LEVELS)
def test_user_exception_wins_over_an_anomaly_raised_at_close(level: str) -> None:
    """on_anomaly="raise": a NaN found by the final flush must not replace the user's exception."""
    model = nn.Linear(3, 1)
    with (pytest.raises(ValueError, match="user error") as info,
          gradwatch.watch(model, level=level, on_anomaly="raise")):
        model(torch.randn(2, 3)).sum().backward()
        with torch.no_grad():
            model.bias.div_(0.0)
        raise ValueError("user error")
    assert info.value.__context__ is None


@pytest.mark.parametrize("rewrap", ["tensor", "as_tensor_of_item"])
def test_a_loss_rewrapped_from_its_value_trains_nothing_and_is_named(rewrap: str) -> None:
    """``torch.tensor(loss.item(), requires_grad=True).backward()`` runs without error and
    trains nothing: reported at the line that made the value."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(2):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            if rewrap == "tensor":
                value = torch.tensor([loss], requires_grad=True).sum()  # <rewrap>
                value = torch.tensor(value.item(), requires_grad=True)
            else:
                value = torch.as_tensor(loss.item()).requires_grad_()  # <rewrap_item>
            opt.zero_grad()
            value.backward()
            opt.step()
    line = line_of("rewrap" if rewrap == "tensor" else "rewrap_item")
    found = [(a.kind, a.location.lineno) for a in w.anomalies]
    assert found[0] == ("grad_flow_cut", line + (1 if rewrap == "tensor" else 0))
    assert model.weight.grad is None


# ----------------------------------------------------------------------------- gradient windows
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("zero_config", [False, True])
def test_gradients_no_optimizer_applies_are_reported_at_the_backward(level: str,
                                                                   zero_config: bool) -> None:
    """The optimizer was built before a layer was replaced: the new layer's gradients keep
    summing (its optimizer's zero_grad does not reach them) and are never applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[2] = nn.Linear(4, 1)  # replaced after the optimizer was built
    args = () if zero_config else (model, opt)
    with gradwatch.watch(*args, level=level, on_anomaly="log") as w:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()  # <never_applied>
            opt.step()
    found = sorted({(a.kind, a.tensor, a.location.lineno) for a in w.anomalies})
    assert found == [("grad_never_applied", "2.bias", line_of("never_applied")),
                     ("grad_never_applied", "2.weight", line_of("never_applied"))]
    assert all(a.severity == "warning" for a in w.anomalies)


@pytest.mark.parametrize("level", LEVELS)
def test_head_only_optimizer_with_a_zeroed_backbone_is_silent(level: str) -> None:
    """Fine-tuning the head only, with the model's zero_grad resetting the backbone's gradients
    every step: nothing keeps summing unused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with gradwatch.watch(model, opt, level=level, on_anomaly="raise"):
        for _ in range(4):
            model.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()


@pytest.mark.parametrize("level", LEVELS)
def test_one_window_applied_by_two_optimizers(level: str) -> None:
    """A shared encoder in both optimizers' parameters: one backward, two steps on it."""
    torch.manual_seed(0)
    encoder, head = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_a = torch.optim.SGD(encoder.parameters(), lr=0.1)
    opt_b = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    with gradwatch.watch([encoder, head], [opt_a, opt_b], level=level, on_anomaly="log") as w:
        for _ in range(2):
            opt_a.zero_grad()
            opt_b.zero_grad()
            head(encoder(torch.randn(3, 4))).pow(2).mean().backward()
            opt_a.step()
            opt_b.step()  # <twice>
    found = sorted({(a.kind, a.tensor, a.location.lineno) for a in w.anomalies})
    assert found == [("grad_applied_twice", "encoder.bias", line_of("twice")),
                     ("grad_applied_twice", "encoder.weight", line_of("twice"))]


@pytest.mark.parametrize("level", LEVELS)
def test_two_optimizers_on_a_shared_module_in_separate_windows_are_silent(level: str) -> None:
    torch.manual_seed(0)
    encoder, head = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_a = torch.optim.SGD(encoder.parameters(), lr=0.1)
    opt_b = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    with gradwatch.watch([encoder, head], [opt_a, opt_b], level=level, on_anomaly="raise"):
        for _ in range(2):
            for opt in (opt_a, opt_b):
                opt.zero_grad()
                head(encoder(torch.randn(3, 4))).pow(2).mean().backward()
                opt.step()


@pytest.mark.parametrize("zero", [True, False])
def test_hand_written_sgd_through_data_with_a_forgotten_zero_grad_is_stale(zero: bool) -> None:
    """pytorch/examples regression: ``p.data.add_(p.grad, alpha=-lr)`` bumps no version of p;
    the edit still counts as an update of p (full sees it), so summing across it is stale."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if zero:
                model.zero_grad()
            loss.backward()  # <data_sgd_backward>
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)  # <data_sgd_edit>
    if zero:
        assert w.anomalies == []
    else:
        found = sorted({(a.kind, a.tensor, a.location.lineno) for a in w.anomalies})
        assert found == [("stale_grad_accumulation", "bias", line_of("data_sgd_backward")),
                         ("stale_grad_accumulation", "weight", line_of("data_sgd_backward"))]
        assert f":{line_of('data_sgd_edit')}" in w.anomalies[0].message
