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

    model = load_external("path/to/clip-folder")                       # HF CLIPModel
    model = load_external("ckpt.safetensors", model_config="ViT-B-16.json")  # open_clip
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
KINDS = ("hf", "open_clip", "timm")


class ExternalModelError(ValueError):
    """An outside model folder or file that cannot be read as the kind asked for."""


# ---------------------------------------------------------------------- safe weight reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file with ``weights_only=True``.

    Unwraps training checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) and a
    DistributedDataParallel ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise ExternalModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # truncated or not safetensors at all
            raise ExternalModelError(f"{path}: not a readable safetensors file ({err})") from None
    elif path.suffix in WEIGHT_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle with code objects, or a corrupt file
            raise ExternalModelError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    else:
        raise ExternalModelError(f"{path}: unknown weights format {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ExternalModelError(f"{path}: expected a mapping of tensor names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExternalModelError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ExternalModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------- each source's pixels


def _to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> an 8-bit RGB PIL image (rounded, as the file it came from)."""
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def _resize_crop_transform(size: int, interpolation: str = "bicubic"):
    """Shorter side to ``size`` (PIL, antialiased), centre crop, to [0, 1]: CLIP's eval transform."""
    from torchvision import transforms as T

    mode = getattr(T.InterpolationMode, interpolation.upper(), T.InterpolationMode.BICUBIC)
    return T.Compose([T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])


def open_clip_pixel_transform(size: int, preprocess_cfg: dict):
    """open_clip's own eval transform for this checkpoint's ``preprocess_cfg`` (resize mode,
    interpolation), without its final Normalize (the wrapper normalises)."""
    import open_clip
    from torchvision.transforms import Compose, Normalize

    kwargs = {k: preprocess_cfg[k] for k in ("resize_mode", "interpolation") if preprocess_cfg.get(k)}
    transform = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)
    return Compose([t for t in transform.transforms if not isinstance(t, Normalize)])


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


# ---------------------------------------------------------------------- what a checkpoint may name

# keyword arguments of open_clip's tokenizers themselves (how text is cleaned), the only ones a
# checkpoint's text_cfg.tokenizer_kwargs may set: anything else would reach
# AutoTokenizer.from_pretrained (trust_remote_code, cache_dir, revision, token, ...)
HF_TOKENIZER_OPTIONS = ("clean", "strip_sep_token", "language", "tokenizer_mode")
SIMPLE_TOKENIZER_OPTIONS = ("clean", "reduction_mask")


def checkpoint_subfolder(value, checkpoint_dir: Path, field: str, src: Path) -> Path:
    """The folder a checkpoint's config names in ``field``, checked to lie inside
    ``checkpoint_dir`` (relative paths are relative to it; an absolute path, a ``..`` escape
    or a hub name such as ``bert-base-uncased`` is refused) and to ask for no code
    (:func:`~fundus_lab.data.tokenizer.check_no_remote_code`: ``auto_map``, ``*.py``)."""
    from fundus_lab.checkpoint import CheckpointError
    from fundus_lab.data.tokenizer import check_no_remote_code

    if not isinstance(value, str) or not value.strip():
        raise CheckpointError(f"{src}: {field} must be a folder inside the checkpoint, got {value!r}")
    root = checkpoint_dir.resolve()
    candidate = Path(value)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(
            f"{src}: {field}={value!r} lies outside the checkpoint folder {root}; tokenizer and text-tower files "
            "are read only from inside it (never from elsewhere or from a model hub)")
    if not resolved.is_dir():
        raise CheckpointError(
            f"{src}: {field}={value!r} is not a folder inside the checkpoint folder {root} (a model-hub name is "
            "never downloaded: put the files in the checkpoint folder and name them by relative path)")
    check_no_remote_code(resolved)
    return resolved


def tokenizer_options(text_cfg: dict, allowed: Sequence[str], src: Path) -> dict:
    """``text_cfg.tokenizer_kwargs`` limited to the tokenizer's own options (``allowed``), each a
    plain str/bool/None: a :class:`~fundus_lab.checkpoint.CheckpointError` naming any other key."""
    from fundus_lab.checkpoint import CheckpointError

    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{src}: text_cfg.tokenizer_kwargs must be a mapping, got {type(kwargs).__name__}")
    refused = sorted(str(k) for k in kwargs if k not in allowed)
    if refused:
        raise CheckpointError(
            f"{src}: text_cfg.tokenizer_kwargs {refused} refused: a checkpoint's config never passes arguments to "
            f"from_pretrained (trust_remote_code and the like); only the tokenizer's own options {list(allowed)} are read")
    bad = sorted(k for k, v in kwargs.items() if not (v is None or isinstance(v, (str, bool))))
    if bad:
        raise CheckpointError(f"{src}: text_cfg.tokenizer_kwargs {bad} must be text, true/false or null")
    return dict(kwargs)


