"""Issue 16 items 2 and 10: ``key=value`` overrides are typed by the schema, not read as YAML;
``--no-resume`` never clears a folder holding another run; every float setting is finite.

Before the fix ``train.output_dir=/runs/exp #2`` became ``/runs/exp`` (YAML comment), and
``--no-resume`` then deleted the checkpoints of the run already in ``/runs/exp``.
"""

from __future__ import annotations

import pytest
import yaml

from fundus_lab import config as C
from fundus_lab import train as T
from fundus_lab.cli import pretrain_main
from fundus_lab.config import ConfigError
from doubles import make_cfg


def _cfg(*overrides):
    return C.load_config(preset="smoke", method="clip", overrides=list(overrides))


# ---------------------------------------------------------------------------------------
# item 2: overrides typed by the schema


@pytest.mark.parametrize("text", ["/runs/exp #2", "line one\nline two", "~", "a: b", "[x]", "null-ish", " spaced ", "3"])
def test_a_string_field_takes_the_text_verbatim(text):
    assert _cfg(f"train.output_dir={text}").train.output_dir == text
    assert _cfg(f"data.text_source={text}").data.text_source == text


def test_numbers_bools_and_lists_parse_as_their_field_type():
    cfg = _cfg("train.lr=1e-3", "train.steps=1e2", "train.warmup_steps= 7", "data.augment=no", "train.progress=True",
               "eval.shots=1,2,4", "eval.pretrain_seeds=[0, 3]", "train.betas=0.8,0.9", "train.clip_grad_norm=null",
               "train.mixed_precision=bf16", "model.tokenizer=none")
    assert cfg.train.lr == 0.001 and cfg.train.steps == 100 and cfg.train.warmup_steps == 7
    assert cfg.data.augment is False and cfg.train.progress is True
    assert cfg.eval.shots == [1, 2, 4] and cfg.eval.pretrain_seeds == [0, 3] and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.clip_grad_norm is None and cfg.train.mixed_precision == "bf16" and cfg.model.tokenizer is None
    assert type(C.load_config(preset="smoke", overrides=["method=clip"]).method.name) is str  # YAML-dumpable


@pytest.mark.parametrize("override, match", [
    ("train.steps=12 #comment", r"train.steps = '12 #comment' is not a valid int"),
    ("train.steps=1.5", r"train.steps = '1.5' is not a valid int"),
    ("train.lr=fast", r"train.lr = 'fast' is not a valid float"),
    ("data.augment=maybe", r"data.augment = 'maybe' is not a valid bool"),
    ("eval.shots=1,two", r"eval.shots\[1\] = 'two' is not a valid int"),
    ("train.mixed_precision=fp8", r"train.mixed_precision = 'fp8'; expected one of"),
    ("train.betas=0.9", r"train.betas needs 2 values"),
])
def test_a_value_that_is_not_its_field_type_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_yaml_files_and_notebook_mappings_keep_their_types(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("train:\n  steps: 12\n  output_dir: 'runs/a #2'\n")
    cfg = C.load_config(path, preset="smoke", overrides={"train.lr": 0.002, "eval.shots": "1,2"})
    assert cfg.train.steps == 12 and cfg.train.output_dir == "runs/a #2" and cfg.train.lr == 0.002
    assert cfg.eval.shots == [1, 2]


# ---------------------------------------------------------------------------------------
# item 2: --no-resume never deletes another run


def test_no_resume_refuses_a_folder_holding_another_run(doubles, tmp_path):
    """The issue's case: the other run sits in ``exp``; a run for ``exp #2`` now goes to its
    own folder, and a run aimed at ``exp`` itself with --no-resume is refused, naming it."""
    other = make_cfg(tmp_path / "exp", steps=2)
    T.pretrain(other)
    before = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert "checkpoint-2" in before and "metrics.csv" in before

    typed = C.load_config(preset="smoke", overrides=[f"train.output_dir={tmp_path / 'exp #2'}"])
    assert typed.train.output_dir == str(tmp_path / "exp #2")

    mine = make_cfg(tmp_path / "exp", steps=2)
    mine.method.name = "clip"
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'exp'} holds another run \(method.name: folder has 'ours', "
                                          r"this run 'clip'\); refusing to start over"):
        T.pretrain(mine, resume=False)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == before
    assert yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())["method"]["name"] == "ours"


