"""Issue 16 item 4: relative paths mean the same for every command and notebook: relative to
the current working directory. Before, ``compare``, ``reproduce`` and the notebooks resolved
``data.synth_root`` against the checkout of an editable install, so a ``compare`` run from
another folder wrote image caches into the checkout's ``data/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fundus_lab
from fundus_lab import config as C
from fundus_lab import experiment
from fundus_lab import reproduce as rp
from fundus_lab import train as T

CHECKOUT = Path(fundus_lab.__file__).resolve().parent.parent
TINY_DATA = ["data.synth_n=8", "data.synth_eval_n=8", "data.synth_image_size=32", "data.num_workers=0"]


def _snapshot(*folders: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for f in folders if f.exists() for p in sorted(f.rglob("*"))}


def test_every_resolver_is_the_one_rule(tmp_path, monkeypatch):
    from fundus_lab.experiment import Run, dataset_root

    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(preset="smoke")
    assert C.resolve_path("data/x") == tmp_path / "data" / "x"
    run = Run("smoke", "runs/r")
    assert run.run_dir == tmp_path / "runs" / "r"
    assert run.data_root == str(tmp_path / cfg.data.synth_root)
    assert dataset_root(cfg, "synth-odir") == str(tmp_path / cfg.data.synth_root / "synth-odir")


def test_compare_style_data_and_caches_go_to_the_working_directory(tmp_path, monkeypatch):
    """``compare`` (a Run with no data root) and ``pretrain`` write the benchmark and its
    image caches under the working directory; the checkout's data/ and runs/ are untouched."""
    from fundus_lab.experiment import Run, ensure_synthetic, open_split

    before = _snapshot(CHECKOUT / "data", CHECKOUT / "runs")
    monkeypatch.chdir(tmp_path)
    run = Run("smoke", "runs/r", overrides=TINY_DATA)
    cfg = run.config("clip")
    root = ensure_synthetic(cfg, ["synth-fives"])
    assert root == tmp_path / cfg.data.synth_root
    ds = open_split(cfg, "synth-fives", "train", 32)
    ds[0]
    assert Path(ds.root).resolve().is_relative_to(tmp_path)
    assert any(root.rglob("*.u8.npy"))  # the image cache, beside the data in the working directory
    train_ds = T.open_training_data(cfg)
    assert Path(train_ds.dataset.root).resolve().is_relative_to(tmp_path)
    assert _snapshot(CHECKOUT / "data", CHECKOUT / "runs") == before


def test_reproduce_starts_notebooks_in_the_working_directory(tmp_path, monkeypatch):
    """Notebook kernels start in the caller's working directory (before: the checkout) and get
    an absolute run folder, so the preset's relative synth_root means the same inside them."""
    calls = []

    def record(path, out, parameters, log, cwd, *args, **kwargs):
        calls.append((dict(parameters), Path(cwd)))

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    (nbs / "00_x.ipynb").write_text("{}")
    monkeypatch.setattr(rp, "run_notebook", record)
    monkeypatch.setattr(rp, "write_index", lambda *a, **k: None)
    monkeypatch.setattr(rp, "write_summary", lambda *a, **k: None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run_dir = rp.reproduce("smoke", run_name="r", notebook_dir=nbs, runs_dir="runs", progress=False)
    assert run_dir == work / "runs" / "r"
    (params, cwd), = calls
    assert cwd == work
    assert params["run_dir"] == str(work / "runs" / "r")
    # the preset's, made absolute at launch: a notebook or key_figures opened on this run from
    # another folder reads the run's data instead of generating a benchmark where it stands
    assert params["data_root"] == str(work / C.resolve_config("smoke").data.synth_root)
    assert json.loads((run_dir / "parameters.json").read_text())["data_root"] == params["data_root"]
    rp.reproduce("smoke", run_name="r3", notebook_dir=nbs, runs_dir="runs", progress=False,
                 overrides=["data.synth_root=elsewhere"])
    assert calls[-1][0]["data_root"] == str(work / "elsewhere")
    assert json.loads((run_dir / "parameters.json").read_text())["run_dir"] == str(work / "runs" / "r")
    rp.reproduce("smoke", data_root="d", run_name="r2", notebook_dir=nbs, runs_dir="runs", progress=False)
    assert calls[-1][0]["data_root"] == str(work / "d")
    other = tmp_path / "other_checkout"
    other.mkdir()
    monkeypatch.chdir(other)
    assert experiment.Run(run_dir=run_dir, notebook="key_figures").data_root == params["data_root"]
