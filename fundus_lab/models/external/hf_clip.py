"""Hugging Face CLIP: a ``CLIPModel`` folder (``config.json`` with ``model_type: clip``) as an
outside model (:class:`HFCLIP`, its own ``CLIPImageProcessor`` for pixels), and a CLIP text
transformer as fundus_lab's text tower (:class:`CLIPTextEncoder`). transformers runs with
``trust_remote_code=False`` and ``local_files_only=True``; weights are read by
:func:`~fundus_lab.models.external.safety.read_state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fundus_lab.data.tokenizer import check_no_remote_code
from fundus_lab.models.external.safety import ExternalModelError, read_json, read_state_dict
from fundus_lab.models.external.wrapper import OPENAI_MEAN, OPENAI_STD, ExternalModel, TowerView


def hf_pixel_transform(size: int, config: dict):
    """A Hugging Face ``CLIPImageProcessor`` built from ``preprocessor_config.json`` (its resize,
    resample and crop; the model's own size where the file gives none), normalisation off."""
    from transformers import CLIPImageProcessor

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("image_processor_type", "processor_class")}
    fields.setdefault("size", {"shortest_edge": size})
    fields.setdefault("crop_size", {"height": size, "width": size})
    processor = CLIPImageProcessor(**{**fields, "do_normalize": False})

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


class HFCLIP(ExternalModel):
    """A transformers ``CLIPModel`` (folder with ``config.json``, ``model_type: clip``)."""

    kind = "hf"

    def __init__(self, model, tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD, source: str = "hf", pixel_transform=None):
        super().__init__(model.config.vision_config.image_size, mean, std, source, pixel_transform)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)
        caps = {"image_embedding", "text_embedding", "image_features", "fine_tune", "patch_embedding", "attention_maps"}
        self.capabilities = frozenset(caps)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def text_encoder(self) -> nn.Module:
        return self.model.text_model

    @property
    def image_encoder(self) -> nn.Module:
        vm = self.model.vision_model
        return TowerView(vm, vm.encoder.layers, self.model.config.vision_config.hidden_size)

    def _vision_tokens(self, pixels):
        out = self.model.vision_model(pixel_values=pixels)
        tokens = self.model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        return out.pooler_output, tokens

    def _project(self, features):
        return self.model.visual_projection(features)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids, attn = self.tokenize([texts] if isinstance(texts, str) else texts)
        pooled = self.model.text_model(input_ids=ids, attention_mask=attn).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Self-attention of every vision layer, ``[N, heads, 1 + L, 1 + L]`` each.

        SDPA kernels do not return attention weights, so the eager path runs for this call.
        """
        cfg = self.model.vision_model.config
        previous = cfg._attn_implementation
        cfg._attn_implementation = "eager"
        try:
            out = self.model.vision_model(pixel_values=self.preprocess(images), output_attentions=True)
        finally:
            cfg._attn_implementation = previous
        if not out.attentions:
            raise RuntimeError(f"{self.source}: the vision model returned no attention weights")
        return [a.float() for a in out.attentions]


def _hf_weights(path: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return found[0] if found else None


def load_hf_clip(path: str | Path) -> HFCLIP:
    """A Hugging Face ``CLIPModel`` folder: config.json, weights (safetensors, or a
    ``.bin`` read with ``weights_only=True``), tokenizer files, optional
    ``preprocessor_config.json`` (mean/std)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExternalModelError(f"{path}: no config.json; a Hugging Face CLIP folder needs one")
    data = read_json(config_path)
    if data.get("model_type") != "clip":
        raise ExternalModelError(f"{config_path}: model_type is {data.get('model_type')!r}, expected 'clip' (a CLIPModel)")
    weights = _hf_weights(path)
    if weights is None:
        raise ExternalModelError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    check_no_remote_code(path)  # an auto_map asks to run the folder's Python: a CheckpointError naming the file
    config = CLIPConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model = CLIPModel(config)
    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExternalModelError(f"{weights}: does not fit the CLIPModel of {config_path}: "
                                 f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise ExternalModelError(f"{path}: no usable tokenizer files ({err})") from None
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = path / "preprocessor_config.json"
    p = read_json(pre) if pre.is_file() else {}
    mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    try:
        pixels = hf_pixel_transform(config.vision_config.image_size, p)
    except (TypeError, ValueError) as err:
        raise ExternalModelError(f"{pre}: not a CLIPImageProcessor config ({err})") from None
    return HFCLIP(model.eval(), tokenizer, mean, std, source=str(path), pixel_transform=pixels).eval()


class CLIPTextEncoder(nn.Module):
    """A Hugging Face CLIP text transformer as fundus_lab's text tower.

    Same contract as :class:`fundus_lab.models.text.TextEncoder`:
    ``forward(input_ids, attention_mask) -> {"tokens", "cls", "attention_mask"}``, ``.config``
    (a ``CLIPTextConfig``, which has ``hidden_size``), ``.width``. ``cls`` is CLIP's pooled
    end-of-text token (the text is causal: position 0 sees only itself, so it carries nothing).
    """

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPTextModel

        self.config = config
        self.transformer = CLIPTextModel(config)
        self.width = config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CLIPTextEncoder":
        """From a ``CLIPTextModel`` or ``CLIPModel`` folder (safetensors, or ``.bin`` with
        ``weights_only=True``); a CLIPModel keeps only its ``text_model.*`` weights."""
        from transformers import CLIPTextConfig

        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ExternalModelError(f"model.text_pretrained={str(path)!r}: no config.json in that directory")
        model_type = read_json(config_path).get("model_type")
        if model_type not in ("clip", "clip_text_model"):
            raise ExternalModelError(f"{config_path}: model_type {model_type!r}; expected 'clip' or 'clip_text_model'")
        check_no_remote_code(path)
        # reads text_config of a CLIPConfig
        config = CLIPTextConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        weights = _hf_weights(path)
        if weights is None:
            raise ExternalModelError(f"{path}: no model.safetensors or pytorch_model.bin")
        state = read_state_dict(weights)
        enc = cls(config)
        # a CLIPModel stores text_model.*; a CLIPTextModel's own keys differ across
        # transformers versions (with or without the prefix): match the module's names
        text = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")} or state
        own = enc.transformer.state_dict()
        if not any(k in own for k in text):
            text = {f"text_model.{k}": v for k, v in text.items()}
        state = text
        missing, unexpected = enc.transformer.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ExternalModelError(f"{weights}: text weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return enc

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return {"tokens": out.last_hidden_state, "cls": out.pooler_output, "attention_mask": attention_mask}
