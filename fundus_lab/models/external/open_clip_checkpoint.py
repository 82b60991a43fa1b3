"""open_clip checkpoints as outside models: a weights file or folder with its model-config JSON
(``open_clip_config.json``, a JSON beside the weights, or a built-in name), built by open_clip
itself (:class:`OpenCLIP`, open_clip's own eval transform for pixels) and read without running
code. Every folder its config names (``text_cfg.hf_tokenizer_name`` / ``hf_model_name``) is
checked by :mod:`fundus_lab.models.external.safety`.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fundus_lab.models.external.safety import (
    HF_TOKENIZER_OPTIONS, SIMPLE_TOKENIZER_OPTIONS, WEIGHT_SUFFIXES, ExternalModelError, check_timm_name,
    checkpoint_subfolder, read_json, read_state_dict, tokenizer_options,
)
from fundus_lab.models.external.wrapper import OPENAI_MEAN, OPENAI_STD, ExternalModel, TowerView


def open_clip_pixel_transform(size: int, preprocess_cfg: dict):
    """open_clip's own eval transform for this checkpoint's ``preprocess_cfg`` (resize mode,
    interpolation), without its final Normalize (the wrapper normalises)."""
    import open_clip
    from torchvision.transforms import Compose, Normalize

    kwargs = {k: preprocess_cfg[k] for k in ("resize_mode", "interpolation") if preprocess_cfg.get(k)}
    transform = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)
    return Compose([t for t in transform.transforms if not isinstance(t, Normalize)])


class OpenCLIP(ExternalModel):
    """An open_clip ``CLIP``/``CustomTextCLIP``/``CoCa`` model with its tokenizer."""

    kind = "open_clip"

    def __init__(self, model, tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD, source: str = "open_clip",
                 preprocess_cfg: dict | None = None):
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        super().__init__(size, mean, std, source, open_clip_pixel_transform(size, preprocess_cfg or {}))
        self.model = model
        self.tokenizer = tokenizer
        visual = model.visual
        is_vit = all(hasattr(visual, a) for a in ("_embeds", "_pool", "transformer"))
        caps = {"image_embedding", "text_embedding", "image_features"}
        if is_vit:
            caps |= {"fine_tune", "patch_embedding"}
            blocks = getattr(visual.transformer, "resblocks", None)
            if blocks is not None and all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
                caps.add("attention_maps")
        self.capabilities = frozenset(caps)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def text_encoder(self) -> nn.Module:
        text = getattr(self.model, "text", None)  # CustomTextCLIP / CoCa keep the tower as .text
        return text if text is not None else self.model.transformer

    @property
    def image_encoder(self) -> nn.Module:
        visual = self.model.visual
        if "fine_tune" not in self.capabilities:
            return visual
        return TowerView(visual, visual.transformer.resblocks, visual.transformer.width)

    def _vision_tokens(self, pixels):
        visual = self.model.visual
        if "image_features" in self.capabilities and hasattr(visual, "_embeds"):
            x = visual.transformer(visual._embeds(pixels))
            pooled, tokens = visual._pool(x)
            return pooled, tokens
        pooled = visual(pixels)  # non-ViT towers (ResNet, timm): the projected embedding
        return pooled, pooled[:, None]

    def _project(self, features):
        visual = self.model.visual
        if not hasattr(visual, "_embeds"):
            return features  # already projected by the tower itself
        return features @ visual.proj if visual.proj is not None else features

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Self-attention of every ViT block, ``[N, heads, 1 + L, 1 + L]``, from each block's
        own ``nn.MultiheadAttention`` (need_weights), then the block runs as usual."""
        if "attention_maps" not in self.capabilities:
            raise RuntimeError(f"{self.source}: attention maps need a ViT tower of nn.MultiheadAttention blocks")
        visual = self.model.visual
        x = visual._embeds(self.preprocess(images))
        maps = []
        for blk in visual.transformer.resblocks:
            h = blk.ln_1(x)
            _, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
            maps.append(w.float())
            x = blk(x)
        return maps


def _open_clip_config(weights: Path, model_config: str | Path | dict | None) -> tuple[dict, dict, Path]:
    """(model_cfg, preprocess_cfg, where it came from) for an open_clip weights file.

    ``model_config``: a dict, a JSON file (an open_clip model config such as
    ``ViT-B-16.json``, or a hub ``open_clip_config.json`` with ``model_cfg``), or a
    built-in open_clip model name. Without it: ``open_clip_config.json`` beside the
    weights, else ``<weights stem>.json``, else the only other JSON file there.
    """
    if isinstance(model_config, dict):
        data, src = model_config, Path("<dict>")
    elif model_config is not None and Path(model_config).is_file():
        src = Path(model_config)
        data = read_json(src)
    elif model_config is not None:
        import open_clip

        data = open_clip.get_model_config(str(model_config))
        if data is None:
            raise ExternalModelError(f"model_config={str(model_config)!r} is neither a JSON file nor an open_clip model name")
        src = Path(str(model_config))
    else:
        folder = weights.parent
        candidates = [folder / "open_clip_config.json", weights.with_suffix(".json")]
        others = sorted(p for p in folder.glob("*.json") if p not in candidates)
        src = next((p for p in candidates if p.is_file()), others[0] if len(others) == 1 else None)
        if src is None:
            raise ExternalModelError(
                f"{weights}: no open_clip model config found (looked for open_clip_config.json, "
                f"{weights.with_suffix('.json').name}, or a single *.json beside it); pass model_config=")
        data = read_json(src)
    preprocess = dict(data.get("preprocess_cfg") or {})
    cfg = dict(data["model_cfg"]) if isinstance(data.get("model_cfg"), dict) else dict(data)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ExternalModelError(f"{src}: open_clip model config has no {key!r} (keys: {sorted(cfg)})")
    return cfg, preprocess, src


