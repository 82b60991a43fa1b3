"""Image-only outside models (issue 19): timm and RETFound ViT weights load as a model with
timm's features and no text tower, and `--external NAME=PATH` makes one a row of Table 1
(few-shot, linear probe and fine-tune filled, zero-shot n/a)."""

import csv
import math

import pytest
import timm
import torch

import fundus_lab as fl
from fundus_lab.models.external import detect_kind
from fundus_lab.models.external.timm_image import TimmImageModel
from doubles import external_compare_run as _run

IMAGENET = (torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1))


def save_tiny_retfound(path, seed: int = 0):
    """A random timm ViT (width 64, one head, 32 px) saved as RETFound does: ``{"model": state_dict}``
    with a classifier head. Returns the timm model."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=64, depth=2, num_heads=1,
                            num_classes=5).eval()
    torch.save({"model": vit.state_dict()}, str(path))
    return vit


def test_retfound_weights_load_image_only_with_timm_features(tmp_path):
    vit = save_tiny_retfound(tmp_path / "retfound_tiny.pth")
    assert detect_kind(tmp_path / "retfound_tiny.pth") == "timm"
    model = fl.load_model(tmp_path / "retfound_tiny.pth")
    assert isinstance(model, TimmImageModel) and model.text_encoder is None and model.img_size == 32
    assert "text_embedding" not in model.capabilities and "fine_tune" in model.capabilities
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        theirs = vit.forward_head(vit.forward_features((x - IMAGENET[0]) / IMAGENET[1]), pre_logits=True)
        torch.testing.assert_close(model.image_features(x)["cls"], theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(x), torch.nn.functional.normalize(theirs, dim=-1), atol=1e-5, rtol=0)


def test_a_timm_hub_folder_loads_with_its_config(tmp_path):
    """What ``fl.export(format="timm")`` writes (config.json with architecture, model_args,
    pretrained_cfg) comes back as an image-only model with the exporting model's features."""
    import warnings

    from fundus_lab.export import export
    from doubles import CLIP, CLIP_TEXTS as TEXTS, CLIP_TINY as TINY
    from fundus_lab.data.tokenizer import train_tokenizer
    from fundus_lab.models import MethodConfig, ModelConfig, build_model

    torch.manual_seed(0)
    ours = build_model(ModelConfig(**TINY), MethodConfig(**CLIP), train_tokenizer(TEXTS * 2, vocab_size=150)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(ours, tmp_path, format="timm")
    assert detect_kind(tmp_path) == "timm"
    model = fl.load_model(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(x)["cls"], ours.image_features(x)["cls"], atol=1e-5, rtol=0)


@pytest.mark.slow  # evaluates four protocols on the tiny synthetic benchmark (a minute or two on a shared CPU)
def test_timm_weights_are_a_row_of_table_1_at_smoke(tmp_path):
    from fundus_lab.experiment import compare

    weights = tmp_path / "retfound_tiny.pth"
    save_tiny_retfound(weights, seed=1)
    run = _run(tmp_path, ["eval.fine_tune_epochs=1", "eval.fine_tune_seeds=1", "eval.fine_tune_batch_size=16"])
    protocols = ["zero_shot", "few_shot", "linear_probe", "fine_tune"]
    paths = compare(run, [], protocols, references=[], external={"retfound": weights})
    (row,) = list(csv.DictReader(open(paths["csv"])))
    (row2,) = list(csv.DictReader(open(paths["table2_csv"])))  # the linear probe is Table 2's
    assert row["method"] == row2["method"] == "retfound"
    assert row["zero_shot_in_domain_mean"] == "n/a" and row["zero_shot_in_domain_n"] == "0"
    for protocol in protocols[1:]:
        value = float({**row2, **row}[f"{protocol}_in_domain_mean"])
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (protocol, value)
    assert "| retfound | n/a |" in paths["md"].read_text()