@pytest.mark.parametrize("change, what", [("seed", "train.seed: folder has 0, this run 5"),
                                          ("preset", "preset: folder has 'default', this run 'smoke'")])
def test_another_seed_or_preset_is_another_run(doubles, tmp_path, change, what):
    T.pretrain(make_cfg(tmp_path / "run", steps=2))
    mine = make_cfg(tmp_path / "run", steps=2, seed=5 if change == "seed" else 0)
    if change == "preset":
        mine.preset = "smoke"
    with pytest.raises(ConfigError, match=what):
        T.pretrain(mine, resume=False)


def test_no_resume_refuses_files_without_a_run_config(doubles, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("precious\n")
    with pytest.raises(ConfigError, match=r"holds files but no config.yaml \(results.csv\)"):
        T.pretrain(make_cfg(tmp_path / "run", steps=2), resume=False)
    assert (tmp_path / "run" / "results.csv").read_text() == "precious\n"


def test_no_resume_still_starts_the_same_run_over(doubles, tmp_path):
    """Same preset, method, dataset and seed: this run's folder, started over with another lr."""
    T.pretrain(make_cfg(tmp_path / "run", steps=4))
    T.pretrain(make_cfg(tmp_path / "run", steps=2, lr=0.01), resume=False)
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-[0-9]*"))] == ["checkpoint-2"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.01


def test_compare_bookkeeping_is_not_another_run_and_its_cache_replaces_its_own(doubles, tmp_path):
    """``pretrain_cached`` writes its key and split inputs before training (a fresh folder is
    still this run's), and replaces a run of other inputs in the folder its key file marks."""
    run = tmp_path / "run"
    (run / "inputs").mkdir(parents=True)
    (run / "cache_key.json").write_text("{}")
    T.pretrain(make_cfg(run, steps=2), resume=False)
    other = make_cfg(run, steps=2)
    other.method.name = "clip"
    with pytest.raises(ConfigError, match="holds another run"):
        T.pretrain(other, resume=False)
    T.pretrain(other, resume=False, replace_run=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == "clip"


def test_cli_no_resume_names_the_folder_and_exits_2(doubles, tmp_path, capsys):
    T.pretrain(make_cfg(tmp_path / "exp", steps=2))
    code = pretrain_main(["--preset", "smoke", "--method", "clip", "--no-resume", f"train.output_dir={tmp_path / 'exp'}"])
    assert code == 2
    assert f"{tmp_path / 'exp'} holds another run" in capsys.readouterr().err
    assert (tmp_path / "exp" / "checkpoint-2").is_dir()


# ---------------------------------------------------------------------------------------
# item 10: every float setting is finite


@pytest.mark.parametrize("override", ["train.lr=inf", "train.weight_decay=nan", "method.contrastive_weight=nan",
                                      "train.clip_grad_norm=-inf", "train.betas=0.9,nan", "model.image_mean=0.5,inf,0.5"])
def test_non_finite_overrides_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"<overrides>: {key}(\[\d\])? = -?(inf|nan); expected a finite number"):
        _cfg(override)


def test_non_finite_yaml_values_are_refused_naming_the_file_and_key(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("method:\n  contrastive_weight: .nan\n")
    with pytest.raises(ConfigError, match=rf"{path}: method.contrastive_weight = nan; expected a finite number"):
        C.load_config(path, preset="smoke")
    path.write_text("train:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=rf"{path}: train.lr = inf; expected a finite number"):
        C.load_config(path, preset="smoke")
    with pytest.raises(ConfigError, match=r"train.lr = inf; expected a finite number"):
        C.load_config(preset="smoke", overrides={"train.lr": float("inf")})
