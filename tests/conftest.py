"""Fixtures shared by the test files, built from the doubles in ``tests/doubles.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from doubles import (CLASSIFIER_CLASSES, CLASSIFIER_TINY, CLIP, CLIP_TEXTS, CLIP_TINY, TEXTS, DoubleData, DoubleModel,
                     double_collate, load_double, save_tiny_hf_clip, save_tiny_open_clip)
from fundus_lab import train as T
from fundus_lab.data.tokenizer import train_tokenizer
from fundus_lab.eval.fine_tune import FineTuneClassifier
from fundus_lab.models import MethodConfig, ModelConfig, build_model
from fundus_lab.predict import save_classifier


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 2, vocab_size=200)


@pytest.fixture()
def doubles(monkeypatch):
    monkeypatch.setattr(T, "open_training_data", lambda cfg, *a, **k: DoubleData())
    monkeypatch.setattr(T, "prepare_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(T, "build_run_model", lambda cfg, tok: DoubleModel())
    monkeypatch.setattr(T, "load_run_model", load_double)
    monkeypatch.setattr(T, "collate", double_collate)


@pytest.fixture(scope="module")
def model():
    """The tiny clip model (``CLIP_TINY``) with perturbed weights, as the export tests read it."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(**CLIP_TINY), MethodConfig(**CLIP), train_tokenizer(CLIP_TEXTS * 2, vocab_size=150)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a dropped or misplaced tensor shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """A random open_clip CLIP saved as safetensors with its hub-style config beside it."""
    folder = tmp_path_factory.mktemp("open_clip")
    return save_tiny_open_clip(folder), folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers CLIPModel folder with a tokenizer and preprocessor config."""
    folder = tmp_path_factory.mktemp("hf_clip")
    return (*save_tiny_hf_clip(folder), folder)


@pytest.fixture
def saved(tmp_path):
    """A tiny fine-tuned classifier saved as ``fundus-lab predict`` reads it, and three images."""
    torch.manual_seed(0)
    mae = build_model(ModelConfig(**CLASSIFIER_TINY), MethodConfig(name="mae", contrastive_weight=0.0, caption_weight=0.0,
                                                        cross_attention=False))
    clf = FineTuneClassifier(mae, len(CLASSIFIER_CLASSES), 32).eval()
    torch.nn.init.normal_(clf.head.weight, std=0.5)
    images = []
    for i in range(3):
        rng = np.random.default_rng(i)
        path = tmp_path / f"eye{i}.png"
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
        images.append(path)
    save_classifier(clf, tmp_path / "clf", CLASSIFIER_CLASSES, "ordinal", image_size=32)
    return clf, images, tmp_path / "clf"
