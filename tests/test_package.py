"""A plain (non-editable) install works: the wheel carries presets, method configs, manifests,
the knowledge base and the notebooks, and ``fundus-lab pretrain --preset smoke`` runs from it
outside the checkout (issue 11, "a real package").

The wheel goes into a ``--target`` folder with ``--no-deps`` so the test reuses this
environment's torch and friends instead of downloading them; ``PYTHONPATH`` puts the target
first, and the test checks that ``fundus_lab`` really is imported from there, not the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# never copied into the build tree: environments, generated data, runs, build leftovers
SKIP = {".git", ".venv", "data", "runs", "build", "dist", "__pycache__", ".pytest_cache", "checkpoints", "outputs"}


def _copy_sources(dst: Path) -> None:
    """The checkout without generated folders (symlinks kept), so building never writes into it."""
    def ignore(folder, names):
        top = Path(folder).resolve() == REPO.resolve()
        return [n for n in names if (top and n in SKIP) or n in ("__pycache__", ".pytest_cache") or n.endswith(".egg-info")]

    shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)


@pytest.mark.slow
def test_wheel_installs_and_pretrains_outside_the_checkout(tmp_path):
    src, wheels, target, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                    "-w", str(wheels)], cwd=src, check=True, timeout=300)
    (wheel,) = wheels.glob("fundus_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("fundus_lab/configs/presets/smoke.yaml", "fundus_lab/configs/methods/ours.yaml",
                   "fundus_lab/data_manifests/refuge.yaml", "fundus_lab/data_manifests/synth-pretrain.yaml",
                   "fundus_lab/data/knowledge.yaml", "fundus_lab/notebooks/01_pretrain.ipynb",
                   "fundus_lab/templates/index.html.j2"):
        assert needed in names, f"{needed} missing from {wheel.name}"

    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    for var in ("FUNDUS_LAB_CONFIGS", "FUNDUS_LAB_MANIFESTS"):
        env.pop(var, None)

    probe = subprocess.run(
        [sys.executable, "-c",
         "import fundus_lab, fundus_lab.config as c, fundus_lab.data.manifest as m, fundus_lab.reproduce as r;"
         "print(fundus_lab.__file__); print(c.CONFIG_DIR); print(m.MANIFEST_DIR); print(len(r.list_notebooks()))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True)
    module_file, config_dir, manifest_dir, n_notebooks = probe.stdout.split()
    for p in (module_file, config_dir, manifest_dir):
        assert Path(p).resolve().is_relative_to(target.resolve()), f"{p} is not from the installed wheel"
    assert int(n_notebooks) == len(list((REPO / "fundus_lab" / "notebooks").glob("[0-9][0-9]_*.ipynb")))

    cli = [sys.executable, "-m", "fundus_lab.cli"]
    version = subprocess.run(cli + ["--version"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert version.stdout.strip().startswith("fundus-lab 0."), version.stdout + version.stderr

    run = subprocess.run(cli + ["pretrain", "--preset", "smoke", "train.steps=2"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    run_dir = Path(run.stdout.strip().splitlines()[-1])
    run_dir = run_dir if run_dir.is_absolute() else work / run_dir
    assert run_dir.resolve().is_relative_to(work.resolve())
    assert any(run_dir.glob("checkpoint-*")), sorted(p.name for p in run_dir.iterdir())
