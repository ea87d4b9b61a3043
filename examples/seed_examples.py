"""The essay's three examples (shared/seed), diagnosed by gradwatch.

Run: python examples/seed_examples.py
"""

import torch

import gradwatch


def example_1() -> None:
    """`a = a - b` under no_grad rebinds `a` to a tensor without grad. The essay says a.grad stays
    None; in fact backward raises, because `c = a * a` no longer has a graph at all."""
    with gradwatch.watch(on_anomaly="log") as w:
        a = torch.tensor([2.0], requires_grad=True)
        b = torch.tensor([1.0], requires_grad=True)
        with torch.no_grad():
            a = a - b  # out of place: a new tensor, cut from the graph
        c = a * a
        try:
            c.backward()
        except RuntimeError as err:
            print("torch raised:", err)
            for note in getattr(err, "__notes__", []):
                print("  note:", note)
    print(w.report(), "\n")


def example_2() -> None:
    """`a -= b` under no_grad: `a` stays the leaf; its version goes 0 -> 1; a.grad == 2."""
    with gradwatch.watch(on_anomaly="log") as w:
        a = torch.tensor([2.0], requires_grad=True)
        b = torch.tensor([1.0], requires_grad=True)
        with torch.no_grad():
            a -= b  # in place: recorded as inplace_no_grad, not an error by itself
        c = a * a
        c.backward()
    (event,) = [e for e in w.events if e.kind == "inplace_no_grad"]
    print(f"a.grad = {a.grad.tolist()}")
    print(f"{event.kind}: op {event.op}, version {event.version_before} -> {event.version_after}, "
          f"{event.grad_mode}, at {event.location} `{event.location.code}`")
    print(w.report(), "\n")


def example_3() -> None:
    """backward, `a -= b`, backward again: .grad sums 4 + 2 = 6, gradients taken at two different
    values of `a` -> stale_grad_accumulation at the second backward."""
    with gradwatch.watch(on_anomaly="log") as w:
        a = torch.tensor([2.0], requires_grad=True)
        b = torch.tensor([1.0], requires_grad=True)
        output = a * a
        output.backward()
        with torch.no_grad():
            a -= b
        output = a * a
        output.backward()  # accumulates onto the gradient taken at the old value of a
    print(f"a.grad = {a.grad.tolist()}")
    print(w.report(), "\n")


if __name__ == "__main__":
    print("== Example 1: a = a - b under no_grad ==")
    example_1()
    print("== Example 2: a -= b under no_grad ==")
    example_2()
    print("== Example 3: accumulation across an in-place edit ==")
    example_3()
