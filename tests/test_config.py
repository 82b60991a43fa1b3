"""Configs: YAML layers onto dataclasses, typed overrides, and loud errors for typos."""

import pytest

from fundus_lab import config as C
from fundus_lab.schema import to_dict


@pytest.fixture()
def config_dir(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    (tmp_path / "methods").mkdir()
    (tmp_path / "presets" / "tiny.yaml").write_text("train:\n  steps: 7\n  lr: 0.01\ndata:\n  image_size: 64\n")
    (tmp_path / "methods" / "clip.yaml").write_text("method:\n  name: clip\ntrain:\n  lr: 0.002\n")
    monkeypatch.setattr(C, "CONFIG_DIR", tmp_path)
    return tmp_path


def test_layers_apply_in_order(config_dir):
    cfg = C.load_config(preset="tiny", method="clip", overrides=["train.steps=3", "data.augment=false"])
    assert cfg.preset == "tiny"
    assert cfg.method.name == "clip"
    assert cfg.train.steps == 3  # override beats preset
    assert cfg.train.lr == pytest.approx(0.002)  # method beats preset
    assert cfg.data.image_size == 64  # preset beats default
    assert cfg.data.augment is False


def test_user_file_names_preset_and_method(config_dir, tmp_path):
    user = tmp_path / "run.yaml"
    user.write_text("preset: tiny\nmethod: clip\ntrain:\n  seed: 5\n")
    cfg = C.load_config(user)
    assert (cfg.preset, cfg.method.name, cfg.train.seed, cfg.train.steps) == ("tiny", "clip", 5, 7)


def test_notebook_style_dict_overrides(config_dir):
    cfg = C.load_config(preset="tiny", overrides={"train.batch_size": 4, "train.betas": [0.8, 0.9]})
    assert cfg.train.batch_size == 4
    assert cfg.train.betas == (0.8, 0.9)


def test_unknown_key_names_key_and_close_match(config_dir):
    with pytest.raises(C.ConfigError, match=r"train\.stesp.*did you mean 'train\.steps'"):
        C.load_config(preset="tiny", overrides=["train.stesp=3"])


def test_key_in_wrong_section_is_pointed_at(config_dir):
    with pytest.raises(C.ConfigError, match=r"data\.lr.*'train\.lr'"):
        C.load_config(preset="tiny", overrides=["data.lr=3"])


def test_unknown_key_in_file_names_the_file(config_dir):
    (config_dir / "methods" / "bad.yaml").write_text("method:\n  name: bad\ntrian:\n  steps: 1\n")
    with pytest.raises(C.ConfigError, match=r"bad\.yaml.*'trian'.*'train'"):
        C.load_config(preset="tiny", method="bad")


def test_wrong_type_is_an_error(config_dir):
    with pytest.raises(C.ConfigError, match=r"train\.steps = 'many'"):
        C.load_config(preset="tiny", overrides=["train.steps=many"])
    with pytest.raises(C.ConfigError, match=r"train\.steps = '2\.5'"):
        C.load_config(preset="tiny", overrides=["train.steps=2.5"])
    with pytest.raises(C.ConfigError, match="expected one of"):
        C.load_config(preset="tiny", overrides=["train.mixed_precision=fp8"])


def test_unknown_preset_or_method_lists_choices(config_dir):
    with pytest.raises(C.ConfigError, match="did you mean tiny"):
        C.load_config(preset="tiyn")
    with pytest.raises(C.ConfigError, match="no method named 'clipp'.*clip"):
        C.load_config(preset="tiny", method="clipp")


def test_malformed_override():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.overrides_to_dict(["train.steps"])


def test_round_trip_through_yaml(config_dir, tmp_path):
    cfg = C.load_config(preset="tiny", method="clip")
    C.save_config(cfg, tmp_path / "saved.yaml")
    data = C.read_yaml(tmp_path / "saved.yaml")
    assert C.from_dict(C.Config, data, "saved.yaml") == cfg


def test_shipped_presets_and_methods_load():
    """Every preset x method shipped in configs/ composes without error."""
    presets = sorted(p.stem for p in (C.CONFIG_DIR / "presets").glob("*.yaml"))
    methods = C.available_methods()
    if not presets or not methods:
        pytest.skip("configs/ has no presets or methods yet")
    for preset in presets:
        for method in methods:
            cfg = C.load_config(preset=preset, method=method)
            assert cfg.method.name == method


def test_config_is_a_leaf_module():
    """`import fundus_lab.config` loads no other part of the package but the ground it stands on
    (the schema coercer and the rule for names) and no torch."""
    import subprocess
    import sys

    code = ("import sys, fundus_lab.config; "
            "print(sorted(m for m in sys.modules if m.startswith('fundus_lab'))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['fundus_lab', 'fundus_lab.config', 'fundus_lab.names', 'fundus_lab.schema']"
    assert out[1] == "False"


def test_resolve_config_layers_method_then_overrides_and_keeps_the_budget(config_dir, tmp_path):
    (config_dir / "methods" / "greedy.yaml").write_text("method:\n  mask_ratio: 0.9\ntrain:\n  steps: 99\n  lr: 0.1\n")
    cfg = C.resolve_config("tiny", "greedy", ["method.mask_ratio=0.5", "eval.pretrain_seeds=[3,4]"], run_dir=tmp_path)
    assert cfg.method.mask_ratio == 0.5  # an override beats the method file (Table 1 used to drop it)
    assert cfg.train.steps == 7  # the budget is the preset's whatever the method file says
    assert cfg.train.lr == pytest.approx(0.1)  # other train keys of a method stay
    assert cfg.train.seed == 3 and cfg.train.output_dir == str(tmp_path / "pretrain" / "greedy" / "seed3")
    assert C.resolve_config("tiny", "greedy", ["train.steps=5"]).train.steps == 5
    with pytest.raises(C.ConfigError, match="pretrain_seeds"):
        C.resolve_config("tiny", overrides=["eval.pretrain_seeds=[]"])


def test_an_override_reaches_every_notebook_and_table1_identically(tmp_path):
    """Each notebook's context and Table 1's Run resolve the same config for every method."""
    from fundus_lab.experiment import Run
    from fundus_lab.reproduce import list_notebooks

    over = ["method.mask_ratio=0.5", "eval.seeds=2"]
    table1 = Run("smoke", tmp_path / "run", tmp_path / "data", over)
    for nb in list_notebooks():
        ctx = Run(notebook=nb.stem, preset="smoke", run_dir=tmp_path / "run", data_root=tmp_path / "data",
                  overrides=over)
        for method in ["clip", "ours", "eva", "random-init", None]:
            cfg = ctx.config(method)
            assert cfg == table1.config(method), (nb.stem, method)
            assert cfg.eval.seeds == 2
            if method is not None:
                assert cfg.method.mask_ratio == 0.5, (nb.stem, method)


def test_log_with_defaults_to_tensorboard_and_rejects_unknown_trackers(config_dir):
    assert C.TrainConfig().log_with == "tensorboard"
    assert C.load_config(preset="tiny").train.log_with == "tensorboard"
    # `none` typed on the command line parses as null: it still means no tracker
    assert C.load_config(preset="tiny", overrides=["train.log_with=none"]).train.log_with == "none"
    with pytest.raises(C.ConfigError, match=r"train.log_with = 'comet'; expected one of \['tensorboard', 'wandb'"):
        C.load_config(preset="tiny", overrides=["train.log_with=comet"])


def test_deprecated_tensorboard_key_maps_onto_log_with(config_dir, tmp_path):
    assert C.TrainConfig(tensorboard=False).log_with == "none"
    assert C.TrainConfig(tensorboard=True).log_with == "tensorboard"
    assert C.TrainConfig(tensorboard=True, log_with="wandb").log_with == "wandb"  # log_with set: it wins
    assert C.TrainConfig(tensorboard=False, log_with="wandb").log_with == "none"
    # the config.yaml of a run saved before log_with existed
    old = C.from_dict(C.Config, {"train": {"tensorboard": False, "steps": 4}}, "old/config.yaml")
    assert old.train.log_with == "none" and old.train.tensorboard is None
    assert to_dict(old)["train"]["log_with"] == "none"
    # a later layer's alias beats an earlier layer's log_with, and the other way round
    (config_dir / "presets" / "quiet.yaml").write_text("train:\n  log_with: none\n")
    assert C.load_config(preset="quiet", overrides=["train.tensorboard=true"]).train.log_with == "tensorboard"
    assert C.load_config(preset="tiny", overrides=["train.tensorboard=false"]).train.log_with == "none"
    user = tmp_path / "old.yaml"
    user.write_text("train:\n  tensorboard: false\n")
    assert C.load_config(user, preset="tiny", overrides=["train.log_with=tensorboard"]).train.log_with == "tensorboard"
    with pytest.raises(C.ConfigError, match="train.tensorboard"):
        C.load_config(preset="tiny", overrides=["train.tensorboard=maybe"])
