"""The README's figures: ``export_key_figures`` writes a finished run's five key figures as
small PNGs, reading the run (models, cached evaluations, Table 1) without training anything."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fundus_lab import experiment
from fundus_lab.key_figures import KEY_FIGURES, export_key_figures, main
from doubles import COMPARE_TINY as TINY

pytestmark = pytest.mark.filterwarnings("ignore:fewer than k")


def _trained_state_of(run_dir) -> dict[str, str]:
    """Each pretraining run's cache key and checkpoint files (size, mtime): what training changes."""
    state = {}
    for path in sorted((run_dir / "pretrain").rglob("*")):
        if path.name == "cache_key.json":
            state[str(path)] = path.read_text()
        elif path.is_file() and "checkpoint-" in str(path):
            state[str(path)] = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    return state


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder as reproduce leaves it: parameters.json, clip and ours pretrained and
    evaluated, Table 1 and its results.json (tiny model and data)."""
    from fundus_lab.experiment import Run, compare

    root = tmp_path_factory.mktemp("keyfig")
    run_dir, data = root / "run", root / "data"
    run = Run("smoke", run_dir, data, TINY)
    compare(run, ["clip", "ours"], references=("random-init",))
    (run_dir / "parameters.json").write_text(json.dumps(
        {"preset": "smoke", "run_dir": str(run_dir), "data_root": str(data), "methods": ["clip", "ours"],
         "overrides": TINY}))
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_export_writes_the_five_key_figures_small_and_trains_nothing(finished_run, tmp_path, capsys):
    before = _trained_state_of(finished_run)
    written = export_key_figures(finished_run, tmp_path / "figures", max_items=60)
    assert list(written) == list(KEY_FIGURES)
    total = 0
    for name, path in written.items():
        assert path == tmp_path / "figures" / f"{name}.png"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "P"  # palette: small
            assert min(im.size) >= 100, (name, im.size)
        size = path.stat().st_size
        assert 2_000 < size < 150_000, (name, size)
        total += size
    assert total < 400_000, total
    assert _trained_state_of(finished_run) == before  # nothing was (re)trained
    # the command line does the same and prints each file with its size
    assert main([str(finished_run), str(tmp_path / "cli")]) == 0
    assert "table1.png (" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_export_refuses_to_train_a_missing_checkpoint(finished_run, tmp_path):
    with pytest.raises(experiment.CheckpointMissing, match="ours-no-mim"):  # a method this run never trained
        export_key_figures(finished_run, tmp_path / "figures", method="ours-no-mim")
    assert not (finished_run / "pretrain" / "ours-no-mim" / "seed0" / "checkpoint-last").exists()


def test_export_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"parameters.json does not exist: export_key_figures reads a run folder"):
        export_key_figures(tmp_path, tmp_path / "figures")
    assert main([str(tmp_path), str(tmp_path / "figures")]) == 1
    assert "parameters.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()


def test_export_follows_the_runs_latest_pointer(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment.notebook, "project_root", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths mean the working directory (issue 16)
    with pytest.raises(FileNotFoundError, match="runs/latest does not exist yet"):
        export_key_figures("runs/latest", tmp_path / "figures")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    experiment.write_latest(tmp_path / "runs" / "r1", tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"runs/r1/parameters.json does not exist"):
        export_key_figures("runs/latest", tmp_path / "figures")


def test_focal_lesions_lead_the_attention_figure(tmp_path):
    """A mask over the whole fundus (media opacity) shows nothing beside an attention map: images
    whose every lesion is focal come first, the diffuse ones after, the lesion-free never."""
    from types import SimpleNamespace

    import numpy as np

    from fundus_lab.key_figures import focal_lesion_images

    def masks(name, **arrays):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        return SimpleNamespace(meta={"mask": f"{name}.npz"}, path=f"{name}.png")

    small, whole = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    small[2, 3] = True
    records = [masks("diffuse", media_opacity=whole, drusen=small), SimpleNamespace(meta={}, path="none.png"),
               masks("focal", drusen=small, exudate=np.zeros((8, 8), bool)), masks("diffuse2", media_opacity=whole)]
    ds = SimpleNamespace(root=tmp_path, records=records)
    assert focal_lesion_images(ds) == [2, 0, 3]
    assert focal_lesion_images(ds, max_share=1.1) == [0, 2, 3]  # nothing is diffuse: record order
