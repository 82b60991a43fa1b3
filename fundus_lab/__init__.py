"""fundus_lab: self-supervised vision-language learning on retinal fundus photographs.

Submodules load on first use (``fl.data``, ``fl.models``, ``fl.train`` ...), so
``import fundus_lab`` stays cheap for the command line and for notebooks. ``fl.Run`` is
:class:`fundus_lab.experiment.Run`, the one call a notebook builds its run with.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"config", "data", "models", "losses", "train", "eval", "viz", "widgets", "knowledge", "reproduce", "checkpoint", "cli", "export", "experiment", "key_figures", "model_viz", "schema"}


def load_model(checkpoint_dir, **kwargs):
    """Rebuild a model from ``save_pretrained`` output (safetensors + JSON; never unpickles)."""
    from fundus_lab.models import load_model as _load_model

    return _load_model(checkpoint_dir, **kwargs)


def create_model_and_transforms(name_or_path, device="cpu"):
    """``(model, preprocess)`` as open_clip returns them, for our checkpoints, Hugging Face CLIP
    folders and open_clip checkpoints (``preprocess``: an image -> what ``encode_image`` takes)."""
    from fundus_lab.models.conventions import create_model_and_transforms as _create

    return _create(name_or_path, device)


def get_tokenizer(name_or_path):
    """The tokenizer ``model.encode_text`` uses, for the same checkpoints."""
    from fundus_lab.models.conventions import get_tokenizer as _get_tokenizer

    return _get_tokenizer(name_or_path)


def __getattr__(name: str):
    if name == "Run":
        from fundus_lab.experiment import Run

        globals()[name] = Run
        return Run
    if name in _SUBMODULES:
        module = importlib.import_module(f"fundus_lab.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fundus_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | {"Run"})
