"""Helpers for the CLI and TensorBoard-plugin tests: watched runs with real bugs, a real
``tensorboard`` server on loopback and a headless Chromium driven by selenium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import gradwatch

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"


def watched(log_dir: str, model: Any = None, optimizer: Any = None, **options: Any
            ) -> gradwatch.Watch:
    """``gradwatch.watch(log_dir=...)``: jsonl plus TensorBoard event files through the real
    sinks (``gradwatch.sinks.jsonl``, ``gradwatch.sinks.tensorboard``)."""
    return gradwatch.watch(model, optimizer, log_dir=log_dir, **options)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )


def buggy_run(log_dir: str, steps: int = 6) -> dict[str, Any]:
    """A real buggy loop: a weight edited in place under no_grad after the forward (backward
    then raises, caught), and a forgotten zero_grad. Returns the culprit lines."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watched(log_dir, model, opt, on_anomaly="log", stats_every=1) as w:
        for step in range(steps):
            x = torch.randn(32, 4)
            loss = model(x).pow(2).mean()
            if step == 3:
                with torch.no_grad():
                    model[2].weight.mul_(0.9)  # <- mutate
                try:
                    loss.backward()
                except RuntimeError:
                    opt.zero_grad()
                    continue
            else:
                loss.backward()  # <- stale (zero_grad is forgotten)
            opt.step()
    return {"watch": w, "file": __file__,
            "mutate": marked_line(__file__, "mutate"), "stale": marked_line(__file__, "stale")}


def marked_line(path: str, mark: str) -> int:
    """Line number of the line ending in ``# <- mark`` (possibly followed by a comment)."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if f"# <- {mark}" in line and "marked_line" not in line:
                return i
    raise LookupError(mark)


@contextlib.contextmanager
def tensorboard_server(logdir: str, extra: Sequence[str] = ()) -> Iterator[str]:
    """A real ``tensorboard`` on loopback; yields its base URL once ``/data/runs`` answers."""
    port = free_port()
    proc = subprocess.Popen(
        [TENSORBOARD, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "1", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
            try:
                get_json(url + "/data/runs", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def wait_json(url: str, ok: Any, timeout: float = 15) -> Any:
    """Poll ``url`` until ``ok(body)`` (TensorBoard loads event files in the background)."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = get_json(url)
        if ok(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{url} never became ready; last answer: {body!r}")


def chromium_binary() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        if os.path.exists(c):
            return c
    return shutil.which("chromium")


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A selenium driver for headless Chromium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gw-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium_binary() or ""
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def layer_health_run(log_dir: str, steps: int = 12) -> dict[str, Any]:
    """A loop with a branch that stopped training (its ReLUs are dead: zero gradients, an
    update/weight ratio of 0), a branch that blows up (learning rate far too high) and a
    healthy head."""
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({
        "dead": torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU()),
        "skip": torch.nn.Linear(4, 16),
        "head": torch.nn.Linear(16, 1),
    })
    with torch.no_grad():
        model["dead"][0].bias.fill_(-50.0)  # every unit dead from the start
    opt = torch.optim.Adam([
        {"params": model["dead"].parameters(), "lr": 1e-3},
        {"params": model["skip"].parameters(), "lr": 0.5},  # far too high
        {"params": model["head"].parameters(), "lr": 1e-3},
    ])
    with watched(log_dir, model, opt, on_anomaly="log", stats_every=1) as w:
        for _ in range(steps):
            x = torch.randn(32, 4)
            loss = (model["head"](model["dead"](x) + model["skip"](x)) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"watch": w}
