"""Save a fine-tuned classifier and predict class probabilities for image files.

    out = fl.eval.fine_tune(model, train, val, test, return_model=True)
    save_classifier(out["model"], "runs/aptos-cls", test.classes, test.task, image_size=test.image_size)
    fundus-lab predict runs/aptos-cls img1.png img2.jpg        # (fundus_lab.cli.predict_main)

A classifier folder holds ``backbone/`` (the fine-tuned model, ``save_pretrained``:
safetensors + JSON), ``head.safetensors`` (the linear head) and ``classifier.json``
(class names in head order, the task, and the preprocessing: image size, field-of-view
crop, square padding; the pixel normalisation lives inside the model). Nothing is
unpickled on load.

This module owns that folder format, writer and reader together: the fine_tune protocol
(:mod:`fundus_lab.experiment.protocols`) writes it and ``fundus-lab predict`` reads it, so
the experiment layer imports it from above (a dependency, not a leaf).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fundus_lab.data.images import load_tensor
from fundus_lab.eval.features import model_device
from fundus_lab.eval.fine_tune import FineTuneClassifier
from fundus_lab.models import load_model

FORMAT = "fundus_lab-classifier"
FORMAT_VERSION = 1
TASKS = ("multiclass", "multilabel", "ordinal", "binary")
# the input sides a saved classifier may declare: every preset trains at 224 px or less; larger
# would make predict allocate [3, S, S] tensors of gigabytes for a tampered file
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


class ClassifierError(ValueError):
    """A classifier folder that is missing a file or holds inconsistent fields."""


def save_classifier(classifier, out_dir: Union[str, Path], classes: Sequence[str], task: str, image_size: int,
                    fov_crop: bool = True, extra: Optional[dict] = None) -> Path:
    """Write ``classifier`` (a :class:`~fundus_lab.eval.fine_tune.FineTuneClassifier`) to ``out_dir``.

    Args:
        classes: class names in the order of the head's outputs (``ds.classes``).
        task: the dataset's task (multilabel heads are read with sigmoids, others softmax).
        image_size: the side the classifier was trained at (``ds.image_size``).
        extra: JSON-able notes kept in classifier.json (e.g. the fine-tune metrics).
    """
    from safetensors.torch import save_file

    if task not in TASKS:
        raise ClassifierError(f"task={task!r}; expected one of {TASKS}")
    head = classifier.head
    if head.out_features != len(classes):
        raise ClassifierError(f"the head has {head.out_features} outputs but {len(classes)} class names were given")
    backbone = classifier.backbone
    if not hasattr(backbone, "save_pretrained"):
        raise ClassifierError(f"{type(backbone).__name__} has no save_pretrained; only fundus_lab backbones are saved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out / "backbone")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "classes": list(classes), "task": task,
        "preprocessing": {"image_size": int(image_size), "fov_crop": bool(fov_crop), "pad_to_square": True,
                          "range": "[0, 1]; mean/std normalisation inside the model"},
        "width": head.in_features,
    }
    if extra:
        info["extra"] = extra
    (out / "classifier.json").write_text(json.dumps(info, indent=2, default=float))
    return out


def load_classifier(path: Union[str, Path], map_location: str = "cpu"):
    """(classifier in eval mode, classifier.json contents) from a :func:`save_classifier` folder."""
    from safetensors.torch import load_file


    path = Path(path)
    meta_path = path / "classifier.json"
    if not meta_path.is_file():
        raise ClassifierError(f"{path}: no classifier.json; is this a folder written by save_classifier?")
    try:
        info = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ClassifierError(f"{meta_path}: not valid JSON ({err})") from None
    if info.get("format") != FORMAT:
        raise ClassifierError(f"{meta_path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("classes", list), ("task", str), ("preprocessing", dict), ("width", int)):
        if not isinstance(info.get(key), kind):
            raise ClassifierError(f"{meta_path}: field {key!r} is missing or not a {kind.__name__}")
    if info["task"] not in TASKS:
        raise ClassifierError(f"{meta_path}: field 'task' is {info['task']!r}; expected one of {TASKS}")
    size = info["preprocessing"].get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ClassifierError(
            f"{meta_path}: field 'preprocessing.image_size' is {size!r}; expected an integer from {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE} (the side the classifier was trained at); the file was edited or damaged: save the "
            "classifier again with save_classifier")
    if not isinstance(info["preprocessing"].get("fov_crop", True), bool):
        raise ClassifierError(f"{meta_path}: field 'preprocessing.fov_crop' is "
                              f"{info['preprocessing']['fov_crop']!r}; expected true or false")
    if not (path / "head.safetensors").is_file():
        raise ClassifierError(f"{path}: head.safetensors is missing")
    backbone = load_model(path / "backbone", map_location=map_location)
    classifier = FineTuneClassifier(backbone, len(info["classes"]), info["width"])
    head = load_file(str(path / "head.safetensors"))
    try:
        classifier.head.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise ClassifierError(f"{path / 'head.safetensors'}: does not fit {len(info['classes'])} classes: {err}") from None
    return classifier.to(map_location).eval(), info


@torch.no_grad()
def predict_images(classifier, info: dict, images: Sequence[Union[str, Path]], batch_size: int = 16) -> np.ndarray:
    """[N, C] class probabilities for image files, preprocessed as at training time."""
    pre = info["preprocessing"]
    device = model_device(classifier)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([load_tensor(p, pre["image_size"], fov_crop=pre.get("fov_crop", True))
                             for p in images[start:start + batch_size]])
        logits = classifier(batch.to(device)).float()
        probs = torch.sigmoid(logits) if info["task"] == "multilabel" else torch.softmax(logits, -1)
        out.append(probs.cpu().numpy())
    return np.concatenate(out)


__all__ = ["ClassifierError", "load_classifier", "predict_images", "save_classifier"]
