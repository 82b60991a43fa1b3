"""Issue 16 item 1: no checkpoint runs code or reaches a model hub, through any entry point.

The malicious folder is the issue's: an open_clip checkpoint whose ``text_cfg`` names a
tokenizer folder ``<dir>/tok`` with ``tokenizer_kwargs: {trust_remote_code: true}``, and that
folder's ``tokenizer_config.json`` has an ``auto_map`` pointing at ``evil.py``, which writes a
marker file when imported. Each entry point (``fl.load_model``, ``compare --external``,
``predict`` with it as a classifier's backbone, resume from it as ``checkpoint-N/``) must raise
a :class:`CheckpointError` and leave no marker.
"""

from __future__ import annotations

import json

import pytest

import fundus_lab as fl
from fundus_lab import config as C
from fundus_lab.checkpoint import CheckpointError

pytest.importorskip("open_clip", reason="open_clip not installed (pip install 'fundus_lab[external]')")

from doubles import evil_open_clip, save_tiny_open_clip  # noqa: E402


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "checkpoint code ran"


def test_load_model_refuses_checkpoint_code(tmp_path, marker):
    folder = evil_open_clip(tmp_path / "evil", marker)
    with pytest.raises(CheckpointError, match=r"open_clip_config.json: text_cfg.tokenizer_kwargs \['trust_remote_code'\] refused"):
        fl.load_model(folder)


@pytest.mark.parametrize("case, text_cfg, match", [
    ("auto_map without kwargs", {"tokenizer_kwargs": None}, r"tok/tokenizer_config.json: has an 'auto_map'"),
    ("relative name, auto_map", {"hf_tokenizer_name": "tok", "tokenizer_kwargs": None}, r"tokenizer_config.json: has an 'auto_map'"),
    ("hub name", {"hf_tokenizer_name": "bert-base-uncased", "tokenizer_kwargs": None}, r"hf_tokenizer_name='bert-base-uncased' is not a folder inside"),
    ("hf-hub name", {"hf_tokenizer_name": "hf-hub:timm/ViT-B-16-SigLIP", "tokenizer_kwargs": None}, r"is not a folder inside"),
    (".. escape", {"hf_tokenizer_name": "../elsewhere", "tokenizer_kwargs": None}, r"hf_tokenizer_name='../elsewhere' lies outside the checkpoint folder"),
    ("absolute path elsewhere", {"hf_tokenizer_name": "/tmp", "tokenizer_kwargs": None}, r"hf_tokenizer_name='/tmp' lies outside"),
    ("text tower from a hub", {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": None, "tokenizer_kwargs": None}, r"hf_model_name='bert-base-uncased' is not a folder inside"),
    ("cache_dir kwarg", {"tokenizer_kwargs": {"cache_dir": "/tmp/x"}}, r"tokenizer_kwargs \['cache_dir'\] refused"),
    ("kwargs of the simple tokenizer", {"hf_tokenizer_name": None, "tokenizer_kwargs": {"bpe_path": "/etc/passwd"}}, r"tokenizer_kwargs \['bpe_path'\] refused"),
])
def test_every_named_folder_and_argument_is_checked(tmp_path, marker, case, text_cfg, match):
    (tmp_path / "elsewhere").mkdir()
    folder = evil_open_clip(tmp_path / "evil", marker, **text_cfg)
    with pytest.raises(CheckpointError, match=match):
        fl.load_model(folder)


def test_timm_hub_names_are_refused(tmp_path, marker):
    folder = evil_open_clip(tmp_path / "evil", marker, hf_tokenizer_name=None, tokenizer_kwargs=None)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "hf-hub:someone/model"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision_cfg.timm_model_name='hf-hub:someone/model'"):
        fl.load_model(folder)


def test_a_clean_tokenizer_folder_inside_the_checkpoint_still_loads(tmp_path):
    """The rule refuses only what it must: a relative tokenizer folder with no code loads,
    with the tokenizer's own options (``clean``) honoured."""
    from fundus_lab.data.tokenizer import train_tokenizer

    folder = tmp_path / "ok"
    folder.mkdir()
    save_tiny_open_clip(folder)
    train_tokenizer(["a fundus photograph", "glaucoma"], vocab_size=60, out_dir=folder / "tok")
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_tokenizer_name="tok", tokenizer_kwargs={"clean": "whitespace"})
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    model = fl.load_model(folder)
    assert model.encode_text(["glaucoma"]).shape == (1, 16)


def test_compare_external_refuses_checkpoint_code(tmp_path, marker, monkeypatch):
    import fundus_lab.train
    from fundus_lab.experiment import Run, compare
    from doubles import EXTERNAL_COMPARE_TINY as TINY

    folder = evil_open_clip(tmp_path / "evil", marker)

    def refuse(*args, **kwargs):
        raise AssertionError("pretraining started before the outside model was checked")

    monkeypatch.setattr(fundus_lab.train, "pretrain", refuse)
    run = Run("smoke", tmp_path / "run", tmp_path / "data", TINY)
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        compare(run, [], ["zero_shot"], references=[], external={"evil": folder})


def test_predict_refuses_a_backbone_with_checkpoint_code(tmp_path, marker, capsys):
    from PIL import Image
    from safetensors.torch import save_file
    import torch

    from fundus_lab.cli import predict_main
    from fundus_lab.predict import FORMAT, load_classifier

    clf = tmp_path / "classifier"
    evil_open_clip(clf / "backbone", marker)
    (clf / "classifier.json").write_text(json.dumps({
        "format": FORMAT, "classes": ["a", "b"], "task": "multiclass", "width": 32,
        "preprocessing": {"image_size": 32}}))
    save_file({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, str(clf / "head.safetensors"))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_classifier(clf)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        predict_main([str(clf), str(image)])


def test_resume_refuses_an_outside_model_as_checkpoint(tmp_path, marker):
    from fundus_lab.checkpoint import STATE_FILE
    from fundus_lab.train import pretrain

    run_dir = tmp_path / "run"
    cfg = C.load_config(preset="smoke", method="clip", overrides=[
        f"train.output_dir={run_dir}", f"data.synth_root={tmp_path / 'data'}"])
    run_dir.mkdir()
    C.save_config(cfg, run_dir / "config.yaml")  # the resume check itself would pass
    last = evil_open_clip(run_dir / "checkpoint-1", marker)
    (last / STATE_FILE).write_text(json.dumps({"format_version": 1, "step": 1, "trainer": {}}))
    with pytest.raises(CheckpointError, match=r"checkpoint-1: holds an outside model .* refusing to resume from it"):
        pretrain(cfg)
    assert not (tmp_path / "data").exists()  # refused before any data was written


@pytest.mark.parametrize("config, match", [
    ({"architecture": "hf-hub:someone/vit", "model_args": {}}, "hub names"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"pretrained_cfg_overlay": {"hf_hub_id": "x/y"}}},
     "never tells timm where to fetch"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"checkpoint_path": "/etc/x.pth"}},
     "never tells timm where to fetch"),
])
def test_timm_image_folder_names_nothing_to_fetch(tmp_path, config, match):
    """A timm image-weights folder (``--external NAME=PATH`` for timm / RETFound) is read from
    its own files: its config.json may not name a hub model or weights elsewhere."""
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=match):
        fl.load_model(folder)
