"""Export a fundus_lab model into the field's formats, so its towers are usable elsewhere.

    fl.export.export(model, "out/timm", format="timm")        # image tower, timm weights
    fl.export.export(model, "out/hf", format="hf")            # the pair, transformers VisionTextDualEncoderModel
    fl.export.export(model, "out/open_clip", format="open_clip")  # the pair, open_clip layout

- ``timm``: ``model.safetensors`` + timm's hub ``config.json`` (architecture, model_args,
  pretrained_cfg). Loads with ``timm.create_model("local-dir:out/timm", pretrained=True)``
  or ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=
  "out/timm/model.safetensors"), **model_args)``; ``forward`` returns the class token.
  ``architecture`` is the registered timm name of the ViT's size (``vit_small_patch16_224``);
  a ViT of no registered size loads through the nearest size's entry point with its exact
  ``model_args``, and ``fundus_lab_architecture`` spells its sizes (``vit_w32_d2_h2_patch16_32``).
- ``hf``: a transformers ``VisionTextDualEncoderModel`` folder (ViT + the BERT or CLIP text
  tower, both projections, the logit scale) with the tokenizer and a ``ViTImageProcessor``:
  ``VisionTextDualEncoderModel.from_pretrained(out)``; ``get_image_features`` /
  ``get_text_features`` are our embeddings before L2 normalisation. The ViT pooler is an
  identity; BERT's pooler (dense + tanh, no switch) is a 1e-4 identity with the text
  projection scaled back (:data:`BERT_POOLER_SCALE`). :func:`export_text_hf` still writes the
  text tower alone.
- ``open_clip``: ``open_clip_model.safetensors`` + ``open_clip_config.json`` (model_cfg,
  preprocess_cfg) + ``text/`` (the HF text tower, named *relative* in ``text_cfg.hf_model_name``
  so the folder can move: fundus_lab resolves it beside the config; open_clip's
  ``HFTextEncoder`` resolves it against the working directory, so with open_clip alone load
  from inside the folder, ``open_clip.create_model("local-dir:.")``). The ViT maps onto
  open_clip's ``VisionTransformer`` (the patch-embedding bias folds into the position
  embedding: open_clip's conv has none); the text tower needs an architecture open_clip's
  ``HFTextEncoder`` knows (BERT does). Loads with
  ``fundus_lab.models.external.load_external(out)`` or open_clip's ``create_model("local-dir:...")``.

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
TIMM_WIDTHS = {size: width for (width, _), size in TIMM_SIZES.items()}
TIMM_DEPTHS = {"tiny": 12, "small": 12, "base": 12, "large": 24}


class ExportError(ValueError):
    """The model (or this part of it) has no counterpart in the requested format."""


def export(model: nn.Module, out_dir: str | Path, format: str = "hf") -> Path:
    """Write ``model``'s towers in ``format`` (``hf`` | ``timm`` | ``open_clip``) to ``out_dir``."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r}; expected one of {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"hf": export_hf, "timm": export_image_timm, "open_clip": export_open_clip}[format](model, out)


# ---------------------------------------------------------------------- timm (image tower)


