"""Loading and checking the corpus cases (see ``test_corpus.py``).

A case is a module in ``cases/``; its metadata:

- ``SOURCE``: the public report(s) it reproduces (a URL or a list of URLs).
- ``FAMILY``: an anomaly kind, a gradient-window violation, or ``"lookalike"``.
- ``EXPECT``: for a bug, ``dict(kind=..., severity=..., tensor=..., raises=bool)``; ``tensor`` is
  a name, or a dict from entry point (``"zero_config"``, ``"explicit"``, ``"cli"``, ``"*"``) to
  the name expected there (names come from the model passed, or from module discovery).
  ``None`` for a look-alike (expected: no event of severity warning or error).
- ``KNOWN_MISS``: ``{entry: reason}`` (``"*"`` for every entry): strict xfails.
- ``run(watch=...)``: the reporter's loop, minimised, calling ``watch(models, optimizers)``
  around it. A bug whose torch error is expected catches it and returns the exception.

The culprit line is the one line of the case file that ends with ``# <- culprit``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CASES_DIR = Path(__file__).resolve().parent / "cases"
ENTRIES = ("zero_config", "explicit", "cli")
MARK = "# <- culprit"

# The gradient-window violations DESIGN.md foresees, as EventKind names them.
GRAD_NEVER_APPLIED = "grad_never_applied"  # accumulated gradients no optimizer step ever used
GRAD_READ_MID_WINDOW = "grad_read_mid_window"  # .grad read between two losses' backward passes
GRAD_APPLIED_TWICE = "grad_applied_twice"  # one accumulation window applied by two optimizers
SEVERITY = {
    "saved_tensor_mutated": "error",
    "grad_flow_cut": "error",
    "nonfinite_introduced": "error",
    "stale_grad_accumulation": "warning",
    "accumulated_grad_discarded": "warning",
    GRAD_NEVER_APPLIED: "warning",
    GRAD_READ_MID_WINDOW: "warning",
    GRAD_APPLIED_TWICE: "warning",
}


@dataclass
class Case:
    id: str
    path: str
    module: ModuleType
    family: str
    sources: list[str]
    expect: dict[str, Any] | None
    known_miss: dict[str, str] = field(default_factory=dict)
    culprit: int | None = None

    @property
    def is_bug(self) -> bool:
        return self.expect is not None

    def tensor_for(self, entry: str) -> str | None:
        t = self.expect["tensor"] if self.expect else None
        if isinstance(t, dict):
            return t.get(entry, t.get("*"))
        return t

    def miss_reason(self, entry: str) -> str | None:
        return self.known_miss.get(entry, self.known_miss.get("*"))


def culprit_line(path: str) -> int | None:
    hits = [i for i, line in enumerate(Path(path).read_text().splitlines(), 1)
            if line.rstrip().endswith(MARK)]
    assert len(hits) <= 1, f"{path}: several culprit marks at lines {hits}"
    return hits[0] if hits else None


def load_case(path: Path) -> Case:
    name = f"gradwatch_corpus_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sources = module.SOURCE if isinstance(module.SOURCE, (list, tuple)) else [module.SOURCE]
    case = Case(id=path.stem, path=str(path), module=module, family=module.FAMILY,
                sources=list(sources), expect=getattr(module, "EXPECT", None),
                known_miss=dict(getattr(module, "KNOWN_MISS", {}) or {}),
                culprit=culprit_line(str(path)))
    assert module.__doc__ and any(s in module.__doc__ for s in case.sources), (
        f"{path.name}: the docstring must summarise the report and cite its URL")
    assert all(s.startswith("https://") for s in case.sources), case.sources
    for entry in case.known_miss:
        assert entry in ENTRIES or entry == "*", (path.name, entry)
    if case.is_bug:
        assert case.culprit is not None, f"{path.name}: a bug case needs a `{MARK}` line"
        kind = case.expect["kind"]
        assert kind in SEVERITY, kind
        assert case.expect.get("severity", SEVERITY[kind]) == SEVERITY[kind], path.name
        case.expect.setdefault("severity", SEVERITY[kind])
        case.expect.setdefault("raises", False)
    else:
        assert case.family == "lookalike", path.name
        assert case.culprit is None, f"{path.name}: a look-alike has no culprit line"
    return case


def all_cases() -> list[Case]:
    return [load_case(p) for p in sorted(CASES_DIR.glob("*.py")) if not p.name.startswith("_")]


# ------------------------------------------------------------------------------------- checking
def same_file(a: str | None, b: str) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def summarize(anomalies: list[dict[str, Any]]) -> str:
    if not anomalies:
        return "no anomaly at all"
    rows = {f"{a['kind']}/{a['severity']} {a['tensor']!r} at "
            f"{os.path.basename(a['filename'] or '?')}:{a['lineno']}" for a in anomalies}
    return "; ".join(sorted(rows))


def check(case: Case, entry: str, anomalies: list[dict[str, Any]],
          error: BaseException | None, stderr: str = "") -> None:
    """Assert the outcome of one case at one entry point. ``anomalies``: plain dicts with kind,
    severity, tensor, filename, lineno (events of severity warning/error only)."""
    if not case.is_bug:
        assert error is None, f"a look-alike raised {error!r}"
        assert not anomalies, f"FALSE ALARM on a look-alike: {summarize(anomalies)}"
        return
    exp = case.expect
    if exp["raises"]:
        assert error is not None, "torch's error was expected, run() returned nothing"
        where = f"{case.path}:{case.culprit}"
        # under the CLI: the notes Python printed under the traceback
        text = (cli_notes(stderr) if entry == "cli"
                else "\n".join(getattr(error, "__notes__", []) or []))
        assert "gradwatch:" in text, f"no gradwatch note on {type(error).__name__}: {error}"
        assert where in text, f"the note does not name {where}: {text!r}"
    else:
        assert error is None, f"unexpected {error!r}"
    tensor = case.tensor_for(entry)
    match = [a for a in anomalies
             if a["kind"] == exp["kind"] and a["severity"] == exp["severity"]
             and same_file(a["filename"], case.path) and a["lineno"] == case.culprit
             and (tensor is None or a["tensor"] == tensor)]
    assert match, (f"expected {exp['kind']}/{exp['severity']} {tensor!r} at "
                   f"{os.path.basename(case.path)}:{case.culprit}; got: {summarize(anomalies)}")


def cli_notes(stderr: str) -> str:
    """The ``gradwatch:`` note(s) printed under a traceback (not the run's report)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.startswith("gradwatch:") and not line.startswith("gradwatch: report")]
    if not starts:
        return ""
    out = []
    for line in lines[starts[0]:]:
        if not line.strip():
            break
        out.append(line)
    return "\n".join(out)


def from_events(events: list[Any]) -> list[dict[str, Any]]:
    """Plain dicts of the warning/error events of a watch."""
    out = []
    for e in events:
        if e.severity not in ("warning", "error"):
            continue
        loc = e.location
        out.append({"kind": str(getattr(e.kind, "value", e.kind)), "severity": e.severity,
                    "tensor": e.tensor, "filename": loc.filename if loc else None,
                    "lineno": loc.lineno if loc else None})
    return out


def from_jsonl(path: str) -> list[dict[str, Any]]:
    import json

    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            if d.get("severity") not in ("warning", "error"):
                continue
            loc = d.get("location") or {}
            out.append({"kind": d["kind"], "severity": d["severity"], "tensor": d.get("tensor"),
                        "filename": loc.get("filename"), "lineno": loc.get("lineno")})
    return out
