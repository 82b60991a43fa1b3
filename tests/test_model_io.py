"""Pretrained parts and checkpoints: a local HF text encoder, an EVA teacher, loud load errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from doubles import CLIP, CLIP_TEXTS as TEXTS, CLIP_TINY_PLAIN as TINY
from fundus_lab.data.tokenizer import train_tokenizer
from fundus_lab.models import CheckpointError, MethodConfig, ModelConfig, build_model, load_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 2, vocab_size=150)


def test_text_encoder_from_a_local_hf_checkpoint(tmp_path, tokenizer):
    ckpt = tmp_path / "bert"
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=40))
    bert.save_pretrained(str(ckpt))  # safetensors
    tokenizer.save_pretrained(str(ckpt))
    model = build_model(ModelConfig(**TINY, text_pretrained=str(ckpt)), MethodConfig(**CLIP))
    assert model.text_encoder.width == 24  # the checkpoint's width wins over text_width
    theirs = bert.state_dict()
    ours = model.text_encoder.transformer.state_dict()
    assert set(ours) <= set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.tokenizer("normal fundus")["input_ids"] == tokenizer("normal fundus")["input_ids"]
    # the saved model no longer needs the original checkpoint directory
    model.eval().save_pretrained(tmp_path / "saved")
    for f in ckpt.iterdir():
        f.unlink()
    loaded = load_model(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))


def test_text_pretrained_without_safetensors_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).to_json_file(str(tmp_path / "bert" / "config.json"))
    with pytest.raises(FileNotFoundError, match="text_pretrained.*safetensors"):
        build_model(ModelConfig(**TINY, text_pretrained=str(tmp_path / "bert")), MethodConfig(**CLIP), train_tokenizer(TEXTS))


def test_eva_teacher_is_a_frozen_clip_image_encoder(tmp_path, tokenizer):
    torch.manual_seed(0)
    clip = build_model(ModelConfig(**TINY), MethodConfig(**CLIP), tokenizer)
    clip.save_pretrained(tmp_path / "clip")
    eva_cfg = MethodConfig(name="eva", image_gen_target="teacher", mim_masking="block", caption_weight=0.0,
                           cross_attention=False, mask_ratio=0.5, teacher_checkpoint=str(tmp_path / "clip"))
    eva = build_model(ModelConfig(**TINY), eva_cfg, tokenizer)
    want = clip.image_encoder.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in eva.teacher.state_dict().items())
    assert not any(p.requires_grad for p in eva.teacher.parameters())
    # the teacher's features are the regression target of the masked patches
    assert eva.image_decoder.out_features == 32
    eva.train()
    assert not eva.teacher.training  # no drop-path / dropout in the frozen teacher
    eva(dict(image=torch.rand(2, 3, 32, 32), text=TEXTS[:2]))["loss"].backward()
    assert all(p.grad is None for p in eva.teacher.parameters())
    # saved and reloaded without the teacher's directory
    eva.save_pretrained(tmp_path / "eva")
    for f in (tmp_path / "clip").rglob("*"):
        if f.is_file():
            f.unlink()
    loaded = load_model(tmp_path / "eva")
    assert all(torch.equal(v, want[k]) for k, v in loaded.teacher.state_dict().items())


def test_loading_a_bad_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    model = build_model(ModelConfig(**TINY), MethodConfig(**CLIP), tokenizer)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")

    missing = dict(state)
    missing.pop("logit_scale")
    save_file(missing, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \['logit_scale'\]"):
        load_model(ckpt)

    wrong = dict(state)
    wrong["image_proj.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(weights))
    with pytest.raises(CheckpointError, match=r"shape mismatch image_proj.weight: file \[3, 3\] vs model \[16, 32\]"):
        load_model(ckpt)

    extra = dict(state, surplus=torch.zeros(1))
    save_file(extra, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['surplus'\]"):
        load_model(ckpt)

    save_file(state, str(weights))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["method"]["contrastive_wieght"] = 1.0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="contrastive_wieght"):
        load_model(ckpt)

    (ckpt / "config.json").write_text('{"model": {')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(ckpt)

    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        load_model(ckpt)

    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing; is this a directory written by save_pretrained"):
        load_model(ckpt)


def test_without_a_tokenizer_one_is_learnt_from_the_knowledge_base():
    pytest.importorskip("fundus_lab.knowledge")
    model = build_model(ModelConfig(**TINY, vocab_size=500), MethodConfig(**CLIP))
    assert len(model.tokenizer) <= 500
    assert model.tokenizer.convert_ids_to_tokens(model.tokenizer("glaucoma")["input_ids"]) == ["[CLS]", "glaucoma", "[SEP]"]
    assert model.text_encoder.config.vocab_size == len(model.tokenizer)
