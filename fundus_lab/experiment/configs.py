"""A run's configs, resolved once and final, and the runtime settings they ask for.

:func:`fundus_lab.config.resolve_config` layers the preset, the method file, the user file
and the overrides; it sits at the ground and builds nothing. What only an experiment
knows is added here, before anyone reads the config: the steps an equal-FLOPs budget gives
a method (counting FLOPs builds models, :mod:`fundus_lab.budget`), the row's name and its
pretraining folder in the run. :func:`resolve_run_config` returns the config every caller
then uses as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from fundus_lab import budget
from fundus_lab import config as C


def normalise_overrides(overrides: Sequence[str] | Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``["a.b=1", ...]`` (texts typed later by the schema, as on the command line) or a mapping -> ``{"a.b": value}``."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return {str(k): v for k, v in overrides.items()}
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = {}
    for item in overrides:
        keys, value = C.parse_override(str(item))
        parsed[".".join(keys)] = value
    return parsed


def resolve_run_config(preset: str | None, method: str | None = None, overrides: list[str] | dict | None = None, *,
                       path: str | Path | None = None, seed: int | None = None,
                       synth_root: str | Path | None = None, name: str | None = None,
                       pretrain_dir: str | Path | None = None, progress: bool = False) -> "C.Config":
    """The final config of one row of a run: :func:`fundus_lab.config.resolve_config`, then
    the experiment's own facts.

    ``train.budget: flops`` sets ``train.steps`` (and ``train.teacher_steps``) so that
    ``method`` trains the FLOPs of ``train.budget_method`` at ``train.steps``; ``name``
    becomes ``method.name`` (a row named like its method); the pretraining run lives in
    ``pretrain_dir/seed<s>``; a synthetic dataset is found under ``data.synth_root``
    (``data.root`` None); ``progress`` shows the training bar (not part of any cache key).
    """
    cfg = C.resolve_config(preset, method, overrides, path=path, seed=seed, synth_root=synth_root)
    if cfg.train.budget == "flops" and method is not None:
        cfg.train.steps, cfg.train.teacher_steps = equal_flops_steps(cfg, path, overrides)
    if name is not None:
        cfg.method.name = name
    if pretrain_dir is not None:
        cfg.train.output_dir = str(Path(pretrain_dir) / f"seed{cfg.train.seed}")
    if cfg.data.dataset.startswith("synth-"):
        cfg.data.root = None
    if progress:
        cfg.train.progress = True
    return cfg


def equal_flops_steps(cfg: "C.Config", path, overrides) -> tuple[int, Optional[int]]:
    """``train.budget: flops``: (steps, teacher steps) that give the method of ``cfg`` the
    training FLOPs of ``train.budget_method`` at ``train.steps`` (:mod:`fundus_lab.budget`)."""
    known = C.available_methods()
    if cfg.train.budget_method not in known:
        raise C.ConfigError(f"train.budget_method = {cfg.train.budget_method!r} is not a method; expected one of {known}")
    reference = C.load_config(path, preset=cfg.preset, method=cfg.train.budget_method, overrides=overrides)
    for key in C.BUDGET_KEYS:
        setattr(reference.train, key, getattr(cfg.train, key))
    reference.train.teacher_steps = None
    return budget.budget_steps(cfg, budget.training_flops(reference)["flops"])


def apply_runtime(cfg: "C.Config") -> None:
    """Thread count and deterministic kernels from the config, before any training or scoring.

    Float reductions are summed in a thread-count-dependent order, so the count comes from
    ``train.num_threads``, never from the machine; ``train.deterministic`` asks torch for
    deterministic kernels (warning, not failing, where an op has none).
    """
    if cfg.train.num_threads > 0:
        if torch.get_num_threads() != cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_eval_config(run_cfg: Path, preset: str | None, overrides: list[str]) -> "C.Config":
    """The config ``fundus-lab eval`` evaluates a checkpoint under: the preset and the data
    settings (synthetic benchmark sizes, root, image cache, ...) of the run that trained it
    (``run_cfg``, the run folder's ``config.yaml``), then ``--preset`` and ``overrides`` on top.
    Without a run config: ``--preset`` (default ``default``) and the overrides, as before."""
    if not run_cfg.is_file():
        return C.resolve_config(preset, overrides=overrides)
    saved = C.read_yaml(run_cfg)
    data = saved.get("data") or {}
    C.from_dict(C.DataConfig, data, str(run_cfg), prefix="data.")  # a bad saved section names its file
    saved_preset = saved.get("preset")
    layered = {f"data.{key}": value for key, value in data.items()}
    layered.update(normalise_overrides(overrides))  # text, typed by the schema like any override
    return C.resolve_config(preset or (str(saved_preset) if saved_preset else None), overrides=layered)
