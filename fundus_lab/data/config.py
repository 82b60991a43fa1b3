"""Data section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """Which dataset a run pretrains on and how images are prepared.

    ``dataset`` is a manifest name from ``data_manifests/`` or a path to a manifest file.
    With ``root`` unset and a synthetic dataset named, the synthetic benchmark is written
    under ``synth_root`` on first use (``synth_n`` images per task, seed ``synth_seed``).
    """

    dataset: str = "synth-pretrain"
    root: Optional[str] = None
    image_size: int = 224
    num_workers: int = 0
    augment: bool = True
    text_source: str = "definitions"
    text_per_image: str = "all_labels"
    synth_root: str = "data/synth"
    synth_n: int = 2000
    synth_eval_n: int = 600
    synth_seed: int = 0
    synth_image_size: int = 224
    # generator calibration (1.0 = realistic; see fundus_lab.data.synth.render.calibration):
    # a low working resolution enlarges and deepens small lesions and softens the camera shift
    synth_lesion_scale: float = 1.0
    synth_lesion_contrast: float = 1.0
    synth_camera_shift: float = 1.0
    skip_bad_images: bool = False
    # pre-decoded, pre-resized uint8 images in a memory-mapped file per dataset/split/size
    # (fundus_lab.data.cache), written on first use under image_cache_dir
    image_cache: bool = True
    image_cache_dir: Optional[str] = None   # None: <dataset folder>/.cache
