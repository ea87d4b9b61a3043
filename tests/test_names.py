"""Names (issue 16, item 6): plain tensors are named by the variable bound to them (module level
and inside a function), and in a two-model script both models' tensors are prefixed alike."""

from __future__ import annotations

import gc
import weakref

import torch

import gradwatch


def stale_names(w: gradwatch.Watch) -> list[list[str]]:
    return [d["tensors"] for d in w.distinct_anomalies()
            if d["event"].kind == "stale_grad_accumulation"]


def test_plain_tensors_in_a_function_are_named_by_their_variables() -> None:
    a = torch.zeros((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    d = torch.zeros((), requires_grad=True)
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(3):
            (a * 2 + b * 3 + c * 4 + d * 5).backward()  # never zeroed
            with torch.no_grad():
                for t in (a, b, c, d):
                    t -= 0.1 * t.grad
    (names,) = stale_names(w)
    assert sorted(names) == ["a", "b", "c", "d"]  # before: one name, "tensor float32[]"
    (finding,) = [d for d in w.distinct_anomalies()
                  if d["event"].kind == "stale_grad_accumulation"]
    assert finding["tensor_count"] == 4
    edits = {e.tensor for e in w.events if e.kind == "inplace_no_grad"}
    assert edits == {"a", "b", "c", "d"}


MODULE_LEVEL = """\
import torch, gradwatch
weight = torch.ones(3, requires_grad=True)
bias = torch.zeros(3, requires_grad=True)
_hidden = torch.zeros(3, requires_grad=True)
with gradwatch.watch(on_anomaly="log") as w:
    for _ in range(2):
        (weight * 2 + bias + _hidden).sum().backward()
        with torch.no_grad():
            weight.sub_(0.1 * weight.grad)
            bias.sub_(0.1 * bias.grad)
            _hidden.sub_(0.1 * _hidden.grad)
"""


def test_module_level_tensors_are_named_by_their_globals_not_private_ones() -> None:
    scope: dict[str, object] = {"__name__": "__main__"}
    exec(compile(MODULE_LEVEL, "<names-test>", "exec"), scope)
    w = scope["w"]
    assert isinstance(w, gradwatch.Watch)
    names = {e.tensor for e in w.events if e.kind == "grad_accumulated"}
    assert names == {"weight", "bias", "tensor float32[3]"}


def test_reading_a_functions_locals_keeps_nothing_alive() -> None:
    """The name lookup reads the frame's locals once; the tensor it found dies with its
    variable (no snapshot of the locals outlives the lookup)."""
    x = torch.zeros(2, requires_grad=True)
    with gradwatch.watch(on_anomaly="log") as w:
        (x * 2).sum().backward()
        ref = weakref.ref(x)
        seen = {e.tensor for e in w.events if e.kind == "grad_accumulated"}
        del x
        gc.collect()
        assert ref() is None
    assert seen == {"x"}


def gan_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return (torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)),
            torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 1)))


PREFIXED = ["G.0.weight", "G.0.bias", "G.1.weight", "G.1.bias", "D.0.weight", "D.0.bias",
            "D.1.weight", "D.1.bias", "D.2.weight", "D.2.bias"]


def test_two_discovered_models_are_both_prefixed() -> None:
    G, D = gan_models()
    opt_g = torch.optim.SGD(G.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    with gradwatch.watch(on_anomaly="log") as w:
        for _ in range(3):
            D(G(torch.randn(2, 3))).sum().backward()  # zero_grad is forgotten
            opt_g.step()
            opt_d.step()
    # before: 0.weight, ... (G unprefixed) and Sequential.0.weight, ... (D, a local)
    assert stale_names(w) == [PREFIXED]


def test_a_given_model_and_a_discovered_one_are_both_prefixed() -> None:
    G, D = gan_models()
    opt = torch.optim.SGD([*G.parameters(), *D.parameters()], lr=0.1)
    with gradwatch.watch(G, opt, on_anomaly="log") as w:
        for _ in range(3):
            D(G(torch.randn(2, 3))).sum().backward()  # zero_grad is forgotten
            opt.step()
    assert stale_names(w) == [PREFIXED]


def test_a_model_that_first_runs_later_leaves_the_published_names_alone() -> None:
    """An EMA/eval model that first runs after names were written keeps the first model's
    names stable (they are in events already): only the newcomer is prefixed."""
    G, D = gan_models()
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    with gradwatch.watch(on_anomaly="log") as w:
        for step in range(3):
            G(torch.randn(2, 3)).sum().backward()  # zero_grad is forgotten
            opt.step()
            if step == 1:
                D.eval()
                D(torch.randn(2, 3))
    assert stale_names(w) == [["0.weight", "0.bias", "1.weight", "1.bias"]]
