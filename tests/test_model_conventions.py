"""The field's model conventions (issue 19): ``fl.create_model_and_transforms`` and
``fl.get_tokenizer`` for our checkpoints and outside ones, ``encode_text`` of one string,
outside models fed through their own library's preprocessing, ``FundusVLM.from_pretrained``
and the model card in every checkpoint."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fundus_lab as fl
from fundus_lab.models import FundusVLM
from fundus_lab.models.card import write_model_card
from doubles import CLIP_TEXTS as TEXTS, CLIP_TINY as TINY
from doubles import MEAN, STD, outside_features as _features

RNG = np.random.default_rng(0)
PHOTO = Image.fromarray((RNG.random((40, 52, 3)) * 255).astype("uint8"))  # not the model's size: resized by each


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("ours") / "checkpoint")


def test_our_checkpoint_through_the_open_clip_calls(model, saved):
    loaded, preprocess = fl.create_model_and_transforms(saved)
    image = preprocess(PHOTO)
    assert image.shape == (3, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    tokenizer = fl.get_tokenizer(saved)
    assert tokenizer(TEXTS)["input_ids"] == model.tokenizer(TEXTS)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image[None]), model.encode_image(image[None]), atol=1e-6, rtol=0)
        one = loaded.encode_text(TEXTS[0])
        assert one.shape == (1, TINY["embed_dim"])
        torch.testing.assert_close(one, loaded.encode_text([TEXTS[0]]), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        fl.create_model_and_transforms(saved.parent / "nowhere")


def test_from_pretrained_round_trip_and_a_card_that_says_what_the_folder_is(model, saved, tmp_path):
    again = FundusVLM.from_pretrained(saved)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x), atol=0, rtol=0)
    card = (saved / "README.md").read_text()
    assert "# fundus_lab checkpoint: `clip`" in card and "`contrastive_weight`: 1.0" in card
    assert "`vision_width`: 32" in card and "No Table 1 yet" in card and "not saved inside a training run" in card
    with pytest.raises(Exception, match="no config.json"):
        FundusVLM.from_pretrained(tmp_path)


def test_card_in_a_run_gives_data_budget_and_its_table_1_row(model, tmp_path):
    from fundus_lab.experiment.table import _write_model_cards

    run = tmp_path / "pretrain" / "clip" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "preset": "smoke", "data": {"dataset": "synth-pretrain", "image_size": 32, "text_source": "reports"},
        "train": {"steps": 40, "batch_size": 8, "lr": 0.001, "seed": 0}}))
    checkpoint = model.save_pretrained(run / "checkpoint-40")
    (run / "checkpoint-last").symlink_to("checkpoint-40")
    card = (checkpoint / "README.md").read_text()
    assert "`dataset`: synth-pretrain" in card and "`steps`: 40" in card and "preset: smoke" in card
    cell = {"mean": 0.8123, "std": 0.0, "n": 5, "ci": [0.79, 0.83]}
    results = {"clip": {"zero_shot": [{"run_dir": str(run)}]}}
    _write_model_cards(results, [{"method": "clip", "zero_shot_in_domain": cell}],
                       [("zero_shot_in_domain", "Zero-shot, in-domain")], tmp_path / "table1.md")
    card = (checkpoint / "README.md").read_text()
    assert "| Zero-shot, in-domain | 81.2 [79.0, 83.0] |" in card and str(tmp_path / "table1.md") in card
    assert write_model_card(checkpoint).read_text().count("No Table 1 yet") == 1  # rewritable without a table


def test_open_clip_model_is_fed_through_open_clip_s_own_transform(open_clip_file):
    import open_clip

    src, folder = open_clip_file
    model, preprocess = fl.create_model_and_transforms(folder)
    theirs = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)(PHOTO)[None]
    pixels = torch.from_numpy(np.array(PHOTO)).permute(2, 0, 1)[None].float() / 255  # as a dataset yields it
    with torch.no_grad():
        expected = torch.nn.functional.normalize(src.encode_image(theirs), dim=-1)
        torch.testing.assert_close(model.encode_image(preprocess(PHOTO)[None]), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels), expected, atol=1e-6, rtol=0)  # what evaluation calls
        tokens = fl.get_tokenizer(folder)(TEXTS[:1])
        text = torch.nn.functional.normalize(src.encode_text(tokens), dim=-1)
        torch.testing.assert_close(model.encode_text(TEXTS[0]), text, atol=1e-6, rtol=0)


def test_hf_clip_model_is_fed_through_its_image_processor(hf_folder):
    from transformers import CLIPImageProcessor

    src, tok, folder = hf_folder
    model, preprocess = fl.create_model_and_transforms(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=list(MEAN), image_std=list(STD))
    theirs = processor(images=PHOTO, return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(np.array(PHOTO)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = torch.nn.functional.normalize(_features(src.get_image_features(pixel_values=theirs)), dim=-1)
        torch.testing.assert_close(model.encode_image(preprocess(PHOTO)[None]), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels), expected, atol=1e-5, rtol=0)
    assert fl.get_tokenizer(folder)(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


def test_eval_save_classifier_then_predict_end_to_end(model, saved, tmp_path, capsys):
    """`fundus-lab eval --protocol fine_tune --save-classifier DIR`, then `fundus-lab predict DIR image.png`."""
    import json

    from fundus_lab.cli import main
    from doubles import COMPARE_MODEL_TINY as MODEL_TINY

    data, classifier = tmp_path / "data", tmp_path / "classifier"
    tiny = [o for o in MODEL_TINY if o.startswith("data.")] + [
        "eval.fine_tune_epochs=1", "eval.fine_tune_seeds=1", "eval.fine_tune_batch_size=16", "eval.bootstrap=10",
        "eval.progress=false"]
    assert main(["eval", "--checkpoint", str(saved), "--protocol", "zero_shot", "--dataset", "synth-aptos",
                 "--save-classifier", str(classifier)]) == 2  # only fine-tuning makes a classifier
    assert "needs --protocol fine_tune" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(saved), "--protocol", "fine_tune", "--dataset", "synth-aptos",
                 "--data-root", str(data), "--preset", "smoke", "--out", str(tmp_path / "eval"),
                 "--save-classifier", str(classifier), *tiny]) == 0
    assert f"classifier: {classifier}" in capsys.readouterr().out
    info = json.loads((classifier / "classifier.json").read_text())
    assert info["task"] == "ordinal" and info["preprocessing"]["image_size"] == 32 and info["extra"]["seed"] == 0
    image = next(p for p in sorted((data / "synth-aptos").rglob("*.png")))
    assert main(["predict", str(classifier), str(image), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image"] == str(image) and list(line["probabilities"]) and set(line["probabilities"]) == set(info["classes"])
    assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
