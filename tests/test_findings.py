"""``records.findings`` alone (issue 16): the grouping rule (one finding per kind and culprit
line, with its tensors), bounded names, merging what is read back, the warning text, and the
compression of tensor names. The watch, report, TensorBoard and CLI: test_one_bug_one_finding.py."""

from __future__ import annotations

import pytest

from gradwatch.events import Event, EventKind, Location
from gradwatch.records.findings import (
    MAX_TENSOR_NAMES,
    Findings,
    compress_names,
    describe_finding,
    tensors_label,
)


# ------------------------------------------------------------------------------ compression
def _encoder_names(prefix: str = "", layers: int = 6) -> list[str]:
    per_layer = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
                 "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
    return [f"{prefix}layers.{i}.{p}" for i in range(layers) for p in per_layer]


@pytest.mark.parametrize(("names", "expected"), [
    (["fc.weight"], "fc.weight"),
    (["D.0.weight", "D.2.weight"], "D.0.weight, D.2.weight"),  # two: spelled out
    (_encoder_names("encoder."), "encoder.layers.0..5.*"),  # common prefix + index range
    (_encoder_names("encoder.")[:-1], "encoder.layers.0..5.*"),  # one missing: the count tells
    (_encoder_names()[:12], "layers.0.*"),
    ([n for n in _encoder_names() if n.endswith("linear1.weight")],
     "layers.0..5.linear1.weight"),  # the same rest in every layer: spelled out
    (["embed.weight", *_encoder_names("encoder."), "head.weight", "head.bias"],
     "embed.weight, encoder.layers.0..5.*, head.weight, head.bias"),
    (["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"],
     "{0,2,4}.weight, {0,2,4}.bias"),  # indices that are not contiguous
    ([f"l.{i}.w" for i in (0, 1, 2, 3, 5, 7, 8, 9)], "l.{0..3,5,7..9}.w"),
    ([f"b.{i}.h.{j}.w" for i in range(3) for j in range(4)], "b.0..2.h.0..3.w"),  # two indices
    ([f"m{i}.weight" for i in range(10)],
     "m0.weight, m1.weight, m2.weight, … (+7 more)"),  # nothing to compress: the first, + N
    (["tensor float32[3]", "tensor float32[4]", "x"], "tensor float32[3], tensor float32[4], x"),
    (["a.b", "a.b", "a.c"], "a.b, a.c"),  # duplicates count once
])
def test_compress_names(names: list[str], expected: str) -> None:
    assert compress_names(names) == expected


def test_tensors_label_counts_and_names_past_the_kept_ones() -> None:
    assert tensors_label(["fc.weight"]) == "fc.weight"
    assert tensors_label(_encoder_names("encoder.")) == "encoder.layers.0..5.* (72 tensors)"
    # a finding keeps the first names only: the rest are counted
    assert tensors_label(["a.weight", "b.weight"], 5) == "a.weight, b.weight, … (+3 more) (5 tensors)"
    assert compress_names([f"m{i}.weight" for i in range(10)], 2000).endswith("… (+1997 more)")
    assert compress_names([]) == ""


# ------------------------------------------------------------------------------ the grouping
def _ev(tensor: str, step: int = 0, lineno: int | None = 10, kind: str = "stale_grad_accumulation",
        rank: int = 0) -> Event:
    k = EventKind(kind)
    loc = Location("train.py", lineno, "main", "loss.backward()") if lineno is not None else None
    return Event(kind=k, severity=k.severity, step=step, op="backward", tensor=tensor,
                 location=loc, message=f"`{tensor}.grad` is stale", hint="zero it", rank=rank)


def test_findings_group_by_kind_and_line_and_keep_first_event_count_steps_tensors() -> None:
    f = Findings()
    assert f.add(_ev("a.weight", step=1)) == (next(iter(f)), True)
    assert f.add(_ev("a.bias", step=1))[1] is False
    assert f.add(_ev("a.weight", step=2))[1] is False  # the same tensor again: named once
    f.add(_ev("a.weight", step=2, lineno=11))  # another line: another finding
    f.add(_ev("a.weight", step=2, kind="accumulated_grad_discarded"))  # another kind: another
    rows = f.rows()
    assert [(r["event"].tensor, r["count"], r["first_step"], r["last_step"], r["tensors"],
             r["tensor_count"]) for r in rows] == [
        ("a.weight", 3, 1, 2, ["a.weight", "a.bias"], 2),
        ("a.weight", 1, 2, 2, ["a.weight"], 1),
        ("a.weight", 1, 2, 2, ["a.weight"], 1),
    ]


def test_events_without_a_location_key_by_tensor() -> None:
    f = Findings()
    f.add(_ev("x", lineno=None))
    f.add(_ev("y", lineno=None))
    f.add(_ev("x", lineno=None, step=3))
    assert [(r["tensors"], r["count"]) for r in f.rows()] == [(["x"], 2), (["y"], 1)]


def test_tensor_names_are_bounded_and_counted_past_the_bound() -> None:
    f = Findings()
    n = MAX_TENSOR_NAMES + 500
    for i in range(n):
        f.add(_ev(f"p{i}.weight"))
    f.add(_ev("p3.weight"))  # seen before
    f.add(_ev(f"p{n - 1}.weight"))  # seen before, past the kept names
    (finding,) = f
    assert len(finding.names) == MAX_TENSOR_NAMES and finding.names[:2] == ["p0.weight", "p1.weight"]
    assert finding.tensor_count == n and finding.count == n + 2
    assert finding.label().endswith(f"(+{n - 3} more) ({n} tensors)")


def test_merge_adds_counts_widens_steps_and_keeps_the_earliest_event() -> None:
    f = Findings()
    later = _ev("a.weight", step=5)
    f.merge_event(later, {"count": 4, "first_step": 5, "last_step": 7,
                          "tensors": ["a.weight", "a.bias"], "tensor_count": 2})
    earlier = _ev("b.weight", step=1)
    f.merge_event(earlier, {"count": 1, "first_step": 1, "last_step": 1})  # no "tensors": its own
    (finding,) = f
    assert (finding.event, finding.count, finding.first_step, finding.last_step) == (
        earlier, 5, 1, 7)
    assert finding.names == ["a.weight", "a.bias", "b.weight"]
    # a summary that kept only some names: the rest counted (assumed to overlap ours)
    f.merge_event(later, {"count": 1, "tensors": ["a.weight"], "tensor_count": 10})
    assert next(iter(f)).tensor_count == 12


def test_describe_finding_names_the_tensors_compressed() -> None:
    f = Findings()
    for name in _encoder_names("encoder."):
        f.add(_ev(name))
    text = describe_finding(next(iter(f)))
    assert text.startswith("[gradwatch] stale_grad_accumulation on encoder.layers.0..5.* "
                           "(72 tensors) at train.py:10  `loss.backward()`\n")
    assert "\n  first: `encoder.layers.0.self_attn.in_proj_weight.grad` is stale" in text
    assert text.endswith("\n  hint: zero it")
    single = Findings()
    single.add(_ev("fc.weight"))
    assert describe_finding(next(iter(single))) == _ev("fc.weight").describe()  # as before


