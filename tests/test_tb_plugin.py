"""The GradWatch TensorBoard tab (issue 5): data read back through TensorBoard's own data
provider, a real ``tensorboard`` server, and the tab rendered by headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import pytest
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin

import tb_helpers
from gradwatch.tb_plugin.data import GradWatchData, ratio_status
from gradwatch.tb_plugin.plugin import GradWatchPlugin

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "screenshots"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two real watched runs: ``buggy`` (saved tensor mutated + forgotten zero_grad) and
    ``layers`` (a dead branch that stopped training, a branch that blows up)."""
    root = tmp_path_factory.mktemp("tb")
    buggy = tb_helpers.buggy_run(str(root / "buggy"))
    tb_helpers.layer_health_run(str(root / "layers"))
    return {"root": str(root), **buggy}


def _provider(root: str) -> tb_data_provider.MultiplexerDataProvider:
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(root)
    mux.Reload()
    return tb_data_provider.MultiplexerDataProvider(mux, root)


@pytest.fixture(scope="module")
def data(logdir) -> GradWatchData:
    return GradWatchData(_provider(logdir["root"]), tb_context.RequestContext(), "")


# ------------------------------------------------------------------------------ plugin object
def test_plugin_metadata_routes_and_is_active(logdir, tmp_path) -> None:
    plugin = GradWatchPlugin(base_plugin.TBContext(data_provider=_provider(logdir["root"])))
    assert plugin.plugin_name == "gradwatch"
    assert plugin.frontend_metadata().es_module_path == "/index.js"
    assert {"/index.js", "/anomalies", "/timeline", "/update_ratios", "/runs"} <= set(
        plugin.get_plugin_apps()
    )
    assert plugin.is_active() is True
    (tmp_path / "empty").mkdir()
    empty = GradWatchPlugin(base_plugin.TBContext(data_provider=_provider(str(tmp_path))))
    assert empty.is_active() is False


def test_anomalies_of_all_runs_match_the_watch(data, logdir) -> None:
    anomalies = data.anomalies()
    expected = sorted(  # the findings: one per kind and culprit line, with their tensors
        (d["event"].kind.value, tuple(d["tensors"]), d["event"].location.lineno, d["count"],
         d["first_step"], d["last_step"])
        for d in logdir["watch"].distinct_anomalies()
    )
    got = sorted((a["kind"], tuple(a["tensors"]), a["line"], a["count"], a["first_step"],
                  a["last_step"]) for a in anomalies)
    assert got == expected
    (stale,) = [a for a in anomalies if a["kind"] == "stale_grad_accumulation"
                and a["line"] == logdir["stale"]]
    assert stale["tensor"] == "{0,2,4}.weight, {0,2,4}.bias (6 tensors)"
    assert stale["tensor_count"] == 6 and stale["where"] == f"tb_helpers.py:{logdir['stale']}"
    assert {(a["run"], a["rank"]) for a in anomalies} == {("buggy", 0)}
    top = anomalies[0]  # worst first
    assert (top["kind"], top["severity"], top["tensor"]) == ("saved_tensor_mutated", "error",
                                                              "2.weight")
    assert top["where"] == f"tb_helpers.py:{logdir['mutate']}"
    assert top["file"] == tb_helpers.__file__
    assert top["code"] == "model[2].weight.mul_(0.9)  # <- mutate"
    assert top["hint"].startswith("compute the loss again")
    assert top["event"]["version_before"] + 1 == top["event"]["version_after"]
    assert data.anomalies("layers") == []
    assert len(data.anomalies("buggy")) == len(anomalies)


def test_timeline_counts_per_kind_and_step(data, logdir) -> None:
    tl = data.timeline()
    totals = {s["kind"]: s["total"] for s in tl["series"] if s["run"] == "buggy"}
    counts = logdir["watch"].counts
    assert totals == {k: counts[k] for k in ("saved_tensor_mutated", "stale_grad_accumulation")}
    assert all(s["run"] != "layers" for s in tl["series"])
    assert tl["max_step"] >= 5


def test_update_ratios_flag_stalled_and_exploding_layers(data) -> None:
    (run,) = [r for r in data.update_ratios()["runs"] if r["run"] == "layers"]
    status = {p["name"]: p["status"] for p in run["params"]}
    assert status == {
        "dead.0.weight": "stalled", "dead.0.bias": "stalled",
        "skip.weight": "exploding", "skip.bias": "exploding",
        "head.weight": "ok", "head.bias": "ok",
    }
    dead = next(p for p in run["params"] if p["name"] == "dead.0.weight")
    assert dead["last"] == 0.0 and len(dead["points"]) == 12
    assert [p["status"] for p in run["params"]][:4] == ["exploding"] * 2 + ["stalled"] * 2


