"""Issue 15, 1(b): the Python errors that follow a cut, as they leave the watch, carry a note
naming the cut (or the rebinding) at its line. Torch's own errors and unrelated Python errors
pass unchanged."""

from __future__ import annotations

import pytest
import torch

import gradwatch
from helpers import line_of


def _notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if n.startswith("gradwatch:")]


def test_backward_on_a_python_number_names_the_item_line() -> None:
    w0 = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log") as w:
        loss = (w0 * x).sum().item()  # <item>
        loss.backward()
    [note] = _notes(info.value)
    assert f"test_errors_after_a_cut.py:{line_of('item')}" in note
    assert "(item)" in note and "Python value" in note
    [finding] = w.distinct_anomalies()
    ev = finding["event"]
    assert (ev.kind.value, ev.severity, ev.op) == ("grad_flow_cut", "error", "item")
    assert ev.location.lineno == line_of("item")


def test_grad_none_after_rebinding_under_no_grad_names_the_cut() -> None:
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log"):
        for _ in range(2):
            (w * x + b).sum().backward()
            with torch.no_grad():
                w = w - 0.1 * w.grad  # <rebind>
                b -= 0.1 * b.grad
            b.grad.zero_()
            w.grad.zero_()
    [note] = _notes(info.value)
    assert "`w.grad` is None because `w` is no longer the tensor that was trained" in note
    assert f"test_errors_after_a_cut.py:{line_of('rebind')}" in note


def test_the_rebinding_is_recorded_also_while_the_original_lives_on() -> None:
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    keep = [w, b]  # (a parameter list keeps the original alive)
    x = torch.randn(3)
    with pytest.raises(AttributeError), gradwatch.watch(on_anomaly="log") as watch:
        for _ in range(2):
            (w * x + b).sum().backward()
            with torch.no_grad():
                w = w - 0.1 * w.grad  # <rebind kept>
                b -= 0.1 * b.grad
            b.grad.zero_()
            w.grad.zero_()
    [f] = watch.distinct_anomalies()
    assert (f["event"].kind.value, f["event"].location.lineno) == (
        "grad_flow_cut", line_of("rebind kept"))
    assert keep[0] is not w


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_grad_none_of_a_non_leaf_rebound_with_grad_on() -> None:
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    with pytest.raises(TypeError) as info, gradwatch.watch(on_anomaly="log"):
        for _ in range(2):
            (w * x).sum().backward()
            w = w - 0.1 * w.grad
    [note] = _notes(info.value)
    assert "`w.grad` is None because `w` is not a leaf" in note
    assert "SubBackward0" in note


def test_look_alikes_get_no_note() -> None:
    """A None .grad of a leaf never reached, and an unrelated AttributeError: no note."""
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log"):
        loss = (w * x).sum()
        print(loss.item())  # logging: a cut of the user's, harmless
        loss.backward()
        unused.grad.zero_()
    assert _notes(info.value) == []
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log"):
        value = 3.0
        value.backward()  # no tensor was ever cut here
    assert _notes(info.value) == []


def test_unrelated_errors_near_a_logged_item_get_no_note() -> None:
    """A loss that stayed an int (no term added) after an .item() logged elsewhere, and a None
    that is not a .grad on a line that reads one: not the cut's errors."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log") as w:
        out = m(x)
        ce = torch.nn.functional.cross_entropy(out, y)
        print("ce", ce.item())
        loss = 0
        for i in range(4):
            if y[i] == 5:
                loss = loss + out[i].pow(2).sum()
        loss.backward()
    assert _notes(info.value) == [] and w.distinct_anomalies() == []
    feat = (m.weight * 2).sum()
    sched = None
    with pytest.raises(AttributeError) as info, gradwatch.watch(on_anomaly="log"):
        if feat.grad is None and sched.verbose:
            pass
    assert _notes(info.value) == []


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)  # <layers>


def test_a_loss_computed_under_no_grad_names_the_blocks_statement_not_a_layer() -> None:
    model = _Net()
    with pytest.raises(RuntimeError, match="does not require grad") as info, \
            gradwatch.watch(on_anomaly="log"):
        data, target = torch.randn(8, 4), torch.randint(0, 3, (8,))
        with torch.no_grad():
            output = model(data)  # <forward under no_grad>
        torch.nn.functional.nll_loss(output, target).backward()
    [note] = _notes(info.value)
    assert f"test_errors_after_a_cut.py:{line_of('forward under no_grad')} " in note


@pytest.mark.parametrize("level", ["full", "light"])
def test_backward_through_a_freed_graph_names_the_backward_that_freed_it(level: str) -> None:
    """Truncated BPTT without ``hidden.detach()``: torch's "backward through the graph a second
    time" gets a note naming the pass that freed the graph and the usual fixes."""
    rnn, head = torch.nn.RNN(3, 4, batch_first=True), torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=0.1)
    hidden = torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match="second time") as info, \
            gradwatch.watch(on_anomaly="log", level=level):
        for _ in range(2):
            out, hidden = rnn(torch.randn(2, 5, 3), hidden)
            opt.zero_grad()
            head(out).pow(2).mean().backward()  # <tbptt backward>
            opt.step()
    [note] = _notes(info.value)
    assert f"freed by the backward at {__file__}:{line_of('tbptt backward')} " in note
    assert "hidden = hidden.detach()" in note
