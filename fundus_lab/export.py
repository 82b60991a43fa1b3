"""Export a fundus_lab model into the field's formats, so its towers are usable elsewhere.

    fl.export.export(model, "out/timm", format="timm")        # image tower, timm weights
    fl.export.export(model, "out/hf", format="hf")            # text tower, HF folder
    fl.export.export(model, "out/open_clip", format="open_clip")  # the pair, open_clip layout

- ``timm``: ``model.safetensors`` + timm's hub ``config.json`` (architecture, model_args,
  pretrained_cfg). Loads with ``timm.create_model("local-dir:out/timm", pretrained=True)``
  or ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=
  "out/timm/model.safetensors"), **model_args)``; ``forward`` returns the class token.
- ``hf``: the text transformer's ``save_pretrained`` folder plus its tokenizer; loads with
  ``transformers.AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
- ``open_clip``: ``open_clip_model.safetensors`` + ``open_clip_config.json`` (model_cfg,
  preprocess_cfg) + ``text/`` (the HF text tower the config names by absolute path: open_clip's
  ``HFTextEncoder`` reads a Hugging Face text model by path; move the folder, edit
  ``text_cfg.hf_model_name``). The ViT maps onto open_clip's ``VisionTransformer`` (the
  patch-embedding bias folds into the position embedding: open_clip's conv has none); the
  text tower needs an architecture open_clip's ``HFTextEncoder`` knows (BERT does).
  Loads with ``fundus_lab.models.external.load_external(out)`` or open_clip's
  ``create_model("local-dir:out")``.

The exporter reads only public attributes: ``model.image_encoder`` (timm ViT state-dict
names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), ``model.model_cfg``, ``model.text_encoder``
(``.transformer``, ``.config``), ``model.tokenizer``, ``model.image_proj``/``text_proj``,
``model.logit_scale``.
"""

from __future__ import annotations

import json
import math
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import nn

FORMATS = ("hf", "timm", "open_clip")
TIMM_SIZES = {(192, 3): "tiny", (384, 6): "small", (768, 12): "base", (1024, 16): "large"}


class ExportError(ValueError):
    """The model (or this part of it) has no counterpart in the requested format."""


def export(model: nn.Module, out_dir: str | Path, format: str = "hf") -> Path:
    """Write ``model``'s towers in ``format`` (``hf`` | ``timm`` | ``open_clip``) to ``out_dir``."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r}; expected one of {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"hf": export_text_hf, "timm": export_image_timm, "open_clip": export_open_clip}[format](model, out)


# ---------------------------------------------------------------------- timm (image tower)


def _encoder_layout(model: nn.Module) -> tuple[nn.Module, dict]:
    """The image encoder and its geometry, from the encoder itself or ``model.model_cfg``."""
    enc = getattr(model, "image_encoder", None)
    if enc is None or not hasattr(enc, "blocks"):
        raise ExportError(f"{type(model).__name__}.image_encoder is not a ViT with .blocks; only ViT towers export")
    cfg = getattr(model, "model_cfg", None)
    width = int(getattr(enc, "embed_dim", None) or enc.cls_token.shape[-1])
    heads = int(getattr(enc, "num_heads", None) or enc.blocks[0].attn.num_heads)
    patch = enc.patch_embed.proj.kernel_size[0]
    img = getattr(enc, "img_size", None) or getattr(cfg, "img_size", None)
    img = img[0] if isinstance(img, (tuple, list)) else int(img)
    fc1 = enc.blocks[0].mlp.fc1
    layout = {
        "img_size": img, "patch_size": int(patch), "embed_dim": width, "depth": len(enc.blocks), "num_heads": heads,
        "mlp_ratio": fc1.out_features / width,
        "mean": list(getattr(cfg, "image_mean", (0.485, 0.456, 0.406))),
        "std": list(getattr(cfg, "image_std", (0.229, 0.224, 0.225))),
        "block_eps": float(enc.blocks[0].norm1.eps), "norm_eps": float(enc.norm.eps),
    }
    return enc, layout


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The image encoder's weights under timm ViT names (``pos_embed`` included even where
    fundus_lab keeps it as a fixed, unsaved sin-cos buffer)."""
    enc, _ = _encoder_layout(model)
    state = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    if "pos_embed" not in state:
        state["pos_embed"] = enc.pos_embed.detach().cpu().contiguous()
    state.pop("mean", None)
    state.pop("std", None)
    odd = [k for k in state if not k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "reg_token"))]
    if odd:
        raise ExportError(f"image encoder has weights timm's VisionTransformer does not name: {odd[:6]}")
    return state


