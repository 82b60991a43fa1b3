"""The prompt playground as a researcher uses it: JupyterLab in headless Chromium.

JupyterLab is served on 127.0.0.1 (free port, token) from a temporary folder holding
``08_prompt_playground.ipynb`` prepared with papermill at the ``smoke`` preset. Chromium
opens it, runs all cells, changes the prompts in the widget's text box, and the shown
probabilities must change. A screenshot goes to ``runs/browser/``.

Needs Debian's ``chromium`` + ``chromedriver`` and ``selenium`` (``.ci/install_browser.sh``);
skipped with the reason when one is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "fundus-lab-browser-test"
METHODS = ["clip", "ours"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last_err = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


def require_browser() -> None:
    """Skip without Chromium, chromedriver and selenium; `make test-browser` sets
    FUNDUS_LAB_REQUIRE_BROWSER=1, and there a missing browser fails, never skips."""
    missing = (pytest.fail if os.environ.get("FUNDUS_LAB_REQUIRE_BROWSER") == "1" else pytest.skip)
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing("chromium and chromedriver are not installed (run .ci/install_browser.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing("selenium is not installed (run .ci/install_browser.sh)")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A served folder with the smoke-preset playground notebook and its checkpoints trained."""
    require_browser()
    import papermill

    from fundus_lab.experiment import Run

    served = tmp_path_factory.mktemp("lab")
    run_dir = served / "run"
    ctx = Run(notebook="08_prompt_playground", preset="smoke", run_dir=run_dir, methods=METHODS, train_if_missing=True)
    for m in METHODS:  # train up front, so the browser only waits for scoring
        ctx.checkpoint(m)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "08_prompt_playground.ipynb"), str(served / "playground.ipynb"),
        parameters={"preset": "smoke", "run_dir": str(run_dir), "methods": METHODS, "method": "ours"},
        prepare_only=True,
    )
    return served


@contextlib.contextmanager
def jupyterlab(root: Path, extra_env: dict[str, str]):
    """A JupyterLab server serving ``root`` on a free local port (token auth, no browser, no
    update checks); yields its URL and stops it afterwards. Its log is ``root/jupyterlab.log``."""
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "OMP_NUM_THREADS": "1", **extra_env}
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", *as_root],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2).status == 200, 90, "JupyterLab to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def lab(prepared):
    with jupyterlab(prepared, {}) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1500,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _probabilities(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, ".fl-playground table.fl-probs tr")
    out = {}
    for row in rows:
        cells = row.find_elements(By.TAG_NAME, "td")
        if len(cells) == 2:
            out[cells[0].text] = cells[1].text
    return out


SHOTS = ROOT / "runs" / "browser"


@pytest.fixture
def screenshot_on_failure(browser):
    failed = {"value": True}
    yield failed
    if failed["value"]:
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / "playground_failure.png"))


def test_playground_in_jupyterlab(lab, browser, screenshot_on_failure):
    from selenium.webdriver.common.by import By

    browser.get(f"{lab}/lab/tree/playground.ipynb?token={TOKEN}")
    _wait(lambda: browser.execute_script("return !!(window.jupyterapp && document.querySelector('.jp-Notebook'))"), 120, "the notebook to open")

    def kernel_idle():
        with urllib.request.urlopen(f"{lab}/api/kernels?token={TOKEN}", timeout=5) as r:
            kernels = json.load(r)
        return kernels and all(k["execution_state"] == "idle" for k in kernels)

    _wait(kernel_idle, 120, "the notebook's kernel to start")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")

    before = _wait(lambda: _probabilities(browser), 240, "the playground's probability table")
    assert len(before) >= 2, before
    out = SHOTS
    out.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(out / "playground_before.png"))

    textarea = browser.find_element(By.CSS_SELECTOR, ".fl-playground textarea")
    browser.execute_script("arguments[0].scrollIntoView(); arguments[0].focus(); arguments[0].value = '';", textarea)
    textarea.send_keys("healthy retina | normal fundus\nhaemorrhages and exudates\nlarge cup of the optic disc")
    browser.execute_script("arguments[0].blur();", textarea)  # the widget re-scores when the edit is done

    after = _wait(lambda: (p := _probabilities(browser)) != before and len(p) == 3 and p, 120, "the probabilities to change")
    assert list(after) == ["healthy retina", "haemorrhages and exudates", "large cup of the optic disc"]
    total = sum(float(v) for v in after.values())
    assert abs(total - 1.0) < 1e-3, after
    message = browser.find_element(By.CSS_SELECTOR, ".fl-playground .fl-error") if browser.find_elements(By.CSS_SELECTOR, ".fl-playground .fl-error") else None
    assert message is None, message.text
    _wait(kernel_idle, 60, "the figure to be redrawn")
    browser.save_screenshot(str(out / "playground_after.png"))
    assert (out / "playground_after.png").stat().st_size > 10_000
    screenshot_on_failure["value"] = False
