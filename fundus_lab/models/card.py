"""The model card: a ``README.md`` inside every checkpoint folder, so a folder copied out of
its run still says what it is (Hugging Face's convention for a model folder).

It gives the method (its loss weights and switches), the model config, the data and the
training budget (from the run's ``config.yaml`` beside the checkpoint, when there is one)
and, once the run's Table 1 exists, the row of that table for this method.
``FundusVLM.save_pretrained`` writes it; ``fundus_lab.experiment.table.write_results`` writes
it again with the Table 1 cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

CARD_NAME = "README.md"
METHOD_KEYS = ("contrastive_weight", "image_gen_weight", "caption_weight", "cross_attention", "mask_ratio",
               "text_mask_ratio", "caption_mode", "contrastive_directions", "stage1_fraction")
MODEL_KEYS = ("image_encoder", "img_size", "patch_size", "vision_width", "vision_depth", "vision_heads",
              "text_width", "text_depth", "text_heads", "text_pretrained", "image_weights", "embed_dim")
DATA_KEYS = ("dataset", "root", "image_size", "text_source")
TRAIN_KEYS = ("steps", "budget", "batch_size", "grad_accum_steps", "lr", "warmup_steps", "seed")


def _read_run_config(checkpoint_dir: Path) -> Optional[dict]:
    """The run's ``config.yaml`` (the folder above a checkpoint), or None outside a run."""
    path = checkpoint_dir.resolve().parent / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _items(section: Mapping, keys) -> list[str]:
    return [f"- `{k}`: {section[k]}" for k in keys if k in section and section[k] not in (None, "")]


def model_card(checkpoint_dir: str | Path, table: Optional[Mapping[str, str]] = None,
               table_source: str = "") -> str:
    """The card's Markdown for a ``save_pretrained`` folder (its ``config.json`` must exist).

    Args:
        table: Table 1 header -> the shown cell (``"81.2 [79.0, 83.1]"``) of this method's row.
        table_source: where that table is (named in the card).
    """
    folder = Path(checkpoint_dir)
    config = json.loads((folder / "config.json").read_text())
    method, model = config.get("method") or {}, config.get("model") or {}
    name = method.get("name", "?")
    lines = [f"# fundus_lab checkpoint: `{name}`", "",
             "A fundus_lab model (image and text towers trained on retinal fundus images).", "",
             "```python", "import fundus_lab as fl", "model = fl.load_model(\"path/to/this/folder\")   "
             "# or FundusVLM.from_pretrained(...): safetensors + JSON, no code runs",
             "model, preprocess = fl.create_model_and_transforms(\"path/to/this/folder\")", "```", "",
             "## Method", ""]
    lines += _items(method, METHOD_KEYS) or ["- (no method fields recorded)"]
    lines += ["", "## Model", ""] + _items(model, MODEL_KEYS)
    run = _read_run_config(folder)
    if run is None:
        lines += ["", "## Data and budget", "", "Not recorded: this folder was not saved inside a training run "
                  "(no `config.yaml` beside it)."]
    else:
        lines += ["", "## Data", ""] + (_items(run.get("data") or {}, DATA_KEYS) or ["- (not recorded)"])
        lines += ["", "## Training budget", ""] + (_items(run.get("train") or {}, TRAIN_KEYS) or ["- (not recorded)"])
        if run.get("preset"):
            lines.append(f"- preset: {run['preset']}")
    if table:
        lines += ["", "## Table 1 (its run)", "", f"From {table_source}." if table_source else "", "",
                  "| column | value |", "|---|---:|"]
        lines += [f"| {header} | {cell} |" for header, cell in table.items()]
    else:
        lines += ["", "## Table 1", "", "No Table 1 yet: `fundus-lab compare` (or `reproduce`) writes this "
                  "method's row here once its run is evaluated."]
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint_dir: str | Path, table: Optional[Mapping[str, str]] = None,
                     table_source: str = "") -> Path:
    """Write (or rewrite) ``README.md`` in a ``save_pretrained`` folder."""
    path = Path(checkpoint_dir) / CARD_NAME
    path.write_text(model_card(checkpoint_dir, table, table_source))
    return path


__all__ = ["CARD_NAME", "model_card", "write_model_card"]