def _checked_text_cfg(text_cfg, folder: Path, src: Path) -> tuple[Path | None, dict]:
    """Check what an open_clip ``text_cfg`` names before anything is built or read: the
    tokenizer and text-tower folders must lie inside the checkpoint ``folder`` (relative names
    are relative to it, so a moved export still finds its ``text/``) and ask for no code, and
    ``tokenizer_kwargs`` may hold only the tokenizer's own options. Makes ``hf_model_name``
    absolute in place; returns (the tokenizer folder or None, the tokenizer options)."""
    if not isinstance(text_cfg, dict):
        raise ExternalModelError(f"{src}: text_cfg must be a mapping")
    hf_tokenizer = text_cfg.get("hf_tokenizer_name") is not None
    tokenizer_kwargs = tokenizer_options(text_cfg, HF_TOKENIZER_OPTIONS if hf_tokenizer else SIMPLE_TOKENIZER_OPTIONS, src)
    tokenizer_dir = None
    if hf_tokenizer:
        tokenizer_dir = checkpoint_subfolder(text_cfg["hf_tokenizer_name"], folder, "text_cfg.hf_tokenizer_name", src)
    if text_cfg.get("hf_model_name") is not None:
        text_cfg["hf_model_name"] = str(checkpoint_subfolder(text_cfg["hf_model_name"], folder, "text_cfg.hf_model_name", src))
    return tokenizer_dir, tokenizer_kwargs


def _open_clip_tokenizer(context: int, tokenizer_dir: Path | None, tokenizer_kwargs: dict):
    """open_clip's tokenizer: its HFTokenizer over a checked folder, else its SimpleTokenizer.
    The loading arguments are ours, never the checkpoint's."""
    import open_clip

    if tokenizer_dir is not None:
        return open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=context, **tokenizer_kwargs,
                                               trust_remote_code=False, local_files_only=True)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context, **tokenizer_kwargs)


def open_clip_tokenizer(path: str | Path, model_config: str | Path | dict | None = None):
    """The tokenizer of an open_clip checkpoint (file or folder), without building the model."""
    path = Path(path)
    if path.is_dir():
        found = [p for suffix in WEIGHT_SUFFIXES for p in sorted(path.glob(f"*{suffix}"))]
        path = found[0] if found else path / "open_clip_model.safetensors"
    cfg, _, src = _open_clip_config(path, model_config)
    text_cfg = deepcopy(cfg).get("text_cfg", {})
    tokenizer_dir, tokenizer_kwargs = _checked_text_cfg(text_cfg, path.parent, src)
    return _open_clip_tokenizer(text_cfg.get("context_length", 77), tokenizer_dir, tokenizer_kwargs)


def load_open_clip(path: str | Path, model_config: str | Path | dict | None = None) -> OpenCLIP:
    """An open_clip checkpoint (file, or folder holding one) plus its model-config JSON."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP, convert_to_custom_text_state_dict, resize_pos_embed

    path = Path(path)
    if path.is_dir():
        found = [p for suffix in WEIGHT_SUFFIXES for p in sorted(path.glob(f"*{suffix}"))]
        if not found:
            raise ExternalModelError(f"{path}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) in the folder")
        path = found[0]
    cfg, preprocess, src = _open_clip_config(path, model_config)
    cfg = deepcopy(cfg)
    text_cfg = cfg.get("text_cfg", {})
    vision_cfg = cfg.get("vision_cfg", {})
    if not isinstance(text_cfg, dict) or not isinstance(vision_cfg, dict):
        raise ExternalModelError(f"{src}: text_cfg and vision_cfg must be mappings")
    # everything the config names is checked before anything is built or read
    tokenizer_dir, tokenizer_kwargs = _checked_text_cfg(text_cfg, path.parent, src)
    if text_cfg.get("hf_model_name") is not None:
        text_cfg["hf_model_pretrained"] = False  # weights come from the checkpoint, never a download
    check_timm_name(vision_cfg, src)
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    text_cfg.pop("tokenizer_kwargs", None)
    text_cfg.pop("hf_tokenizer_name", None)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "multimodal_cfg" in cfg:
        from open_clip.coca_model import CoCa

        model_class = CoCa
    else:
        model_class = CustomTextCLIP if custom else CLIP
    try:
        model = model_class(**cfg)
    except TypeError as err:
        raise ExternalModelError(f"{src}: not an open_clip model config ({err})") from None
    state = read_state_dict(path)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_pos_embed(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExternalModelError(f"{path}: does not fit the open_clip model of {src}: "
                                 f"missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    tokenizer = _open_clip_tokenizer(text_cfg.get("context_length", 77), tokenizer_dir, tokenizer_kwargs)
    mean = tuple(preprocess.get("mean", getattr(model.visual, "image_mean", None) or OPENAI_MEAN))
    std = tuple(preprocess.get("std", getattr(model.visual, "image_std", None) or OPENAI_STD))
    return OpenCLIP(model.eval(), tokenizer, mean, std, source=str(path), preprocess_cfg=preprocess).eval()
