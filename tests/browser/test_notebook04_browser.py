"""Notebook 04 as a new user opens it: a fresh checkout, one finished smoke run, JupyterLab, "Run All".

The working tree (tracked and untracked files git does not ignore) is copied to a temporary
folder: no ``runs/``, no data, no checkpoints. ``fundus-lab reproduce --preset smoke
--notebooks 04`` makes a finished run there and points ``runs/latest`` at it. JupyterLab
serves that copy (its kernel imports the copy's ``fundus_lab``), Chromium opens
``notebooks/04_zero_shot.ipynb`` as committed (default parameters: the latest run, no
training) and runs all cells. Every cell must finish without an error, nothing may be
trained (the run's checkpoints and cache keys unchanged, no new pretraining folder), and
the page must show the figures and the readings. Screenshots go to ``runs/browser/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_playground_browser import CHROMEDRIVER, CHROMIUM, SHOTS, TOKEN, _wait, browser, jupyterlab, require_browser  # noqa: F401

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
RUN_NAME = "smoke-browser"
NOTEBOOK = "notebooks/04_zero_shot.ipynb"


def _copy_checkout(dest: Path) -> None:
    """The working tree as a fresh clone would hold it, uncommitted edits included."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src, dst = ROOT / rel, dest / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # notebooks/ -> fundus_lab/notebooks stays a link
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def _trained_state(run: Path) -> dict[str, str]:
    """What training would change: each pretraining folder's cache key and checkpoint files (size, mtime)."""
    state = {}
    for path in sorted((run / "pretrain").rglob("*")):
        rel = str(path.relative_to(run))
        if path.name == "cache_key.json":
            state[rel] = path.read_text()
        elif path.is_file() and "checkpoint-" in rel:
            st = path.stat()
            state[rel] = f"{st.st_size}:{st.st_mtime_ns}"
        elif path.is_dir() and path.parent.parent.name == "pretrain":
            state[rel] = "seed folder"
    return state


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh copy of the checkout holding one finished smoke run, named by ``runs/latest``."""
    require_browser()
    root = tmp_path_factory.mktemp("checkout")
    _copy_checkout(root)
    assert not (root / "runs").exists(), "a fresh checkout has no runs"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    with open(root / "reproduce.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "fundus_lab.cli", "reproduce", "--preset", "smoke", "--notebooks",
                               "04", "--name", RUN_NAME, "--no-progress"], cwd=root, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=1500)
    assert done.returncode == 0, (root / "reproduce.log").read_text()[-3000:]
    assert (root / "runs" / "latest").read_text().strip() == RUN_NAME
    return root


@pytest.fixture(scope="module")
def lab(checkout):
    with jupyterlab(checkout, {"PYTHONPATH": str(checkout)}) as url:
        yield url


# the notebook's model as JupyterLab holds it (nbformat JSON): independent of which cells are rendered
NOTEBOOK_JSON = ("const w = window.jupyterapp.shell.currentWidget;"
                 "return w && w.content && w.content.model ? JSON.stringify(w.content.model.toJSON()) : null;")


def _errors(nb: dict) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _finished(driver) -> dict | None:
    """The notebook once every code cell has run, or once one raised (Run All stops there)."""
    raw = driver.execute_script(NOTEBOOK_JSON)
    if not raw:
        return None
    nb = json.loads(raw)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return nb if _errors(nb) or (code and all(c.get("execution_count") for c in code)) else None


def _rendered(driver, selector: str) -> list[str]:
    """Text (or image src length) of every element matching ``selector``, scrolling through the
    notebook so cells JupyterLab renders lazily are drawn too."""
    seen: dict[int, str] = {}
    count = driver.execute_script("return window.jupyterapp.shell.currentWidget.content.widgets.length;")
    for i in range(count):
        driver.execute_script("const nb = window.jupyterapp.shell.currentWidget.content;"
                              "nb.scrollToItem(arguments[0]);", i)
        found = driver.execute_script(
            "const cell = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node;"
            "return Array.from(cell.querySelectorAll(arguments[1])).map(e => e.tagName === 'IMG' ? "
            "(e.complete && e.naturalWidth > 0 ? 'img ' + e.naturalWidth : '') : e.textContent);", i, selector)
        if found:
            seen[i] = "\n".join(found)
    return [t for t in seen.values() if t]


def test_run_all_on_notebook_04_shows_figures_and_readings_without_training(checkout, lab, browser):
    run = checkout / "runs" / RUN_NAME
    before = _trained_state(run)
    assert any(k.endswith("cache_key.json") for k in before), f"the smoke run trained nothing: {sorted(before)}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(f"{lab}/lab/tree/{NOTEBOOK}?token={TOKEN}")
        _wait(lambda: browser.execute_script("return !!(window.jupyterapp && document.querySelector('.jp-Notebook'))"),
              120, "the notebook to open")

        def kernel_idle():
            with urllib.request.urlopen(f"{lab}/api/kernels?token={TOKEN}", timeout=5) as r:
                kernels = json.load(r)
            return kernels and all(k["execution_state"] == "idle" for k in kernels)

        _wait(kernel_idle, 120, "the notebook's kernel to start")
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        nb = _wait(lambda: _finished(browser), 600, "Run All to finish every cell", interval=2)
        assert not _errors(nb), f"{NOTEBOOK} raised in JupyterLab: {_errors(nb)}"
        _wait(kernel_idle, 60, "the kernel to settle")
        browser.save_screenshot(str(SHOTS / "notebook04_after_run_all.png"))
    except Exception:
        browser.save_screenshot(str(SHOTS / "notebook04_failure.png"))
        raise

    # it opened the run reproduce made (runs/latest), from the copy, and trained nothing
    shown = json.dumps([c.get("outputs", []) for c in nb["cells"] if c["cell_type"] == "code"])
    for method in ("clip", "ours"):
        assert f"pretraining unchanged, reusing {run}/pretrain/{method}/seed0" in shown, shown[:2000]
    assert _trained_state(run) == before, "Run All changed the run's checkpoints: it trained"
    assert "pretrain clip" not in shown and "pretrain ours" not in shown  # no training progress bar

    # the figures: one image output per figure cell, drawn on the page
    figures = sum(1 for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {}))
    assert figures >= 3, f"expected the zero-shot bars, the confusion matrix and the recall plot; got {figures} images"
    images = _rendered(browser, ".jp-OutputArea-output img")
    assert sum(t.count("img ") for t in images) >= 3, images
    # the readings: the opening and one after each figure, rendered as markdown
    text = "\n".join(_rendered(browser, ".jp-MarkdownOutput"))
    assert "What this shows." in text and "What to look for." in text, text[:1000]
    assert text.count("Reading.") >= 2, text[:3000]