def timm_architecture(layout: dict) -> str:
    """The closest registered timm ViT name (model_args carry the exact sizes anyway)."""
    import timm

    size = TIMM_SIZES.get((layout["embed_dim"], layout["num_heads"]), "base")
    for name in (f"vit_{size}_patch{layout['patch_size']}_{layout['img_size']}", f"vit_{size}_patch{layout['patch_size']}_224",
                 f"vit_{size}_patch16_224"):
        if timm.is_model(name):
            return name
    return "vit_base_patch16_224"


def export_image_timm(model: nn.Module, out: Path) -> Path:
    """``model.safetensors`` + ``config.json`` in timm's hub layout (a ``local-dir:`` model)."""
    from safetensors.torch import save_file

    _, layout = _encoder_layout(model)
    state = timm_state_dict(model)
    if layout["block_eps"] != 1e-6 or layout["norm_eps"] != 1e-6:
        warnings.warn(
            f"the image encoder's LayerNorm eps is {layout['block_eps']:g} (blocks) / {layout['norm_eps']:g} (final); "
            "timm's ViT uses 1e-6, so features of the timm model differ slightly (config.json records "
            "fundus_lab_layer_norm_eps; set it on the timm model's blocks / final norm for exact features)",
            stacklevel=3,
        )
    model_args = {k: layout[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    model_args.update(global_pool="token", class_token=True, qkv_bias=True, num_classes=0)
    if "reg_token" in state:
        model_args["reg_tokens"] = int(state["reg_token"].shape[1])
    arch = timm_architecture(layout)
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": layout["embed_dim"],
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "fundus_lab", "custom_load": False,
            "input_size": [3, layout["img_size"], layout["img_size"]], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": layout["mean"], "std": layout["std"], "num_classes": 0, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
        "fundus_lab_layer_norm_eps": {"blocks": layout["block_eps"], "norm": layout["norm_eps"]},
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------- Hugging Face (text tower)


def export_text_hf(model: nn.Module, out: Path) -> Path:
    """The text transformer's ``save_pretrained`` folder (safetensors) + its tokenizer."""
    text = getattr(model, "text_encoder", None)
    transformer = getattr(text, "transformer", None)
    if transformer is None or not hasattr(transformer, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} has no Hugging Face text tower (text_encoder is "
                          f"{type(text).__name__}); image-only methods such as mae have nothing to export as hf")
    transformer.save_pretrained(str(out), safe_serialization=True)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------- open_clip (the pair)


def open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The image tower and projections under open_clip's ``CustomTextCLIP`` names (text
    weights are added by :func:`export_open_clip` under ``text.transformer.*``)."""
    enc, layout = _encoder_layout(model)
    sd = timm_state_dict(model)
    if "reg_token" in sd or any(".ls1." in k or ".q_norm." in k for k in sd):
        raise ExportError("register tokens, layer scale and q/k norms have no open_clip VisionTransformer counterpart")
    for name in ("image_proj", "text_proj"):
        proj = getattr(model, name, None)
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            raise ExportError(f"open_clip needs model.{name} as a bias-free nn.Linear (a contrastive method); "
                              f"got {type(proj).__name__}")
    conv_b = sd.pop("patch_embed.proj.bias", None)
    pos = sd.pop("pos_embed")[0].clone()  # [1 + L, W]
    if conv_b is not None:  # open_clip's conv1 has no bias: a constant on every patch token is a position offset
        pos[1:] += conv_b
    out = {
        "visual.conv1.weight": sd.pop("patch_embed.proj.weight"),
        "visual.class_embedding": sd.pop("cls_token").reshape(-1),
        "visual.positional_embedding": pos,
        "visual.ln_post.weight": sd.pop("norm.weight"),
        "visual.ln_post.bias": sd.pop("norm.bias"),
        "visual.proj": model.image_proj.weight.detach().cpu().T.contiguous(),
        "text.proj.weight": model.text_proj.weight.detach().cpu().contiguous(),
        "logit_scale": model.logit_scale.detach().cpu().reshape(()),
    }
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key in list(sd):
        _, i, rest = key.split(".", 2)
        for ours, theirs in names.items():
            if rest.startswith(ours):
                out[f"visual.transformer.resblocks.{i}.{theirs}{rest[len(ours):]}"] = sd.pop(key)
                break
    if sd:
        raise ExportError(f"image encoder weights without an open_clip counterpart: {sorted(sd)[:6]}")
    return out


def export_open_clip(model: nn.Module, out: Path) -> Path:
    """open_clip layout: weights, ``open_clip_config.json`` and the HF text tower in ``text/``."""
    from safetensors.torch import save_file

    try:
        from open_clip.hf_configs import arch_dict
    except ImportError:
        raise ExportError("format='open_clip' needs open_clip (pip install 'fundus_lab[external]')") from None
    _, layout = _encoder_layout(model)
    text = getattr(model, "text_encoder", None)
    config = getattr(text, "config", None)
    if config is None or getattr(config, "model_type", None) not in arch_dict:
        raise ExportError(
            f"the text tower ({getattr(config, 'model_type', None)!r}) is not an architecture open_clip's HFTextEncoder "
            f"knows ({sorted(arch_dict)}); export format='hf' and 'timm' separately")
    if layout["block_eps"] != layout["norm_eps"]:
        warnings.warn(
            f"open_clip uses one LayerNorm eps for the whole ViT; the blocks use {layout['block_eps']:g} (exported) but "
            f"the final norm {layout['norm_eps']:g}, so image features differ slightly (set visual.ln_post.eps = "
            f"{layout['norm_eps']:g} on the loaded model for exact ones)", stacklevel=3)
    state = open_clip_state_dict(model)
    text_dir = export_text_hf(model, out / "text")
    if getattr(model, "tokenizer", None) is not None:  # open_clip's local-dir: reads the tokenizer from the top folder
        model.tokenizer.save_pretrained(str(out))
    for k, v in text.transformer.state_dict().items():
        state[f"text.transformer.{k}"] = v.detach().cpu().contiguous()
    max_length = min(int(getattr(model, "model_cfg").text_max_length), int(getattr(config, "max_position_embeddings", 512)))
    model_cfg = {
        "embed_dim": int(model.image_proj.out_features),
        "custom_text": True,
        "vision_cfg": {
            "image_size": layout["img_size"], "patch_size": layout["patch_size"], "width": layout["embed_dim"],
            "layers": layout["depth"], "head_width": layout["embed_dim"] // layout["num_heads"],
            "mlp_ratio": layout["mlp_ratio"], "no_ln_pre": True, "pool_type": "tok",
            "norm_kwargs": {"eps": layout["block_eps"]},
        },
        "text_cfg": {
            "hf_model_name": str(text_dir.resolve()), "hf_tokenizer_name": str(text_dir.resolve()),
            "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": max_length,
        },
    }
    mean = list(getattr(model.model_cfg, "image_mean", (0.485, 0.456, 0.406)))
    std = list(getattr(model.model_cfg, "image_std", (0.229, 0.224, 0.225)))
    payload = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std, "interpolation": "bicubic",
                                                           "resize_mode": "shortest"}}
    if not math.isfinite(float(state["logit_scale"])):
        raise ExportError("logit_scale is not finite")
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    (out / "open_clip_config.json").write_text(json.dumps(payload, indent=2))
    return out


__all__ = ["ExportError", "FORMATS", "export", "export_image_timm", "export_open_clip", "export_text_hf",
           "open_clip_state_dict", "timm_state_dict"]


class _CallableModule(types.ModuleType):
    """``fl.export(model, dir, format=...)`` calls :func:`export`: importing a submodule sets
    the package attribute to the module, so the module itself is made callable."""

    def __call__(self, model: nn.Module, out_dir: str | Path, format: str = "hf") -> Path:
        return export(model, out_dir, format)


sys.modules[__name__].__class__ = _CallableModule
