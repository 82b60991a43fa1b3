"""Where a :class:`~fundus_lab.models.model.FundusVLM` comes from: :func:`build_model` (from
configs, loading any pretrained parts: tokenizer, text tower, timm / RETFound image weights,
EVA's teacher) and :func:`load_model` (from a checkpoint folder: ours, or an outside model
through :mod:`fundus_lab.models.external`). Every file is read without running code, and
every weight that does not fit is named.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fundus_lab.checkpoint import CheckpointError, read_json_file, read_safetensors
from fundus_lab.config import ConfigError, MethodConfig, ModelConfig, from_dict
from fundus_lab.data.tokenizer import default_corpus, load_tokenizer, train_tokenizer
from fundus_lab.models.external import ExternalModelError, detect_kind, load_external
from fundus_lab.models.image import load_image_weights
from fundus_lab.models.model import CONFIG_NAME, FORMAT, TOKENIZER_DIR, WEIGHTS_NAME, FundusVLM
from fundus_lab.models.text import TextEncoder, config_from_dict


def _resolve_tokenizer(model_cfg: ModelConfig):
    if model_cfg.tokenizer:
        return load_tokenizer(model_cfg.tokenizer)
    if model_cfg.text_pretrained:
        return load_tokenizer(model_cfg.text_pretrained)
    # no tokenizer given: learn one from the knowledge base (deterministic)
    return train_tokenizer(default_corpus(), vocab_size=model_cfg.vocab_size, model_max_length=model_cfg.text_max_length)


def _read_checkpoint_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    data = read_json_file(cfg_path, "; is this a directory written by save_pretrained?")
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: format is {data.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "method"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{cfg_path}: field {key!r} is missing or not a mapping")
    return data


def _load_weights(module: nn.Module, weights: Path, prefix: str = "") -> None:
    """Copy safetensors weights into ``module``; any missing, extra or mis-shaped key is an error."""

    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist")
    state = read_safetensors(weights)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(
            "shape mismatch " + ", ".join(f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}" for k in wrong[:8])
        )
    if problems:
        raise CheckpointError(f"{weights}{' [' + prefix + '*]' if prefix else ''} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def build_model(model_cfg: ModelConfig, method_cfg: MethodConfig, tokenizer=None) -> FundusVLM:
    """Build a :class:`FundusVLM` for ``method_cfg``, loading any pretrained parts.

    - tokenizer: given, else ``model.tokenizer``, else the ``text_pretrained`` checkpoint's,
      else one trained on the knowledge base.
    - ``model.text_pretrained``: a local HF checkpoint directory (safetensors) for ``E_text``.
    - ``method.teacher_checkpoint``: a ``save_pretrained`` directory (a trained CLIP) whose
      image encoder becomes EVA's frozen teacher and, with ``method.text_init: teacher``,
      whose text tower (encoder and projection) is where EVA's text tower starts (EVA-CLIP
      starts from a pretrained CLIP text encoder). Without one the teacher is a frozen,
      randomly initialised copy of the student's ViT and the text tower is random: a
      runnable stand-in, not the EVA recipe, and a loud warning says so
      (``fundus-lab compare`` trains ``clip`` first and passes its checkpoint).
    """
    has_text = method_cfg.uses_text
    if has_text and tokenizer is None:
        tokenizer = _resolve_tokenizer(model_cfg)
    text_encoder = text_config = None
    if has_text and model_cfg.text_pretrained and method_cfg.uses_coca:
        raise ValueError(f"model.text_pretrained={model_cfg.text_pretrained!r}: CoCa's causal text stack "
                         "(method.caption_mode='autoregressive') is built from scratch; unset model.text_pretrained")
    if has_text and model_cfg.text_pretrained:
        text_encoder = TextEncoder.from_pretrained(model_cfg.text_pretrained)
        text_config = text_encoder.config
    teacher_cfg = None
    uses_teacher = method_cfg.uses_teacher
    if uses_teacher and method_cfg.teacher_checkpoint:
        tpath = Path(method_cfg.teacher_checkpoint)
        tdata = _read_checkpoint_config(tpath)
        teacher_cfg = from_dict(ModelConfig, tdata["model"], str(tpath / CONFIG_NAME))
    model = FundusVLM(model_cfg, method_cfg, tokenizer if has_text else None, text_config, teacher_cfg)
    if model_cfg.image_weights:  # timm / RETFound weights for the image tower
        load_image_weights(model.image_encoder, model_cfg.image_weights)
    if text_encoder is not None:
        model.text_encoder.load_state_dict(text_encoder.state_dict(), strict=True)
    if uses_teacher and method_cfg.teacher_checkpoint:
        _load_weights(model.teacher, Path(method_cfg.teacher_checkpoint) / WEIGHTS_NAME, prefix="image_encoder.")
        if method_cfg.text_init == "teacher":
            load_teacher_text_tower(model, Path(method_cfg.teacher_checkpoint))
    elif uses_teacher:
        warnings.warn(
            f"method {method_cfg.name!r} has no method.teacher_checkpoint: its teacher is a FROZEN RANDOM ViT"
            + (" and its text tower starts RANDOM instead of from the teacher's (method.text_init='teacher')"
               if method_cfg.text_init == "teacher" else "")
            + ". This runs, but it is not the EVA-CLIP recipe; pass a trained CLIP checkpoint as "
            "method.teacher_checkpoint (fundus-lab compare trains clip first and does so).",
            UserWarning, stacklevel=2)
    if model.use_momentum:  # momentum encoders start equal to the online ones
        model.momentum_text_encoder.load_state_dict(model.text_encoder.state_dict())
    return model


def load_teacher_text_tower(model: FundusVLM, teacher: Path) -> None:
    """EVA-CLIP's text initialisation: copy the CLIP teacher checkpoint's text encoder and
    text projection into ``model`` (the teacher must share the model's tokenizer and text sizes)."""
    data = _read_checkpoint_config(teacher)
    if (teacher / TOKENIZER_DIR).is_dir() and model.tokenizer is not None:
        if load_tokenizer(teacher / TOKENIZER_DIR).get_vocab() != model.tokenizer.get_vocab():
            raise CheckpointError(f"method.teacher_checkpoint={str(teacher)!r}: its tokenizer differs from the model's; "
                                  "method.text_init='teacher' needs the same tokenizer (train the teacher with the same model.* settings)")
    if data.get("method", {}).get("contrastive_weight", 0) <= 0:
        raise CheckpointError(f"method.teacher_checkpoint={str(teacher)!r} has no contrastive text tower to start from "
                              "(contrastive_weight is 0); method.text_init='teacher' needs a CLIP-like teacher")
    weights = teacher / WEIGHTS_NAME
    _load_weights(model.text_encoder, weights, prefix="text_encoder.")
    _load_weights(model.text_proj, weights, prefix="text_proj.")


def load_model(path: str | Path, map_location: str | torch.device = "cpu", external: bool = True) -> FundusVLM:
    """Load a directory written by :meth:`FundusVLM.save_pretrained` (safetensors + JSON; no pickle),
    or an outside model: a Hugging Face ``CLIPModel`` folder, an open_clip checkpoint, or timm /
    RETFound ViT image weights (image-only: no zero-shot)
    (:func:`fundus_lab.models.external.load_external`), behind the same evaluation interface.
    ``external=False`` reads only our own format (resume)."""
    path = Path(path)
    try:
        kind = detect_kind(path) if external else None
    except ExternalModelError:
        kind = None
    # a folder with our config.json is ours (even a broken one, to be named as such); a
    # Hugging Face CLIP folder or an open_clip checkpoint goes to the outside loaders
    if kind in ("hf", "timm"):  # timm / RETFound image weights: an image-only model
        return load_external(path, map_location=map_location)
    if kind == "open_clip" and not (path / CONFIG_NAME).is_file():
        try:
            return load_external(path, map_location=map_location)
        except ExternalModelError:
            if not (path / WEIGHTS_NAME).is_file():
                raise  # else: our weights without their config.json, named as such below
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    data = _read_checkpoint_config(path)
    src = str(path / CONFIG_NAME)
    try:
        model_cfg = from_dict(ModelConfig, data["model"], src, prefix="model.")
        method_cfg = from_dict(MethodConfig, data["method"], src, prefix="method.")
        teacher_cfg = from_dict(ModelConfig, data["teacher_model"], src, prefix="teacher_model.") if data.get("teacher_model") else None
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        tokenizer = load_tokenizer(path / TOKENIZER_DIR)
        model_cfg = replace(model_cfg, tokenizer=str(path / TOKENIZER_DIR))
    try:
        text_config = config_from_dict(data["text_config"]) if data.get("text_config") else None
    except ValueError as err:
        raise CheckpointError(f"{src}: {err}") from None
    model = FundusVLM(model_cfg, method_cfg, tokenizer, text_config, teacher_cfg)
    _load_weights(model, path / WEIGHTS_NAME)
    return model.to(map_location).eval()