def test_ratio_status_thresholds() -> None:
    assert ratio_status(0.0) == "stalled"
    assert ratio_status(1e-3) == "ok"
    assert ratio_status(0.5) == "exploding"
    assert ratio_status(float("nan")) == "nonfinite"
    assert ratio_status(None) == "nonfinite"


def test_index_js_ships_in_the_wheel(tmp_path) -> None:
    pytest.importorskip("hatchling")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("gradwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradwatch/tb_plugin/static/index.js" in names


# ------------------------------------------------------------------ real server + real browser
def _browser_available() -> bool:
    return tb_helpers.chromium_binary() is not None and os.path.exists(tb_helpers.CHROMEDRIVER)


def test_tab_in_a_real_tensorboard_and_headless_chromium(logdir, tmp_path) -> None:
    if not _browser_available():
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium "
                    "chromium-driver)")
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    where = f"tb_helpers.py:{logdir['mutate']}"
    t0 = time.monotonic()
    with tb_helpers.tensorboard_server(logdir["root"]) as url:
        listing = tb_helpers.get_json(url + "/data/plugins_listing")
        assert listing["gradwatch"]["enabled"] is True
        assert listing["gradwatch"]["loading_mechanism"] == {
            "type": "IFRAME", "module_path": "/data/plugin/gradwatch/index.js"}
        base = url + "/data/plugin/gradwatch/"
        n = len(logdir["watch"].distinct_anomalies())
        anomalies = tb_helpers.wait_json(base + "anomalies", lambda b: len(b) == n)
        top = anomalies[0]
        assert (top["run"], top["rank"], top["kind"], top["where"]) == (
            "buggy", 0, "saved_tensor_mutated", where)
        assert tb_helpers.get_json(base + "anomalies?" + urllib.parse.urlencode(
            {"run": "layers"})) == []
        ratios = tb_helpers.get_json(base + "update_ratios?run=layers")
        assert [r["run"] for r in ratios["runs"]] == ["layers"]
        assert {p["status"] for p in ratios["runs"][0]["params"]} == {
            "stalled", "exploding", "ok"}

        with tb_helpers.headless_chromium(1400, 1000) as driver:
            driver.get(url + "/#gradwatch")
            frame = WebDriverWait(driver, 20).until(
                lambda d: d.find_element(By.TAG_NAME, "iframe"))
            driver.switch_to.frame(frame)
            WebDriverWait(driver, 20).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "#gw-root[data-ready=true]"))
            rows = driver.find_elements(By.CSS_SELECTOR, "#gw-anomaly-table tr.gw-row")
            assert len(rows) == n  # one row per finding: the six stale tensors are one row
            stale_where = f"tb_helpers.py:{logdir['stale']}"
            i = [r.get_attribute("data-where") for r in rows].index(stale_where)
            assert "{0,2,4}.weight, {0,2,4}.bias (6 tensors)" in rows[i].text
            rows[i].click()
            detail = driver.find_element(By.CSS_SELECTOR, "tr.gw-details")
            assert "6 tensors: 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias" in detail.text
            driver.find_elements(By.CSS_SELECTOR, "tr.gw-row")[i].click()  # closed again
            assert not driver.find_elements(By.CSS_SELECTOR, "tr.gw-details")
            rows = driver.find_elements(By.CSS_SELECTOR, "#gw-anomaly-table tr.gw-row")
            assert rows[0].get_attribute("data-where") == where
            assert where in rows[0].text
            assert "model[2].weight.mul_(0.9)" in rows[0].text
            assert where in driver.find_element(By.TAG_NAME, "body").text
            rows[0].click()
            detail = driver.find_element(By.CSS_SELECTOR, "tr.gw-details")
            assert f"{tb_helpers.__file__}:{logdir['mutate']} in buggy_run()" in detail.text
            flagged = driver.find_elements(By.CSS_SELECTOR, "tr.gw-param[data-status=stalled]")
            assert {r.text.split()[0] for r in flagged} == {"dead.0.weight", "dead.0.bias"}
            assert driver.find_elements(By.CSS_SELECTOR, "#gw-timeline circle")
            # filters: one kind only
            from selenium.webdriver.support.select import Select

            Select(driver.find_element(By.ID, "gw-filter-kind")).select_by_value(
                "saved_tensor_mutated")
            assert len(driver.find_elements(By.CSS_SELECTOR, "tr.gw-row")) == 1
            Select(driver.find_element(By.ID, "gw-filter-kind")).select_by_value("")
            driver.find_elements(By.CSS_SELECTOR, "tr.gw-row")[0].click()
            # filtering to one run: the axis is that run's own steps
            Select(driver.find_element(By.ID, "gw-filter-run")).select_by_value("buggy")
            last_tick = driver.find_elements(By.CSS_SELECTOR, "#gw-timeline text")[-1].text
            assert int(last_tick) <= 5
            Select(driver.find_element(By.ID, "gw-filter-run")).select_by_value("")
            # a new run written after the page loaded appears without reloading the page
            # (TensorBoard's reload button: its 'experimental.DataReloaded', or the tab's poll)
            loads = int(driver.find_element(By.ID, "gw-root").get_attribute("data-loads"))
            tb_helpers.buggy_run(os.path.join(logdir["root"], "z_later_run_with_a_long_name_"
                                              "that_must_not_cover_the_timeline"), steps=5)
            driver.switch_to.default_content()
            time.sleep(1.5)  # TensorBoard's --reload_interval 1
            driver.find_element(By.CSS_SELECTOR, "app-header-reload button").click()
            driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
            WebDriverWait(driver, 20).until(lambda d: any(
                "z_later_run" in r.text for r in d.find_elements(
                    By.CSS_SELECTOR, "#gw-anomaly-table tr.gw-row")))
            assert int(driver.find_element(By.ID, "gw-root").get_attribute("data-loads")) > loads
            labels = driver.execute_script(  # shown text, and whether it ends left of the dots
                "const x0 = Math.min(...[...document.querySelectorAll('#gw-timeline circle')]"
                "  .map((c) => +c.getAttribute('cx') - +c.getAttribute('r')));"
                "return [...document.querySelectorAll('text.gw-lane-label')].map((t) =>"
                "  [t.firstChild.nodeValue, t.getBBox().x + t.getBBox().width < x0]);")
            assert any(text.endswith("…") for text, _ in labels)
            assert all(left_of_dots for _, left_of_dots in labels), labels
            driver.find_elements(By.CSS_SELECTOR, "tr.gw-row")[0].click()
            _screenshots(driver, tmp_path)
    assert time.monotonic() - t0 < 60