def check_timm_name(vision_cfg: dict, src: Path) -> None:
    """A ``vision_cfg.timm_model_name`` must be a timm architecture name: ``hf-hub:`` and
    other sourced names make timm fetch a config from a hub even without weights."""
    from fundus_lab.checkpoint import CheckpointError

    name = vision_cfg.get("timm_model_name")
    if name is None:
        return
    if not isinstance(name, str) or ":" in name or "/" in name or "\\" in name:
        raise CheckpointError(f"{src}: vision_cfg.timm_model_name={name!r}; expected a timm architecture name "
                              "(hub names such as 'hf-hub:...' are never fetched)")


# ---------------------------------------------------------------------- the shared wrapper


class _TowerView(nn.Module):
    """A ViT tower seen with timm's names, for fine-tuning's layer-wise lr decay.

    ``blocks`` are the tower's transformer layers; parameters registered before them
    (patch embedding, class and position embeddings, pre-norm) become ``patch_embed.*``
    (layer 0), those after them (final norm, pooling, projection) ``norm.*``.
    Built on access, never registered, so state dicts and fingerprints do not double.
    """

    def __init__(self, tower: nn.Module, blocks: nn.ModuleList, width: int):
        super().__init__()
        self.blocks = blocks
        in_blocks = {id(p) for p in blocks.parameters()}
        before, after, seen_blocks = [], [], False
        for _, p in tower.named_parameters():
            if id(p) in in_blocks:
                seen_blocks = True
            else:
                (after if seen_blocks else before).append(p)
        self.patch_embed = nn.ParameterList(before)
        self.norm = nn.ParameterList(after)
        self.num_features = width


