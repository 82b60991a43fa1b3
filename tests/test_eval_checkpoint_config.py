"""Issue 16 item 5: ``fundus-lab eval --checkpoint DIR`` evaluates under the preset and data
settings of the run that trained the checkpoint (its ``config.yaml``), overrides on top.
Before, ``eval --checkpoint runs/smoke/clip`` without ``--preset`` rendered the default
benchmark (2000 images at 224 px) instead of the smoke run's own data."""

from __future__ import annotations

import json

import pytest

from fundus_lab import config as C
from fundus_lab.data import synth
from doubles import COMPARE_MODEL_TINY as MODEL_TINY

TINY_EVAL = ["eval.bootstrap=20", "eval.batch_size=16", "eval.progress=false"]


@pytest.fixture
def smoke_run(tmp_path, monkeypatch):
    """A real smoke-preset clip run (2 steps, tiny model and data) trained in ``tmp_path``,
    with every benchmark rendering recorded."""
    from fundus_lab.train import pretrain

    monkeypatch.chdir(tmp_path)
    rendered = []
    real = synth.generate_benchmark

    def recording(root, **kwargs):
        rendered.append((str(root), kwargs))
        if kwargs.get("n_pretrain") != 64:
            raise AssertionError(f"a benchmark other than the run's was rendered: {kwargs}")
        return real(root, **kwargs)

    monkeypatch.setattr(synth, "generate_benchmark", recording)
    cfg = C.load_config(preset="smoke", method="clip", overrides=MODEL_TINY + [
        "data.synth_root=mydata", "train.output_dir=runs/smoke/clip"])
    run_dir = pretrain(cfg)
    return tmp_path, run_dir, rendered


def test_eval_takes_preset_and_data_from_the_checkpoints_run(smoke_run, capsys):
    from fundus_lab.cli import evaluate_main

    tmp_path, run_dir, rendered = smoke_run
    rc = evaluate_main(["--checkpoint", str(run_dir), "--protocol", "zero_shot", "--dataset", "synth-odir",
                        "--out", str(tmp_path / "out"), *TINY_EVAL])
    assert rc == 0, capsys.readouterr().err
    assert {root for root, _ in rendered} == {str(tmp_path / "mydata")}  # the run's synth_root, nothing else
    assert not (tmp_path / "data").exists()  # the default data.synth_root was never touched
    assert all(kwargs["n_eval"] == 60 and kwargs["image_size"] == 32 for _, kwargs in rendered)
    assert json.loads((tmp_path / "out" / "zero_shot.json").read_text())["available"]


def test_overrides_apply_on_top_of_the_checkpoints_config(smoke_run):
    from fundus_lab.experiment import checkpoint_eval_config

    _, run_dir, _ = smoke_run
    cfg = checkpoint_eval_config(run_dir / "config.yaml", None, ["data.synth_root=elsewhere", "eval.seeds=2"])
    assert cfg.preset == "smoke" and cfg.data.synth_n == 64 and cfg.data.synth_image_size == 32
    assert cfg.data.synth_root == "elsewhere" and cfg.eval.seeds == 2
    assert checkpoint_eval_config(run_dir / "config.yaml", "default", []).preset == "default"


def test_a_bad_saved_data_section_names_the_file(tmp_path):
    from fundus_lab.experiment import checkpoint_eval_config

    path = tmp_path / "config.yaml"
    path.write_text("preset: smoke\ndata:\n  synth_n: many\n")
    with pytest.raises(C.ConfigError, match=rf"{path}: data.synth_n = 'many' is not a valid int"):
        checkpoint_eval_config(path, None, [])
