"""``gradwatch report`` and ``gradwatch run`` (issue 5)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import tb_helpers
from gradwatch.cli import main


@pytest.fixture(scope="module")
def buggy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir = str(tmp_path_factory.mktemp("buggy"))
    run = tb_helpers.buggy_run(log_dir)
    run["log_dir"] = log_dir
    return run


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["report", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _expected(w: Any) -> list[tuple[Any, ...]]:
    """The watch's findings: kind, tensors, culprit line, count, first and last step."""
    return sorted(
        (d["event"].kind.value, tuple(d["tensors"]), d["event"].location.lineno, d["count"],
         d["first_step"], d["last_step"])
        for d in w.distinct_anomalies()
    )


# ------------------------------------------------------------------------------------ report
def test_report_table_worst_first_with_lines_counts_and_exit_1(buggy, capsys) -> None:
    status, out, err = _report(capsys, buggy["log_dir"])
    assert status == 1  # a saved_tensor_mutated (severity error) is present
    assert err == ""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#  SEVERITY"))
    assert lines[header].split() == ["#", "SEVERITY", "KIND", "TENSOR", "FILE:LINE", "COUNT",
                                     "FIRST", "LAST"]
    first = lines[header + 1].split()
    assert first == ["1", "error", "saved_tensor_mutated", "2.weight",
                     f"{_short(Path(tb_helpers.__file__))}:{buggy['mutate']}", "1", "3", "3"]
    rows = [line for line in lines[header + 1:] if line.strip()]
    rows = rows[: len(buggy["watch"].distinct_anomalies())]
    assert [r.split()[1] for r in rows] == ["error", "warning"]  # worst first; one per finding
    # the forgotten zero_grad: one finding at the backward line, its six tensors compressed
    (stale,) = [r for r in rows if r.split()[2] == "stale_grad_accumulation"]
    assert (f"  {{0,2,4}}.weight, {{0,2,4}}.bias (6 tensors)  "
            f"{_short(Path(tb_helpers.__file__))}:{buggy['stale']}  ") in stale
    (finding,) = [d for d in buggy["watch"].distinct_anomalies()
                  if d["event"].kind == "stale_grad_accumulation"]
    assert set(finding["tensors"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                       "4.bias"}
    # the source line and the hint of the culprit are printed under the table
    assert "model[2].weight.mul_(0.9)  # <- mutate" in out
    assert "hint: compute the loss again" in out
    # events per kind, exact
    tail = out[out.index("events per kind:"):].splitlines()[1:]
    counts = {line.split()[0]: int(line.split()[1]) for line in tail if line.strip()}
    assert counts == buggy["watch"].counts


def test_report_json_matches_the_watch(buggy, capsys) -> None:
    status, out, _ = _report(capsys, buggy["log_dir"], "--json")
    assert status == 1
    data = json.loads(out)
    assert data["status"] == 1 and data["has_error"] is True
    assert data["counts"] == buggy["watch"].counts
    got = sorted((a["kind"], tuple(a["tensors"]), a["event"]["location"]["lineno"], a["count"],
                  a["first_step"], a["last_step"]) for a in data["anomalies"])
    assert got == _expected(buggy["watch"])
    top = data["anomalies"][0]
    assert top["kind"] == "saved_tensor_mutated" and top["severity"] == "error"
    assert top["where"] == f"{tb_helpers.__file__}:{buggy['mutate']}"
    assert top["run"] == "." and top["ranks"] == [0]
    assert data["warnings"] == []


def test_report_warnings_only_exits_0(tmp_path, capsys) -> None:
    import torch

    import gradwatch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, log_dir=str(tmp_path), on_anomaly="log"):
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()  # no zero_grad: a warning, not an error
            opt.step()
    status, out, _ = _report(capsys, str(tmp_path))
    assert status == 0
    assert "stale_grad_accumulation" in out and "0 errors" in out


def test_report_clean_run_exits_0(tmp_path, capsys) -> None:
    import torch

    import gradwatch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, log_dir=str(tmp_path), on_anomaly="log"):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    status, out, _ = _report(capsys, str(tmp_path))
    assert status == 0
    assert "no anomalies" in out
    status, out, _ = _report(capsys, str(tmp_path), "--json")
    assert status == 0 and json.loads(out)["anomalies"] == []


