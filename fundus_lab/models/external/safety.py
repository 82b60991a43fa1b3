"""The checks every outside-model loader shares, so that loading never runs code and never
reaches a model hub: weights read as safetensors or with ``torch.load(weights_only=True)``
(:func:`read_state_dict`), JSON read as a mapping, every folder a checkpoint's config names
kept inside the checkpoint and free of ``auto_map`` (:func:`checkpoint_subfolder`), a
checkpoint's tokenizer options limited to the tokenizer's own (:func:`tokenizer_options`),
timm names that are architecture names, not hub names (:func:`check_timm_name`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.data.tokenizer import check_no_remote_code

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; an :class:`ExternalModelError` naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExternalModelError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ExternalModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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
    name = vision_cfg.get("timm_model_name")
    if name is None:
        return
    if not isinstance(name, str) or ":" in name or "/" in name or "\\" in name:
        raise CheckpointError(f"{src}: vision_cfg.timm_model_name={name!r}; expected a timm architecture name "
                              "(hub names such as 'hf-hub:...' are never fetched)")
