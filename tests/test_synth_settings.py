"""Issue 16, item 3: a synthetic dataset folder is never re-rendered under its user.

The README's sequence, at tiny sizes: ``generate_benchmark("data/synth", ...)`` with one set
of settings, then ``pretrain(cfg)`` whose config asks for another set in the same folder. It
used to regenerate the benchmark in place (synth.json went from n 24 / 224 px to n 48 / 64 px);
now it refuses, naming the settings that differ, and leaves every file as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import fundus_lab as fl
from fundus_lab.data import synth
from fundus_lab.data.synth import SynthSettingsError


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its modification time and bytes."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_readme_sequence_refuses_to_overwrite_the_users_benchmark(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fl.data.synth.generate_benchmark("data/synth", n_pretrain=8, n_eval=8, seed=0, image_size=32, workers=1)
    before = snapshot(tmp_path / "data" / "synth")
    ds = fl.data.open_dataset("synth-odir", split=None, root="data/synth/synth-odir", image_size=32)
    cfg = fl.config.load_config(preset="smoke", method="clip", overrides=["train.steps=1", "data.synth_root=data/synth"])
    assert cfg.data.synth_n != 8 and cfg.data.synth_image_size != 32
    with pytest.raises(SynthSettingsError, match=r"(?s)synth-pretrain holds a synthetic dataset generated with other "
                       r"settings \(n 8 on disk, 48 asked; image_size 32 on disk, 64 asked.*data.synth_root="):
        fl.train.pretrain(cfg)
    assert snapshot(tmp_path / "data" / "synth") == before  # not one file touched
    assert len(ds) == 8 and ds[0]["image"].shape[-1] == 32  # the open dataset still reads


def test_benchmark_checks_every_folder_before_writing_any(tmp_path):
    synth.generate(tmp_path / "synth-aptos", "aptos", n=4, seed=0, image_size=32, workers=1)
    with pytest.raises(SynthSettingsError, match=r"synth-aptos .*seed 0 on disk, 1 asked"):
        synth.generate_benchmark(tmp_path, n_pretrain=4, n_eval=4, seed=1, image_size=32, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["synth-aptos"]


def test_a_folder_that_is_not_a_synthetic_dataset_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own data")
    with pytest.raises(SynthSettingsError, match=r"mine is not empty and has no readable synth.json"):
        synth.generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)
    assert (out / "notes.txt").read_text() == "my own data"


def test_matching_or_empty_folders_and_overwrite_still_generate(tmp_path):
    out = tmp_path / "D"
    out.mkdir()  # empty: generated into
    synth.generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)
    before = snapshot(out)
    synth.generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)  # the same settings: reused
    assert snapshot(out) == before
    synth.generate(out, "pretrain", n=6, seed=0, image_size=32, workers=1, overwrite=True)  # asked for
    assert len((out / "labels.csv").read_text().splitlines()) == 7


def test_cli_synth_refuses_other_settings_and_overwrites_on_request(tmp_path, capsys):
    from fundus_lab.cli import main

    args = ["synth", "--out", str(tmp_path), "--task", "fives", "--n", "4", "--image-size", "32", "--workers", "1"]
    assert main(args) == 0
    before = snapshot(tmp_path / "synth-fives")
    capsys.readouterr()
    assert main(args[:-4] + ["--image-size", "48", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "image_size 32 on disk, 48 asked" in err and "--overwrite" in err
    assert snapshot(tmp_path / "synth-fives") == before
    assert main(args[:-4] + ["--image-size", "48", "--workers", "1", "--overwrite"]) == 0
    assert '"image_size": 48' in (tmp_path / "synth-fives" / "synth.json").read_text()