class ExternalModel(nn.Module):
    """Common part of the wrappers: preprocessing, normalisation, the eval-facing API."""

    kind = "external"

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], source: str,
                 pixel_transform=None):
        super().__init__()
        self.image_size = int(image_size)
        self.source = source
        # PIL image -> [3, S, S] in [0, 1]: the source's resize and crop, without its normalisation
        self.pixel_transform = pixel_transform or _resize_crop_transform(self.image_size)
        self.use_contrastive = True  # CLIP-style models are aligned image-text spaces
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- to be provided by each source
    def _vision_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels -> (pooled feature before projection [N, W], patch tokens [N, L, W])."""
        raise NotImplementedError

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """``image_size`` under the name fundus_lab's own models use (the widget reads it)."""
        return self.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> the source model's input: images of another size than
        ``image_size`` through :attr:`pixel_transform` (the source library's own resize and
        crop, on 8-bit PIL images as it reads photos), then mean/std normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got {list(images.shape)}")
        s = self.image_size
        if tuple(images.shape[-2:]) != (s, s):
            images = torch.stack([self.pixel_transform(_to_pil(img)) for img in images.detach().cpu()])
        images = images.to(self.pixel_mean.device, self.pixel_mean.dtype)
        return (images - self.pixel_mean) / self.pixel_std

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        """{"cls": pooled feature before projection [N, W], "tokens": patch tokens [N, L, W]}."""
        if mask_ratio:
            raise ValueError(f"{type(self).__name__} does not mask patches (mask_ratio={mask_ratio})")
        pooled, tokens = self._vision_tokens(self.preprocess(images))
        return {"cls": pooled, "tokens": tokens}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled, _ = self._vision_tokens(self.preprocess(images))
        return F.normalize(self._project(pooled), dim=-1)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the image projection, L2-normalised (MaskCLIP)."""
        if "patch_embedding" not in self.capabilities:
            raise RuntimeError(f"{self.source}: patch read-out needs a ViT tower with per-token outputs")
        _, tokens = self._vision_tokens(self.preprocess(images))
        return F.normalize(self._project(tokens), dim=-1)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, image_size={self.image_size}"


# ---------------------------------------------------------------------- Hugging Face CLIP


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
        return _TowerView(vm, vm.encoder.layers, self.model.config.vision_config.hidden_size)

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
    data = _read_json(config_path)
    if data.get("model_type") != "clip":
        raise ExternalModelError(f"{config_path}: model_type is {data.get('model_type')!r}, expected 'clip' (a CLIPModel)")
    weights = _hf_weights(path)
    if weights is None:
        raise ExternalModelError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    from fundus_lab.data.tokenizer import check_no_remote_code

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
    p = _read_json(pre) if pre.is_file() else {}
    mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    try:
        pixels = hf_pixel_transform(config.vision_config.image_size, p)
    except (TypeError, ValueError) as err:
        raise ExternalModelError(f"{pre}: not a CLIPImageProcessor config ({err})") from None
    return HFCLIP(model.eval(), tokenizer, mean, std, source=str(path), pixel_transform=pixels).eval()


# ---------------------------------------------------------------------- open_clip


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
        return _TowerView(visual, visual.transformer.resblocks, visual.transformer.width)

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
        data = _read_json(src)
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
        data = _read_json(src)
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
    from copy import deepcopy

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
    from copy import deepcopy

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


# ---------------------------------------------------------------------- timm / RETFound (image only)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_timm_vit(state: dict) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.0.") for k in state)


def _timm_vit_args(state: dict, path: Path) -> dict:
    """A timm ViT's sizes read off its weights. The head count is not in the weights: the
    registered size of that width (ViT-Ti/S/B/L: 3/6/12/16), else width / 64 (ViT's head width)."""
    from fundus_lab.export import TIMM_SIZES

    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    prefix = 1 if "cls_token" in state else 0
    tokens = state["pos_embed"].shape[1] - prefix if "pos_embed" in state else None
    side = math.isqrt(tokens) if tokens else None
    if not side or side * side != tokens:
        raise ExternalModelError(f"{path}: pos_embed {list(state.get('pos_embed', torch.empty(0)).shape)} is not a "
                                 "square grid; pass a timm config.json beside the weights (architecture, model_args)")
    heads = {w: h for (w, h) in TIMM_SIZES}.get(int(width), max(1, int(width) // 64))
    return {"img_size": side * patch, "patch_size": int(patch), "embed_dim": int(width), "depth": depth,
            "num_heads": heads, "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / int(width),
            "class_token": bool(prefix), "global_pool": "token"}


class TimmImageModel(nn.Module):
    """An image-only outside model: timm or RETFound ViT weights behind the evaluation
    interface. It has no text tower, so zero-shot (and the few-shot prompt head) is n/a;
    few-shot probes, the linear probe and fine-tuning read its class token."""

    kind = "timm"

    def __init__(self, tower: nn.Module, source: str):
        super().__init__()
        self.image_encoder = tower  # fundus_lab's ViT tower around the timm model: normalises inside
        self.source = source
        self.img_size = self.image_size = int(tower.img_size)
        self.text_encoder = None
        self.use_contrastive = False
        self.capabilities = frozenset({"image_embedding", "image_features", "fine_tune"})

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        out = self.image_encoder(images, mask_ratio)
        return {"cls": out["cls"], "tokens": out["tokens"][:, 1:]}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The class token, L2-normalised (no projection: the model learned none)."""
        return F.normalize(self.image_encoder(images)["cls"], dim=-1)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, image_size={self.image_size}"


def load_timm_image(path: str | Path) -> TimmImageModel:
    """timm or RETFound ViT image weights: a weights file (its sizes read off the tensors;
    RETFound's ``{"model": ...}`` unwrapped, heads dropped) or a timm hub folder
    (``config.json`` with ``architecture``, ``model_args``, ``pretrained_cfg`` + weights)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fundus_lab.export import timm_architecture
    from fundus_lab.models.image import VisionTransformer, load_image_weights
    from fundus_lab.models.image import read_state_dict as read_image_state

    path = Path(path)
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # timm's and RETFound's normalisation
    if path.is_dir():
        config = _read_json(path / "config.json")
        weights = next((p for s in WEIGHT_SUFFIXES for p in sorted(path.glob(f"*{s}"))), None)
        if weights is None or "architecture" not in config:
            raise ExternalModelError(f"{path}: a timm folder needs config.json with 'architecture' and a weights file")
        arch, args = config["architecture"], dict(config.get("model_args") or {})
        check_timm_name({"timm_model_name": arch}, path / "config.json")  # no hf-hub: names
        fetching = sorted(k for k in args if k.startswith("pretrained") or k in ("checkpoint_path", "cache_dir"))
        if fetching:
            from fundus_lab.checkpoint import CheckpointError

            raise CheckpointError(f"{path / 'config.json'}: model_args {fetching} refused: a checkpoint's config never "
                                  "tells timm where to fetch or read weights; the folder's own weights file is read")
        pretrained = config.get("pretrained_cfg") or {}
        mean, std = tuple(pretrained.get("mean", mean)), tuple(pretrained.get("std", std))
    else:
        weights = path
        args = _timm_vit_args(read_image_state(path), path)
        arch = timm_architecture({**args})
    args.update(num_classes=0, pretrained=False)
    try:
        trunk = timm.create_model(arch, **args)
    except (RuntimeError, TypeError) as err:
        raise ExternalModelError(f"{path}: timm cannot build {arch!r} with {args} ({err})") from None
    if not isinstance(trunk, TimmViT):
        raise ExternalModelError(f"{path}: {arch!r} is a {type(trunk).__name__}; image-only outside models are timm ViTs")
    tower = VisionTransformer(trunk, mean=mean, std=std, name=arch)
    load_image_weights(tower, weights)
    return TimmImageModel(tower, source=str(path)).eval()


# ---------------------------------------------------------------------- detection


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
            return "timm" if _weights_are_timm_vit(path) else "open_clip"
        raise ExternalModelError(f"{path}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}) nor a model folder")
    config = path / "config.json"
    if config.is_file():
        data = _read_json(config)
        if data.get("model_type") == "clip":
            return "hf"
        if "architecture" in data and ("pretrained_cfg" in data or "model_args" in data):
            return "timm"  # timm's hub layout (what export format='timm' writes)
        if "format" in data and "model" in data and "method" in data:
            raise ExternalModelError(f"{path} is a fundus_lab checkpoint; load it with fl.load_model")
    if (path / "open_clip_config.json").is_file() or any(any(path.glob(f"*{s}")) for s in WEIGHT_SUFFIXES):
        if config.is_file():
            raise ExternalModelError(
                f"{config}: model_type is {_read_json(config).get('model_type')!r}; only Hugging Face "
                f"CLIPModel folders (model_type 'clip') and open_clip checkpoints are read")
        return "open_clip"
    raise ExternalModelError(f"{path}: neither a Hugging Face CLIP folder (config.json with model_type 'clip') "
                             f"nor an open_clip checkpoint (weights {WEIGHT_SUFFIXES} + model config JSON)")


def _weights_are_timm_vit(path: Path) -> bool:
    """Whether a weights file holds a timm ViT (``patch_embed.*``, ``blocks.*``; RETFound's too)
    rather than an open_clip model (``visual.*``); unreadable files are left to the loaders."""
    from fundus_lab.models.image import read_state_dict as read_image_state

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception:  # not safetensors: the loader names the problem
            return False
        strip = next((p for p in ("module.", "image_encoder.trunk.", "trunk.") if keys and all(k.startswith(p) for k in keys)), "")
        return _is_timm_vit({k[len(strip):]: None for k in keys})
    try:
        return _is_timm_vit(read_image_state(path))
    except Exception:  # unreadable or pickled code: the loader that is tried next says so
        return False


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
        kind: ``"hf"`` or ``"open_clip"``; detected from the files when None.
        model_config: open_clip only: the model-config JSON (or dict, or built-in name)
            when it is not beside the weights.
    """
    kind = kind or detect_kind(path)
    if kind == "hf":
        if model_config is not None:
            raise ExternalModelError("model_config is for open_clip checkpoints; a Hugging Face folder has config.json")
        model = load_hf_clip(path)
    elif kind == "open_clip":
        model = load_open_clip(path, model_config)
    elif kind == "timm":
        model = load_timm_image(path)
    else:
        raise ExternalModelError(f"kind={kind!r}; expected one of {KINDS}")
    return model.to(map_location).eval()


# ---------------------------------------------------------------------- CLIP text tower


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
        model_type = _read_json(config_path).get("model_type")
        if model_type not in ("clip", "clip_text_model"):
            raise ExternalModelError(f"{config_path}: model_type {model_type!r}; expected 'clip' or 'clip_text_model'")
        from fundus_lab.data.tokenizer import check_no_remote_code

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


def clip_text_encoder(path: str | Path) -> CLIPTextEncoder:
    """The text tower of a Hugging Face CLIPTextModel/CLIPModel folder (for ``model.text_pretrained``)."""
    return CLIPTextEncoder.from_pretrained(path)


__all__ = [
    "CLIPTextEncoder", "ExternalModel", "ExternalModelError", "HFCLIP", "OpenCLIP", "TimmImageModel", "checkpoint_subfolder",
    "clip_text_encoder", "detect_kind", "hf_pixel_transform", "is_external", "load_external", "load_hf_clip", "load_open_clip",
    "load_timm_image", "open_clip_pixel_transform", "open_clip_tokenizer", "read_state_dict",
]
