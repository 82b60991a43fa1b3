"""Outside models: tiny random open_clip and Hugging Face CLIP models saved, loaded through
fundus_lab.models.external, their features equal the source library's, and the evaluation
protocols accept them."""

import json

import numpy as np
import pytest
import torch

from doubles import OPEN_CLIP_CFG, OUTSIDE_TEXTS as TEXTS, outside_features as _features, outside_normalise as _normalise
from fundus_lab.models.external import ExternalModelError, detect_kind, is_external, load_external
from fundus_lab.models.external.hf_clip import CLIPTextEncoder
from fundus_lab.models.external.safety import read_state_dict
from fundus_lab.models.external.wrapper import OPENAI_MEAN, OPENAI_STD

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (pip install 'fundus_lab[external]')")


def test_open_clip_features_equal_the_source(open_clip_file):
    src, folder = open_clip_file
    assert detect_kind(folder) == "open_clip"
    model = load_external(folder / "open_clip_model.safetensors")
    assert model.image_size == 32 and {"text_embedding", "attention_maps", "patch_embedding"} <= model.capabilities
    from fundus_lab.widgets import model_image_size

    assert model_image_size(model) == 32
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected_img = torch.nn.functional.normalize(src.encode_image(_normalise(x)), dim=-1)
        expected_txt = torch.nn.functional.normalize(src.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(TEXTS)), dim=-1)
        torch.testing.assert_close(model.encode_image(x), expected_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(TEXTS), expected_txt, atol=1e-5, rtol=0)
        assert model.encode_image(torch.rand(2, 3, 48, 64)).shape == (2, 16)  # resized + cropped
        maps = model.attention_maps(x)
        assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 17))
        assert model.encode_patches(x).shape == (3, 16, 16)
    assert float(model.logit_scale.detach()) == pytest.approx(float(src.logit_scale.detach()))


def test_open_clip_pt_file_with_named_config(open_clip_file, tmp_path):
    src, _ = open_clip_file
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "epoch_3.pt")
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny.json").write_text(json.dumps(OPEN_CLIP_CFG))
    with pytest.raises(ExternalModelError, match="no open_clip model config"):
        load_external(tmp_path / "epoch_3.pt")
    model = load_external(tmp_path / "epoch_3.pt", model_config=tmp_path / "cfgs" / "tiny.json")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # no preprocess_cfg: OpenAI mean/std
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        expected = src.encode_image(_normalise(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), normalize=True)
        torch.testing.assert_close(model.encode_image(x), expected, atol=1e-5, rtol=0)


def test_pickled_code_is_refused(tmp_path):
    import argparse

    torch.save({"w": torch.zeros(1), "odd": argparse.Namespace(x=1)}, tmp_path / "bad.pt")  # arbitrary class
    with pytest.raises(ExternalModelError, match="weights_only=True"):
        read_state_dict(tmp_path / "bad.pt")


def test_hf_clip_features_equal_the_source(hf_folder):
    src, tok, folder = hf_folder
    assert detect_kind(folder) == "hf"
    model = load_external(folder)
    x = torch.rand(2, 3, 32, 32)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = torch.nn.functional.normalize(_features(src.get_image_features(pixel_values=_normalise(x))), dim=-1)
        txt = _features(src.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        torch.testing.assert_close(model.encode_image(x), img, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(TEXTS), torch.nn.functional.normalize(txt, dim=-1), atol=1e-5, rtol=0)
        maps = model.attention_maps(x)
        assert len(maps) == 2 and maps[-1].shape == (2, 2, 17, 17)
        torch.testing.assert_close(maps[-1].sum(-1), torch.ones(2, 2, 17))
        assert model.encode_patches(x).shape == (2, 16, 16)


def test_hf_bin_only_folder_loads_with_weights_only(hf_folder, tmp_path):
    src, tok, _ = hf_folder
    src.config.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_external(tmp_path, kind="hf")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        img = _features(src.get_image_features(pixel_values=_normalise(x, OPENAI_MEAN, OPENAI_STD)))
        torch.testing.assert_close(model.encode_image(x), torch.nn.functional.normalize(img, dim=-1), atol=1e-5, rtol=0)


def test_clip_text_tower_from_a_clip_folder(hf_folder):
    src, tok, folder = hf_folder
    enc = CLIPTextEncoder.from_pretrained(folder)
    assert enc.width == 32 and enc.config.hidden_size == 32
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc(batch["input_ids"], batch["attention_mask"])
        ref = src.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out["cls"], ref.pooler_output, atol=1e-6, rtol=0)
    assert out["tokens"].shape[:2] == batch["input_ids"].shape


