"""Outside models (a Hugging Face ``CLIPModel`` folder, an open_clip checkpoint) behind the
interface fundus_lab's evaluation calls, so they join the same tables as our own models.

The model interface (what ``fl.eval``, the viz functions and the widget call on a model):

    model.capabilities -> frozenset of names from fundus_lab.models.model.CAPABILITIES:
                          "image_embedding", "text_embedding", "patch_embedding",
                          "attention_maps", "image_features", "fine_tune"
    model.image_size   -> int, the side the model works at (inputs are resized to it)
    model.encode_image(images [N, 3, H, W] in [0, 1]) -> [N, D], L2-normalised
    model.encode_text(str or list[str]) -> [N, D], L2-normalised     ("text_embedding")
    model.image_features(images, mask_ratio=0.0) -> {"cls": [N, W], "tokens": [N, L, W]}
        the pooled feature before any projection and the patch tokens (probes, fine-tune)
    model.logit_scale  -> the log of the learned inverse temperature (zero-shot scale)
    model.text_encoder -> a module, or None for image-only models (zero-shot is then off)
    model.image_encoder -> a module with ``.blocks`` (layer-wise lr decay) and
                          ``num_features``; its parameters are what fine-tuning trains
    model.encode_patches(images) -> [N, L, D] L2-normalised patch tokens in the joint
                          space (MaskCLIP's dense read-out)              ("patch_embedding")
    model.attention_maps(images) -> list per block of [N, heads, 1 + L, 1 + L]  ("attention_maps")
    model.eval() / model.train() / model.to(device) / model.parameters() / model.state_dict()

Images arrive as plain [0, 1] pixels at any size; each wrapper applies its source's own
preprocessing: images not at ``image_size`` go through the source's own resize and crop on
8-bit PIL images (open_clip's ``image_transform`` from the checkpoint's ``preprocess_cfg``;
a Hugging Face folder's ``CLIPImageProcessor`` from ``preprocessor_config.json``), exactly
as that library prepares a photo, then the source's mean/std normalisation.
``model.pixel_transform`` is that resize and crop alone (PIL image -> [3, S, S] in [0, 1]):
the ``preprocess`` of ``fl.create_model_and_transforms``.

Loading never executes code: safetensors, or ``torch.load(weights_only=True)``;
transformers runs with ``trust_remote_code=False`` and ``local_files_only=True``. A
checkpoint's own config never passes keyword arguments to ``from_pretrained``, and every
folder it names (an open_clip ``text_cfg.hf_tokenizer_name`` / ``hf_model_name``) must lie
inside the checkpoint folder and carry no ``auto_map`` (:func:`checkpoint_subfolder`): a
:class:`~fundus_lab.checkpoint.CheckpointError` otherwise, and nothing reaches a model hub.

One module per kind (``hf_clip``, ``open_clip_checkpoint``, ``timm_image``), each a loader
in :data:`KINDS`; the checks they share live in ``safety``, the shared wrapper in ``wrapper``.

    model = load_external("path/to/clip-folder")                       # HF CLIPModel
    model = load_external("ckpt.safetensors", model_config="ViT-B-16.json")  # open_clip
"""

from __future__ import annotations

from pathlib import Path

import torch

from fundus_lab.models.external.hf_clip import HFCLIP, load_hf_clip
from fundus_lab.models.external.open_clip_checkpoint import load_open_clip
from fundus_lab.models.external.safety import WEIGHT_SUFFIXES, ExternalModelError, read_json
from fundus_lab.models.external.timm_image import TimmImageModel, load_timm_image, weights_are_timm_vit
from fundus_lab.models.external.wrapper import ExternalModel
from fundus_lab.registry import Registry


def _load_hf(path: str | Path, model_config=None) -> HFCLIP:
    if model_config is not None:
        raise ExternalModelError("model_config is for open_clip checkpoints; a Hugging Face folder has config.json")
    return load_hf_clip(path)


def _load_timm(path: str | Path, model_config=None) -> TimmImageModel:
    return load_timm_image(path)


# outside-model kind -> loader(path, model_config)
KINDS: Registry = Registry("outside model kind", error=ExternalModelError)
KINDS.register("hf", _load_hf)
KINDS.register("open_clip", load_open_clip)
KINDS.register("timm", _load_timm)


def detect_kind(path: str | Path) -> str:
    """``hf`` for a folder whose config.json says ``model_type: clip``; ``timm`` for a timm hub
    folder (config.json with ``architecture``) or a weights file of a timm ViT (RETFound's
    too); ``open_clip`` for another weights file, or a folder with ``open_clip_config.json``
    or a weights file and a JSON."""
    path = Path(path)
    if not path.exists():
        raise ExternalModelError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in WEIGHT_SUFFIXES:
            return "timm" if weights_are_timm_vit(path) else "open_clip"
        raise ExternalModelError(f"{path}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}) nor a model folder")
    config = path / "config.json"
    if config.is_file():
        data = read_json(config)
        if data.get("model_type") == "clip":
            return "hf"
        if "architecture" in data and ("pretrained_cfg" in data or "model_args" in data):
            return "timm"  # timm's hub layout (what export format='timm' writes)
        if "format" in data and "model" in data and "method" in data:
            raise ExternalModelError(f"{path} is a fundus_lab checkpoint; load it with fl.load_model")
    if (path / "open_clip_config.json").is_file() or any(any(path.glob(f"*{s}")) for s in WEIGHT_SUFFIXES):
        if config.is_file():
            raise ExternalModelError(
                f"{config}: model_type is {read_json(config).get('model_type')!r}; only Hugging Face "
                f"CLIPModel folders (model_type 'clip') and open_clip checkpoints are read")
        return "open_clip"
    raise ExternalModelError(f"{path}: neither a Hugging Face CLIP folder (config.json with model_type 'clip') "
                             f"nor an open_clip checkpoint (weights {WEIGHT_SUFFIXES} + model config JSON)")


def is_external(path: str | Path) -> bool:
    """True for a folder or file :func:`load_external` reads (the dispatch ``fl.load_model``
    needs: fundus_lab checkpoints and anything unrecognised give False)."""
    try:
        detect_kind(path)
    except ExternalModelError:
        return False
    return True


def load_external(path: str | Path, kind: str | None = None, model_config: str | Path | dict | None = None,
                  map_location: str | torch.device = "cpu") -> ExternalModel:
    """Load an outside CLIP-style model for evaluation (see the module docstring).

    Args:
        path: a Hugging Face CLIPModel folder, or an open_clip weights file / folder.
        kind: a :data:`KINDS` name (``"hf"``, ``"open_clip"``, ``"timm"``); detected from the
            files when None.
        model_config: open_clip only: the model-config JSON (or dict, or built-in name)
            when it is not beside the weights.
    """
    model = KINDS.get(kind or detect_kind(path))(path, model_config)
    return model.to(map_location).eval()



__all__ = ["KINDS", "ExternalModelError", "detect_kind", "is_external", "load_external"]
