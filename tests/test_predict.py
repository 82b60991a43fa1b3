"""A fine-tuned classifier saved (safetensors + class names + preprocessing) and used by
`fundus-lab predict` gives the probabilities of the classifier in memory."""

import json

import pytest
import torch

from doubles import CLASSIFIER_CLASSES as CLASSES
from fundus_lab.cli import predict_main
from fundus_lab.data.images import load_tensor
from fundus_lab.predict import ClassifierError, load_classifier, save_classifier


def test_saved_classifier_predicts_like_the_original(saved, capsys):
    clf, images, folder = saved
    info = json.loads((folder / "classifier.json").read_text())
    assert info["classes"] == CLASSES and info["preprocessing"]["image_size"] == 32
    loaded, _ = load_classifier(folder)
    with torch.no_grad():
        x = torch.stack([load_tensor(p, 32) for p in images])
        expected = torch.softmax(clf(x), -1).numpy()
        torch.testing.assert_close(torch.softmax(loaded(x), -1), torch.as_tensor(expected))
    assert predict_main([str(folder), *map(str, images), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for row, exp in zip(rows, expected):
        assert [row["probabilities"][c] for c in CLASSES] == pytest.approx(exp.tolist(), abs=1e-5)
    assert predict_main([str(folder), str(images[0]), "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].split()[0:2] == CLASSES[int(expected[0].argmax())].split()[:2]


def test_bad_inputs_are_named(saved, tmp_path, capsys):
    clf, images, folder = saved
    assert predict_main([str(folder), str(tmp_path / "missing.png")]) == 2
    assert "no such image" in capsys.readouterr().out
    with pytest.raises(ClassifierError, match="no classifier.json"):
        load_classifier(tmp_path)
    with pytest.raises(ClassifierError, match="2 class names"):
        save_classifier(clf, tmp_path / "bad", CLASSES[:2], "ordinal", image_size=32)