def test_detection_errors_name_the_problem(tmp_path):
    with pytest.raises(ExternalModelError, match="does not exist"):
        detect_kind(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExternalModelError, match="neither a Hugging Face CLIP folder"):
        detect_kind(tmp_path)
    with pytest.raises(ExternalModelError, match="model_type is 'bert'"):
        load_external(tmp_path, kind="hf")
    with pytest.raises(ExternalModelError, match="unknown outside model kind 'open-clip'; did you mean 'open_clip'"):
        load_external(tmp_path, kind="open-clip")


@pytest.fixture(scope="module")
def synth_datasets(tmp_path_factory):
    from fundus_lab.data import open_dataset, synth

    manifest = synth.generate(tmp_path_factory.mktemp("fives"), task="fives", n=48, seed=0, image_size=64, workers=1)
    return (open_dataset(manifest, split="train", image_size=64), open_dataset(manifest, split="test", image_size=64))


@pytest.mark.parametrize("which", ["open_clip", "hf"])
def test_eval_protocols_accept_external_models(which, open_clip_file, hf_folder, synth_datasets):
    from fundus_lab import eval as fle
    from fundus_lab.eval import features

    features.clear_cache()
    model = load_external(open_clip_file[1]) if which == "open_clip" else load_external(hf_folder[2])
    train, test = synth_datasets
    zs = fle.zero_shot(model, test)
    assert zs["probs"].shape == (len(test), len(test.classes))
    np.testing.assert_allclose(zs["probs"].sum(1), 1.0, rtol=1e-5)
    fs = fle.few_shot(model, train, test, shots=(1,), seeds=1, head_steps=5)
    assert fs["shots"][1]["probe"]["n_seeds"] == 1 and fs["shots"][1]["prompt_head"] is not None
    ft = fle.fine_tune(model, train, train, test, epochs=1, batch_size=8)  # val = train: only the plumbing is tested
    assert ft["probs"].shape == (len(test), len(test.classes))


def test_clip_text_tower_serves_a_fundus_model(hf_folder, tmp_path):
    """What model.text_pretrained=<CLIP folder> needs once the model builds CLIPTextEncoder for a
    CLIPTextConfig: the tower's contract (config.hidden_size, width, forward) fits FundusVLM."""
    from fundus_lab.models import MethodConfig, ModelConfig, build_model

    _, tok, folder = hf_folder
    model = build_model(ModelConfig(img_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2,
                                    text_width=32, text_depth=1, text_heads=2, text_max_length=24, embed_dim=16),
                        MethodConfig(name="clip", image_gen_weight=0.0, caption_weight=0.0, cross_attention=False), tok)
    model.text_encoder = CLIPTextEncoder.from_pretrained(folder)
    z = model.encode_text(TEXTS)
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(z[0], z[1])  # pooled at the end token, not the constant first token


def test_is_external_tells_fundus_checkpoints_apart(open_clip_file, hf_folder, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "fundus_lab", "model": {}, "method": {}}))
    assert not is_external(tmp_path) and not is_external(tmp_path / "missing")
    assert is_external(open_clip_file[1]) and is_external(hf_folder[2])


def test_fl_load_model_reads_outside_checkpoints(open_clip_file, hf_folder):
    """fl.load_model dispatches an open_clip file and a Hugging Face CLIP folder to load_external."""
    import fundus_lab as fl

    x = torch.rand(2, 3, 32, 32)
    for path in (hf_folder[2], open_clip_file[1]):
        model = fl.load_model(path)
        assert "text_embedding" in model.capabilities
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(x), load_external(path).encode_image(x))
