"""The corpus: reproductions of real public bug reports, and correct look-alikes, each run under
three entry points:

- ``zero_config``: ``with gradwatch.watch(on_anomaly="log"):`` (no arguments);
- ``explicit``: ``gradwatch.watch(model, optimizer, on_anomaly="log")`` with the case's own
  models and optimizers (the case calls ``watch(...)`` with them), events read back from the
  ``gradwatch.jsonl`` of its ``log_dir``;
- ``cli``: ``gradwatch run --log-dir DIR case.py`` (the case file run as ``__main__``), events
  read back from ``DIR/gradwatch.jsonl`` (all cases in one driver process, see ``_cli_driver``).

A bug must give an anomaly of its kind and severity at the culprit line of the case file, naming
the expected tensor (plus gradwatch's note on torch's own error, where torch raises). A look-alike
must give no event of severity warning or error. ``test_case_at_light`` runs each case once more
under ``watch(model, optimizer, level="light")``. Known misses are strict xfails
(``KNOWN_MISS`` in each case): one that starts passing fails the suite until its mark is removed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gradwatch

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ENTRIES, Case, all_cases, check, from_events, from_jsonl

CASES = all_cases()
HERE = Path(__file__).resolve().parent


def _params():
    for case in CASES:
        for entry in ENTRIES:
            reason = case.miss_reason(entry)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(case, entry, id=f"{case.id}-{entry}", marks=marks)


@pytest.fixture(scope="module")
def cli_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every selected case under ``gradwatch run``, once per module (one driver process)."""
    selected = {item.callspec.params["case"].path for item in request.session.items
                if getattr(item, "callspec", None) is not None
                and item.callspec.params.get("entry") == "cli"}
    out = tmp_path_factory.mktemp("corpus_cli")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(HERE / "_cli_driver.py"), str(out),
                           *[c.path for c in CASES if c.path in selected]], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _run_in_process(case: Case, entry: str, tmp_path: Path) -> tuple[list[dict[str, Any]], Any]:
    if entry == "zero_config":
        made: list[gradwatch.Watch] = []

        def zero_config(*models_and_optimizers: Any) -> gradwatch.Watch:
            w = gradwatch.watch(on_anomaly="log")
            made.append(w)
            return w

        error = case.module.run(zero_config)
        assert len(made) == 1
        return from_events(made[0].anomalies), error
    # a partial, not a wrapper function: watch([G, D]) names the models by the case's variables
    explicit = functools.partial(gradwatch.watch, on_anomaly="log", log_dir=str(tmp_path))
    error = case.module.run(explicit)
    return from_jsonl(str(tmp_path / "gradwatch.jsonl")), error


@pytest.mark.parametrize(("case", "entry"), _params())
def test_case(case: Case, entry: str, request: pytest.FixtureRequest, tmp_path: Path,
              clean, one_thread) -> None:
    if entry == "cli":
        out = request.getfixturevalue("cli_runs")
        status = int((out / f"{case.id}.status").read_text())
        stderr = (out / f"{case.id}.err").read_text()
        anomalies = from_jsonl(str(out / case.id / "gradwatch.jsonl"))
        raised = status != 0
        if raised and not (case.is_bug and case.expect["raises"]):
            pytest.fail(f"the script failed (status {status}):\n{stderr[-3000:]}")
        error = RuntimeError("see stderr") if raised else None
        check(case, entry, anomalies, error, stderr)
    else:
        anomalies, error = _run_in_process(case, entry, tmp_path)
        check(case, entry, anomalies, error)
    assert clean() == {}, "the watch left global state behind"


# What ``level="light"`` misses by design (README, "light"): it sees only code run with grad off.
_CUT = "a cut made with grad on (light pushes its mode only where grad mode is off)"
_GRAD_ON = "an in-place edit with grad on (light sees torch's error only; the log has no_grad writes)"
LIGHT_MISSES = {
    "gf_argmax_in_loss": _CUT,
    "gf_detach_numpy_in_rl_loss": _CUT,
    "gf_round_network_output_in_loss": _CUT,
    "gw_pcgrad_task_gradients_not_zeroed": "a .grad read with grad on is not seen at light",
    "sm_index_assign_in_forward": _GRAD_ON,
    "sm_preact_resnet_relu_then_add": _GRAD_ON,
    "sm_relu_inplace_then_residual_add": _GRAD_ON,
    "sm_zennit_mod_params_restored_in_place": "a .data write no version shows (light has no "
                                              "saved-tensor registry)",
}


def _light_params():
    for case in CASES:
        reason = LIGHT_MISSES.get(case.id) or case.miss_reason("explicit")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", _light_params())
def test_case_at_light(case: Case, tmp_path: Path, clean, one_thread) -> None:
    """Every case under ``watch(model, optimizer, level="light")``: no look-alike gives a false
    alarm, and every bug outside light's documented misses is found at its culprit line."""
    light = functools.partial(gradwatch.watch, on_anomaly="log", level="light",
                              log_dir=str(tmp_path))
    error = case.module.run(light)
    check(case, "explicit", from_jsonl(str(tmp_path / "gradwatch.jsonl")), error)
    assert clean() == {}, "the watch left global state behind"


def test_corpus_size() -> None:
    """Issue 15: at least 40 real bug reports covering every kind, and 20 look-alikes."""
    bugs = [c for c in CASES if c.is_bug]
    looks = [c for c in CASES if not c.is_bug]
    assert len(bugs) >= 40, len(bugs)
    assert len(looks) >= 20, len(looks)
    kinds = {c.expect["kind"] for c in bugs}
    assert {"saved_tensor_mutated", "grad_flow_cut", "stale_grad_accumulation",
            "accumulated_grad_discarded", "nonfinite_introduced"} <= kinds, kinds
