"""The calls open_clip users type, for our checkpoints and outside ones alike:

    model, preprocess = fl.create_model_and_transforms("runs/x/checkpoint-last")   # or an open_clip / HF CLIP folder
    tokenizer = fl.get_tokenizer("runs/x/checkpoint-last")
    image = preprocess(PIL.Image.open("fundus.png")).unsqueeze(0)   # [1, 3, S, S] in [0, 1]
    model.encode_image(image), model.encode_text("diabetic retinopathy")

``preprocess`` gives what ``model.encode_image`` takes: pixels in [0, 1] at the model's size
(every model normalises inside ``encode_image``, so open_clip's Normalize step is not in it).
For our models it is the dataset loader's own preparation (field-of-view crop, square pad,
resize); for an outside model its library's own resize and crop (open_clip's
``image_transform``, the Hugging Face ``CLIPImageProcessor``), so features equal that
library's. ``tokenizer`` is the model's own (what ``encode_text`` uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.data.images import load_tensor
from fundus_lab.data.tokenizer import load_tokenizer
from fundus_lab.models.external import ExternalModelError, detect_kind
from fundus_lab.models.external.open_clip_checkpoint import open_clip_tokenizer
from fundus_lab.models.factory import load_model
from fundus_lab.models.model import TOKENIZER_DIR

ImageInput = Union[str, Path, np.ndarray, "PIL.Image.Image"]  # noqa: F821


def _as_rgb_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    raise TypeError(f"preprocess takes a PIL image, an HxWx3 array or an image path, got {type(image).__name__}")


def model_image_size(model) -> int | None:
    """The square side the model's image tower works at (``model.img_size``, or its
    ``image_encoder.img_size``); None when the model does not say."""
    for owner in (model, getattr(model, "image_encoder", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int):
            return size
    return None


def image_transform(model, fov_crop: bool = True) -> Callable[[ImageInput], torch.Tensor]:
    """``preprocess(image) -> [3, S, S]`` in [0, 1] for ``model`` (see the module docstring)."""
    pixel_transform = getattr(model, "pixel_transform", None)
    if pixel_transform is not None:  # an outside model: its library's resize and crop
        def preprocess(image: ImageInput) -> torch.Tensor:
            if isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    return pixel_transform(im.convert("RGB"))
            return pixel_transform(Image.fromarray(_as_rgb_array(image)).convert("RGB"))

        return preprocess
    size = model_image_size(model)
    if size is None:
        raise ValueError(f"{type(model).__name__} does not say its image size (img_size); cannot build its transform")

    def preprocess(image: ImageInput) -> torch.Tensor:
        source = image if isinstance(image, (str, Path)) else _as_rgb_array(image)
        return load_tensor(source, size, fov_crop=fov_crop)

    return preprocess


def create_model_and_transforms(name_or_path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """``(model, preprocess)`` for a checkpoint folder: ours (``save_pretrained``), a Hugging
    Face ``CLIPModel`` folder or an open_clip checkpoint; the model in eval mode on ``device``."""
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder or file; expected a folder written by "
                                "save_pretrained, a Hugging Face CLIPModel folder or an open_clip checkpoint "
                                "(models are not downloaded)")
    model = load_model(path, map_location=device).eval()
    return model, image_transform(model)


def get_tokenizer(name_or_path: Union[str, Path]):
    """The tokenizer ``model.encode_text`` uses, read from the checkpoint without building the model:
    ours (``tokenizer/``), a Hugging Face CLIP folder's, or open_clip's for its config."""
    path = Path(name_or_path)
    if (path / TOKENIZER_DIR).is_dir():
        return load_tokenizer(path / TOKENIZER_DIR)
    if (path / "config.json").is_file() and not (path / "open_clip_config.json").is_file():
        try:
            kind = detect_kind(path)
        except ExternalModelError:
            raise CheckpointError(f"{path}: no {TOKENIZER_DIR}/ folder (an image-only method has no tokenizer) "
                                  "and not a Hugging Face CLIP folder") from None
        if kind == "hf":
            return load_tokenizer(path)
    if path.exists() and detect_kind(path) == "open_clip":
        return open_clip_tokenizer(path)
    raise FileNotFoundError(f"{name_or_path}: no tokenizer: expected a save_pretrained folder with {TOKENIZER_DIR}/, "
                            "a Hugging Face CLIP folder or an open_clip checkpoint")


__all__ = ["create_model_and_transforms", "get_tokenizer", "image_transform", "model_image_size"]