def _encoder_layout(model: nn.Module) -> tuple[nn.Module, dict]:
    """The image encoder and its geometry, from the encoder itself or ``model.model_cfg``."""
    enc = getattr(model, "image_encoder", None)
    enc = getattr(enc, "trunk", enc)  # a fundus_lab tower wraps a plain timm model
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
    """The registered timm ViT of these sizes (``vit_small_patch16_224`` for a ViT-S/16 at 224).

    A ViT of no registered size gets the registered name of its nearest size by width, at
    its own patch size where timm has one (a width-32 ViT/16 is ``vit_tiny_patch16_224``,
    never ``vit_base``): timm builds it from that entry point with ``model_args``, which
    carry the exact sizes; :func:`timm_sizes_name` spells them out beside it.
    """
    import timm

    exact = TIMM_SIZES.get((layout["embed_dim"], layout["num_heads"]))
    standard = exact is not None and layout["depth"] == TIMM_DEPTHS[exact] and layout["mlp_ratio"] == 4.0
    size = exact if standard else min(TIMM_SIZES.values(), key=lambda s: abs(TIMM_WIDTHS[s] - layout["embed_dim"]))
    patch, img = layout["patch_size"], layout["img_size"]
    names = [f"vit_{size}_patch{patch}_{img}", f"vit_{size}_patch{patch}_224"] if standard else []
    names += [f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224"]
    return next(n for n in names if timm.is_model(n))


def timm_sizes_name(layout: dict) -> str:
    """The exported ViT's own sizes as one name: ``vit_w32_d2_h2_patch16_32``."""
    return (f"vit_w{layout['embed_dim']}_d{layout['depth']}_h{layout['num_heads']}_"
            f"patch{layout['patch_size']}_{layout['img_size']}")


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
        "fundus_lab_architecture": timm_sizes_name(layout),  # the sizes themselves, registered or not
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------- Hugging Face (the pair)

# BERT's pooler is dense + tanh with no switch; the exported pooler is this multiple of the
# identity and the text projection is divided by it, so tanh works in its linear range:
# tanh(s x) / s = x (1 - s^2 x^2 / 3), a relative error under 1e-7 for |x| < 5 (float32).
BERT_POOLER_SCALE = 1e-4


def _check_projections(model: nn.Module, fmt: str) -> None:
    for name in ("image_proj", "text_proj"):
        proj = getattr(model, name, None)
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            raise ExportError(f"format={fmt!r} needs model.{name} as a bias-free nn.Linear (a contrastive method); "
                              f"got {type(proj).__name__}")
    if getattr(model, "coca", False):
        raise ExportError(f"format={fmt!r}: CoCa pools the image with an attentional pooler, which has no counterpart "
                          "there; export format='timm' for the image tower")


# transformers ViTModel block names: 4.x ``encoder.layer.i.*``, 5.x ``layers.i.*``
_HF_VIT_NAMES = {
    "encoder.layer": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                      "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                      "qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value")},
    "layers": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj")},
}


def hf_vit_state_dict(model: nn.Module, blocks: str = "layers") -> dict[str, torch.Tensor]:
    """The image encoder under transformers ``ViTModel`` names (fused qkv split into query, key,
    value; the pooler an identity, so ``pooler_output`` is the final-normed class token).
    ``blocks``: ``"layers"`` (transformers 5) or ``"encoder.layer"`` (4.x)."""
    _, layout = _encoder_layout(model)
    sd = timm_state_dict(model)
    if "reg_token" in sd or any(".ls1." in k or ".q_norm." in k for k in sd):
        raise ExportError("register tokens, layer scale and q/k norms have no transformers ViTModel counterpart")
    width = layout["embed_dim"]
    out = {
        "embeddings.cls_token": sd.pop("cls_token"),
        "embeddings.position_embeddings": sd.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "layernorm.weight": sd.pop("norm.weight"), "layernorm.bias": sd.pop("norm.bias"),
        "pooler.dense.weight": torch.eye(width), "pooler.dense.bias": torch.zeros(width),
    }
    bias = sd.pop("patch_embed.proj.bias", None)
    out["embeddings.patch_embeddings.projection.bias"] = bias if bias is not None else torch.zeros(width)
    names = dict(_HF_VIT_NAMES[blocks])
    qkv = names.pop("qkv")
    for key in list(sd):
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.qkv."):
            for part, tensor in zip(qkv, sd.pop(key).chunk(3, dim=0)):
                out[f"{blocks}.{i}.{part}.{rest.rsplit('.', 1)[1]}"] = tensor.contiguous()
            continue
        for ours, theirs in names.items():
            if rest.startswith(ours + "."):
                out[f"{blocks}.{i}.{theirs}{rest[len(ours):]}"] = sd.pop(key)
                break
    if sd:
        raise ExportError(f"image encoder weights without a transformers ViTModel counterpart: {sorted(sd)[:6]}")
    return out


def export_hf(model: nn.Module, out: Path) -> Path:
    """A transformers ``VisionTextDualEncoderModel`` (ViT + the text tower) with the tokenizer and
    a ``ViTImageProcessor``: ``get_image_features`` / ``get_text_features`` give our
    ``encode_image`` / ``encode_text`` before their L2 normalisation."""
    from transformers import (ViTConfig, ViTImageProcessor, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel)

    text = getattr(model, "text_encoder", None)
    transformer, text_config = getattr(text, "transformer", None), getattr(text, "config", None)
    if transformer is None or text_config is None:
        raise ExportError(f"{type(model).__name__} has no Hugging Face text tower (text_encoder is "
                          f"{type(text).__name__}); image-only methods such as mae export as format='timm'")
    _check_projections(model, "hf")
    if text_config.model_type not in ("bert", "clip_text_model"):
        raise ExportError(f"format='hf': text tower {text_config.model_type!r} is neither BERT (its pooler reads the "
                          "first token) nor a CLIP text model (pooled end-of-text token), so its pooled feature "
                          "would not be ours")
    _, layout = _encoder_layout(model)
    if layout["block_eps"] != layout["norm_eps"]:
        warnings.warn(
            f"transformers' ViT uses one LayerNorm eps; the blocks use {layout['block_eps']:g} (exported) but the final "
            f"norm {layout['norm_eps']:g}, so image features differ slightly", stacklevel=3)
    vision_config = ViTConfig(
        hidden_size=layout["embed_dim"], num_hidden_layers=layout["depth"], num_attention_heads=layout["num_heads"],
        intermediate_size=int(round(layout["embed_dim"] * layout["mlp_ratio"])), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=layout["block_eps"],
        image_size=layout["img_size"], patch_size=layout["patch_size"], num_channels=3, qkv_bias=True,
        pooler_act="linear")
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_config, projection_dim=int(model.image_proj.out_features),
        logit_scale_init_value=float(model.logit_scale.detach().cpu().reshape(())))
    dual = VisionTextDualEncoderModel(config)
    blocks = "layers" if any(k.startswith("layers.") for k in dual.vision_model.state_dict()) else "encoder.layer"
    state = {f"vision_model.{k}": v for k, v in hf_vit_state_dict(model, blocks).items()}
    text_state = {k: v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    text_proj = model.text_proj.weight.detach().cpu().contiguous()
    if text_config.model_type == "bert":
        width = text_config.hidden_size
        text_state["pooler.dense.weight"] = BERT_POOLER_SCALE * torch.eye(width)
        text_state["pooler.dense.bias"] = torch.zeros(width)
        text_proj = text_proj / BERT_POOLER_SCALE
    state.update({f"text_model.{k}": v for k, v in text_state.items()})
    state["visual_projection.weight"] = model.image_proj.weight.detach().cpu().contiguous()
    state["text_projection.weight"] = text_proj
    state["logit_scale"] = model.logit_scale.detach().cpu().reshape(())
    missing, unexpected = dual.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"the model does not map onto VisionTextDualEncoderModel: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    dual.save_pretrained(str(out), safe_serialization=True)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    size = layout["img_size"]
    ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
                      do_normalize=True, image_mean=layout["mean"], image_std=layout["std"]).save_pretrained(str(out))
    return out


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
    _check_projections(model, "open_clip")
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
            # relative, so the folder moves: open_clip resolves it against the working directory (load from
            # inside the folder), fundus_lab's load_open_clip against the config's folder
            "hf_model_name": text_dir.name, "hf_tokenizer_name": text_dir.name,
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


__all__ = ["ExportError", "FORMATS", "export", "export_hf", "export_image_timm", "export_open_clip", "export_text_hf",
           "hf_vit_state_dict", "open_clip_state_dict", "timm_state_dict"]


class _CallableModule(types.ModuleType):
    """``fl.export(model, dir, format=...)`` calls :func:`export`: importing a submodule sets
    the package attribute to the module, so the module itself is made callable."""

    def __call__(self, model: nn.Module, out_dir: str | Path, format: str = "hf") -> Path:
        return export(model, out_dir, format)


sys.modules[__name__].__class__ = _CallableModule
