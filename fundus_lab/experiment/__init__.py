"""The experiment layer, at the top of the package: a :class:`Run` (configs, checkpoints,
cached evaluations) and the tables every notebook and ``fundus-lab compare`` share.

    import fundus_lab as fl
    run = fl.Run("default", "runs/default", overrides=["method.mask_ratio=0.5"])
    run.evaluate("ours", "few_shot")                  # every test column at once; cached by key
    fl.experiment.compare(run, ["clip", "ours"])      # Tables 1 and 2

Its modules, from the ground up: ``store`` (hashes, JSON), ``configs`` (the final config
of a run's row, runtime settings), ``datasets`` (the one dataset-root rule, splits),
``protocols`` (the evaluation protocols and :func:`evaluate_model`), ``references`` (the
reference rows), ``pretraining`` (the cache and parallel pretraining), ``notebook``
(``runs/latest``, what a missing checkpoint would cost), ``run`` (:class:`Run`) and
``table`` (:func:`compare` and the table files). Nothing below imports this layer.
"""

from fundus_lab.experiment.configs import (apply_runtime, checkpoint_eval_config, device, normalise_overrides,
                                           resolve_run_config)
from fundus_lab.experiment.datasets import dataset_root, ensure_synthetic, open_split
from fundus_lab.experiment.notebook import (DEFAULT_METHODS, LATEST, CheckpointMissing, latest_run,
                                            write_latest)
from fundus_lab.experiment.pretraining import jobs_overrides, pretrain_cached, threads_per_job
from fundus_lab.experiment.protocols import COLUMNS, DEFAULT_PROTOCOLS, PROTOCOLS, TABLES, Protocol, evaluate_model
from fundus_lab.experiment.references import REFERENCES, PixelFeatures, Reference
from fundus_lab.experiment.run import Run
from fundus_lab.experiment.store import KEY_FILE, external_fingerprint, read_json, write_json
from fundus_lab.experiment.table import compare, shot_curve_rows, write_explanation_scores, write_results

__all__ = [
    "COLUMNS", "DEFAULT_METHODS", "DEFAULT_PROTOCOLS", "KEY_FILE", "LATEST", "PROTOCOLS", "REFERENCES",
    "TABLES", "CheckpointMissing", "PixelFeatures", "Protocol", "Reference", "Run", "apply_runtime",
    "checkpoint_eval_config", "compare", "device",
    "dataset_root", "ensure_synthetic", "evaluate_model", "external_fingerprint", "jobs_overrides", "latest_run",
    "normalise_overrides", "open_split", "pretrain_cached", "read_json", "resolve_run_config", "shot_curve_rows",
    "threads_per_job", "write_explanation_scores", "write_json", "write_latest", "write_results",
]