def _screenshots(driver: Any, tmp_path: Path) -> None:
    """Tab screenshots into tmp_path; also into docs/screenshots with GRADWATCH_SCREENSHOTS=1."""
    driver.switch_to.default_content()
    driver.save_screenshot(str(tmp_path / "gradwatch_tab.png"))
    frame = driver.find_element("tag name", "iframe")
    driver.switch_to.frame(frame)
    driver.execute_script(
        "document.getElementById('gw-ratios-card').scrollIntoView({block: 'start'})")
    driver.switch_to.default_content()
    driver.save_screenshot(str(tmp_path / "gradwatch_tab_ratios.png"))
    for name in ("gradwatch_tab.png", "gradwatch_tab_ratios.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        if os.environ.get("GRADWATCH_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / name, SCREENSHOTS / name)


# ------------------------------------------------------------------ details of the tab's data
def _data_of(root: str) -> GradWatchData:
    return GradWatchData(_provider(root), tb_context.RequestContext(), "")


def test_zero_initialised_bias_is_never_blowing_up(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with tb_helpers.watched(str(tmp_path / "zero"), model, opt, stats_every=1):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    (run,) = _data_of(str(tmp_path)).update_ratios()["runs"]
    params = {p["name"]: p for p in run["params"]}
    bias = params["0.bias"]
    assert bias["zero_init"] is True and bias["points"][0][1] == 1.0
    assert bias["last"] > 0.1 and bias["status"] == "zero_init"  # n/a, never "blowing up"
    assert {p["status"] for n, p in params.items() if n != "0.bias"} == {"ok"}
    assert run["updated"] == 4 and run["optimizer_updates"] == 3
    assert ratio_status(0.5, zero_init=True) == "zero_init"
    assert ratio_status(0.0, zero_init=True) == "stalled"


def test_an_optimizer_that_updated_nothing(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tb_helpers.watched(str(tmp_path / "idle"), model, opt, stats_every=1):
        for _ in range(3):
            opt.step()  # no backward: nothing to apply
    (run,) = _data_of(str(tmp_path)).update_ratios()["runs"]
    assert run["params"] == [] and run["updated"] == 0 and run["optimizer_updates"] == 3


def test_timeline_axis_per_run(tmp_path) -> None:
    """Filtering the tab to one run draws that run's steps (run_max_step), not every run's."""
    tb_helpers.buggy_run(str(tmp_path / "short"), steps=6)
    tb_helpers.layer_health_run(str(tmp_path / "long"), steps=30)
    tl = _data_of(str(tmp_path)).timeline()
    assert tl["run_max_step"]["long"] == 29 and tl["run_max_step"]["short"] == 4
    assert tl["max_step"] == 29
