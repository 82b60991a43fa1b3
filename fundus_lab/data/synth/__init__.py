"""Procedural synthetic colour fundus photographs with lesion masks and clinical reports.

No weights and no downloads: numpy and scipy draw the retina (``anatomy``, ``vessels``),
the lesions of each disease (``lesions``, ``render``), the camera (``cameras``) and a
report from the labels (``reports``); ``generate`` writes a dataset folder with a
manifest like any real dataset.

    import fundus_lab.data.synth as synth
    synth.generate("data/synth/synth-odir", task="odir", n=200)
    image, masks = synth.render_fundus(np.random.default_rng(0), synth.EyeLabels(dr_grade=3),
                                       camera="topcon", size=224, eye="left")
"""

from .cameras import CAMERAS, HELD_OUT, TRAIN_CAMERAS, CameraProfile, get_camera
from .writer import (DATASET_NAMES, LABEL_COLUMNS, SynthSettingsError, generate, generate_benchmark,
                     manifest_template, sample_one, write_dataset)
from .labels import ODIR_CODES, TASKS, UNSEEN, EyeLabels, Patient, sample_patient
from .render import CALIBRATION, RenderedEye, calibration, render_eye, render_fundus
from .reports import definition_text, short_text, write_report

__all__ = [
    "CAMERAS", "HELD_OUT", "TRAIN_CAMERAS", "CameraProfile", "get_camera",
    "DATASET_NAMES", "LABEL_COLUMNS", "SynthSettingsError", "generate", "generate_benchmark", "manifest_template",
    "sample_one", "write_dataset", "ODIR_CODES", "TASKS", "UNSEEN", "EyeLabels", "Patient", "sample_patient",
    "RenderedEye", "render_eye", "render_fundus", "definition_text", "short_text", "write_report",
    "CALIBRATION", "calibration", "benchmark_options",
]


def benchmark_options(data) -> dict:
    """``generate_benchmark`` keyword arguments from a run's data section (``DataConfig``):
    sizes, seed, generation size and the calibration, so every caller writes the same set."""
    return {"n_pretrain": data.synth_n, "n_eval": data.synth_eval_n, "seed": data.synth_seed,
            "image_size": data.synth_image_size, "lesion_scale": data.synth_lesion_scale,
            "lesion_contrast": data.synth_lesion_contrast, "camera_shift": data.synth_camera_shift}