@pytest.mark.parametrize("what", ["missing", "file", "empty"])
def test_report_unusable_dir_exits_2_with_a_message(tmp_path, capsys, what) -> None:
    target = tmp_path / "x"
    if what == "file":
        target.write_text("hi")
    elif what == "empty":
        target.mkdir()
    status, out, err = _report(capsys, str(target))
    assert status == 2
    assert out == ""
    assert err.startswith("gradwatch report: error: ")
    assert {"missing": "does not exist", "file": "is not a directory",
            "empty": "no gradwatch data"}[what] in err
    assert "Traceback" not in err


def test_report_skips_corrupt_and_truncated_jsonl_lines(buggy, tmp_path, capsys) -> None:
    src = os.path.join(buggy["log_dir"], "gradwatch.jsonl")
    dst = tmp_path / "gradwatch.jsonl"
    lines = Path(src).read_text().splitlines(keepends=True)
    lines.insert(3, "this is not json\n")
    lines.insert(5, '{"kind": "no_such_kind", "severity": "error"}\n')
    lines.insert(7, "[1, 2]\n")
    text = "".join(lines) + lines[-1][: len(lines[-1]) // 2]  # a truncated last line
    dst.write_text(text)
    status, out, err = _report(capsys, str(tmp_path))
    assert status == 1
    assert f"gradwatch report: warning: {dst}: skipped 4 bad lines (first at line 4:" in err
    assert "Traceback" not in err
    assert f"tb_helpers.py:{buggy['mutate']}" in out
    status, out, err = _report(capsys, str(tmp_path), "--json")
    data = json.loads(out)
    assert data["counts"] == buggy["watch"].counts  # every good line still counted
    assert len(data["warnings"]) == 1


def test_report_reads_event_files_when_there_is_no_jsonl(buggy, tmp_path, capsys) -> None:
    files = glob.glob(os.path.join(buggy["log_dir"], "events.out.tfevents.*"))
    assert files, "the watched run wrote no TensorBoard event file"
    for f in files:
        shutil.copy(f, tmp_path)
    status, out, err = _report(capsys, str(tmp_path), "--json")
    assert status == 1 and err == ""
    data = json.loads(out)
    got = sorted((a["kind"], tuple(a["tensors"]), a["event"]["location"]["lineno"], a["count"],
                  a["first_step"], a["last_step"]) for a in data["anomalies"])
    assert got == _expected(buggy["watch"])
    anomalous = {k: v for k, v in buggy["watch"].counts.items()
                 if k in ("saved_tensor_mutated", "stale_grad_accumulation")}
    assert {k: data["counts"][k] for k in anomalous} == anomalous


def test_report_counts_a_run_with_jsonl_and_event_files_once(buggy, capsys) -> None:
    _status, out, _ = _report(capsys, buggy["log_dir"], "--json")
    data = json.loads(out)
    assert data["counts"] == buggy["watch"].counts
    assert [os.path.basename(f) for f in data["files"]] == ["gradwatch.jsonl"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_report_survives_damaged_event_files(buggy, tmp_path, capsys, damage) -> None:
    src = glob.glob(os.path.join(buggy["log_dir"], "events.out.tfevents.*"))[0]
    raw = Path(src).read_bytes()
    dst = tmp_path / os.path.basename(src)
    if damage == "truncated":
        dst.write_bytes(raw[: len(raw) - 7])
    else:
        first = 12 + int.from_bytes(raw[:8], "little") + 4  # end of the first record
        dst.write_bytes(raw[:first] + b"\x00garbage" * 50)
    status, _out, err = _report(capsys, str(tmp_path))
    assert "Traceback" not in err
    expected = "truncated record" if damage == "truncated" else "corrupt record header"
    assert f"gradwatch report: warning: {dst}: {expected}" in err
    assert "the rest of the file is skipped" in err
    assert status in (0, 1, 2)


def test_report_merges_ranks(buggy, tmp_path, capsys) -> None:
    src = Path(buggy["log_dir"], "gradwatch.jsonl").read_text().splitlines()
    for rank in (0, 1):
        lines = []
        for line in src:
            d = json.loads(line)
            d["rank"] = rank
            lines.append(json.dumps(d))
        (tmp_path / f"gradwatch.rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    status, out, _ = _report(capsys, str(tmp_path), "--json")
    data = json.loads(out)
    assert status == 1
    assert {tuple(a["ranks"]) for a in data["anomalies"]} == {(0, 1)}
    assert data["counts"] == {k: 2 * v for k, v in buggy["watch"].counts.items()}
    status, out, _ = _report(capsys, str(tmp_path))
    assert "RANKS" in out and " 0,1" in out


def test_console_script_is_registered() -> None:
    from importlib.metadata import entry_points

    (ep,) = entry_points(group="console_scripts").select(name="gradwatch")
    assert ep.load() is main


# --------------------------------------------------------------------------------------- run
BUGGY_SCRIPT = """\
import torch

model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    opt.zero_grad()
    loss = model(torch.randn(4, 3)).pow(2).mean()
    with torch.no_grad():
        model[2].weight.mul_(0.99)  # the culprit: edits a weight the graph saved
    loss.backward()
    opt.step()
"""

STALE_SCRIPT = """\
import torch

model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()  # zero_grad is forgotten
    opt.step()
print("trained")
"""

CLEAN_SCRIPT = """\
import json, os, sys
import torch
import sibling

model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
with open(os.environ["GW_OUT"], "w") as f:
    json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0],
               "sibling": sibling.VALUE}, f)
"""


def _script(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_run_names_the_culprit_line_of_a_crashing_script(tmp_path, capsys) -> None:
    script = _script(tmp_path, "train_bug.py", BUGGY_SCRIPT)
    log_dir = tmp_path / "logs"
    status = main(["run", "--log-dir", str(log_dir), str(script)])
    out, err = capsys.readouterr()
    line = _line_of(BUGGY_SCRIPT, "the culprit")
    assert status == 1  # uncaught exception: traceback, report, exit 1
    assert "Traceback (most recent call last)" in err
    assert "one of the variables needed for gradient computation" in err
    assert f"gradwatch: `2.weight` was modified in place by mul_ at {script}:{line}" in err
    # the report follows the traceback and names the culprit line
    report = err[err.index("gradwatch: report"):]
    assert f"saved_tensor_mutated  2.weight  {_short(script)}:{line}" in report
    assert "model[2].weight.mul_(0.99)" in report
    assert f"logs: {log_dir}" in report
    # the log dir is readable by `gradwatch report`
    status, out, _ = _report(capsys, str(log_dir))
    assert status == 1 and f"train_bug.py:{line}" in out


def _short(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def test_run_reports_a_forgotten_zero_grad_and_exits_0(tmp_path, capsys) -> None:
    script = _script(tmp_path, "train_stale.py", STALE_SCRIPT)
    status = main(["run", "--log-dir", str(tmp_path / "logs"), str(script)])
    out, _err = capsys.readouterr()
    assert status == 0
    assert out.startswith("trained\n")
    line = _line_of(STALE_SCRIPT, "zero_grad is forgotten")
    assert f"stale_grad_accumulation  weight, bias (2 tensors)  {_short(script)}:{line}" in out


def test_run_clean_script_sees_its_own_argv_name_and_path(tmp_path, capsys, monkeypatch) -> None:
    _script(tmp_path, "train_clean.py", CLEAN_SCRIPT)
    _script(tmp_path, "sibling.py", "VALUE = 42\n")
    result = tmp_path / "result.json"
    monkeypatch.setenv("GW_OUT", str(result))
    monkeypatch.chdir(tmp_path)
    argv_before, path_before = sys.argv[:], sys.path[:]
    status = main(["run", "train_clean.py", "--epochs", "3", "-x"])
    out, _err = capsys.readouterr()
    assert status == 0
    assert "no anomalies" in out
    got = json.loads(result.read_text())
    assert got["argv"][1:] == ["--epochs", "3", "-x"]
    assert os.path.basename(got["argv"][0]) == "train_clean.py"
    assert got["name"] == "__main__"
    assert got["path0"] == str(tmp_path)
    assert got["sibling"] == 42
    assert sys.argv == argv_before and sys.path == path_before
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "gradwatch-*"))  # the default log dir
    assert os.path.exists(os.path.join(log_dir, "gradwatch.jsonl"))


def test_run_passes_sys_exit_status_through(tmp_path, capsys) -> None:
    script = _script(tmp_path, "bye.py", "import sys\nprint('bye')\nsys.exit(3)\n")
    assert main(["run", "--log-dir", str(tmp_path / "l"), str(script)]) == 3
    out, err = capsys.readouterr()
    assert "bye" in out and "Traceback" not in err
    assert "no anomalies" in err  # the report still comes, on stderr for a failing status
    script = _script(tmp_path, "ok.py", "import sys\nsys.exit(0)\n")
    assert main(["run", "--log-dir", str(tmp_path / "l2"), str(script)]) == 0


def test_run_missing_script_exits_2(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "cannot find script" in capsys.readouterr().err


def test_python_dash_m_gradwatch_run_exit_status(tmp_path) -> None:
    """The real process: ``python -m gradwatch run`` exits with the script's status."""
    script = _script(tmp_path, "bye.py", "import sys\nsys.exit(3)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", "--log-dir", str(tmp_path / "l"),
         str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "no anomalies" in proc.stderr
    assert textwrap.dedent("Traceback") not in proc.stderr


OWN_WATCH_SCRIPT = """\
import torch
import gradwatch
from torch import nn

model = nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with gradwatch.watch(model, opt, on_anomaly="log") as w:  # the script watches itself
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()  # zero_grad is forgotten
        opt.step()
print("own report:", w.counts["stale_grad_accumulation"])
"""


def test_run_a_script_that_starts_its_own_watch_shares_it(tmp_path, capsys) -> None:
    script = _script(tmp_path, "own_watch.py", OWN_WATCH_SCRIPT)
    from gradwatch import GradWatchWarning

    with pytest.warns(GradWatchWarning, match="joins it"):
        status = main(["run", "--log-dir", str(tmp_path / "logs"), str(script)])
    out, _err = capsys.readouterr()
    assert status == 0
    assert "own report: 4" in out  # the script's watch() sees what the run's watch sees
    line = _line_of(OWN_WATCH_SCRIPT, "zero_grad is forgotten")
    assert f"stale_grad_accumulation  weight, bias (2 tensors)  {_short(script)}:{line}" in out


LIGHTNING_SCRIPT = """\
import sys
import torch
from torch import nn
from gradwatch.lightning import GradWatchCallback
if sys.argv[2] == "lightning.pytorch":
    import lightning.pytorch as pl
else:
    import pytorch_lightning as pl


class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 1)

    def training_step(self, batch, i):
        return self.l(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 3))
        return torch.utils.data.DataLoader(data, batch_size=4)


cb = GradWatchCallback()
pl.Trainer(max_steps=5, enable_progress_bar=False, logger=False, enable_checkpointing=False,
           default_root_dir=sys.argv[1], callbacks=[cb]).fit(M())
print("callback counts:", cb.counts)
"""


def test_run_a_lightning_script_whose_callback_joins_the_run(tmp_path, capsys) -> None:
    """The callback's watch joins the run's: it opens no files of its own (before, an empty
    gradwatch.jsonl in the trainer's directory and an unclosed file), the run's log has it all."""
    import warnings

    package = next((p for p in ("lightning.pytorch", "pytorch_lightning")
                    if __import__("importlib").util.find_spec(p.split(".")[0])), None)
    if package is None:
        pytest.skip("no Lightning")
    script = _script(tmp_path, "lit.py", LIGHTNING_SCRIPT)
    root = tmp_path / "trainer"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main(["run", "--log-dir", str(tmp_path / "logs"), str(script), str(root),
                       package])
    out, _err = capsys.readouterr()
    assert status == 0
    assert "callback counts: {'grad_accumulated': 10, 'optimizer_update': 5}" in out
    assert not glob.glob(str(root / "**" / "gradwatch*.jsonl"), recursive=True)
    assert not [c for c in caught if issubclass(c.category, ResourceWarning)]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "gradwatch.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "optimizer_update" for r in rows) == 5


def test_version(capsys) -> None:
    import gradwatch

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradwatch {gradwatch.__version__}"
