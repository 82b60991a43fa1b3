"""Evaluation: zero-shot, few-shot, linear probe, fine-tuning, metrics and Table 1.

    import fundus_lab as fl
    fl.eval.zero_shot(model, ds)                      # prompts from the knowledge base
    fl.eval.few_shot(model, train_ds, test_ds, shots=(1, 2, 4, 8, 16), seeds=5)   # linear probe, frozen
    fl.eval.few_shot_fine_tune(model, train_ds, val_ds, test_ds)   # the paper's: k-shot fine-tuning
    fl.eval.linear_probe(model, train_ds, test_ds, val_ds)
    fl.eval.fine_tune(model, train_ds, val_ds, test_ds)
    fl.eval.metrics.quadratic_weighted_kappa(y_true, y_pred)
    fl.eval.explain.lesion_attention_summary({"ours": model}, ds)   # attention vs lesion masks

The protocol functions and metrics only: it imports nothing above it. Running a protocol
as the tables do, and the tables themselves, are the experiment layer's
(``fl.experiment.evaluate_model``, ``fl.experiment.compare``).
"""

from fundus_lab.eval import explain, metrics, prompts
from fundus_lab.config import EvalConfig
from fundus_lab.eval.features import extract_features
from fundus_lab.eval.few_shot import few_shot, few_shot_fine_tune, sample_few_shot
from fundus_lab.eval.fine_tune import fine_tune
from fundus_lab.eval.honesty import LeakageError, assert_disjoint, write_split_file
from fundus_lab.eval.metrics import bootstrap_ci, compute_metrics, quadratic_weighted_kappa
from fundus_lab.eval.probe import linear_probe
from fundus_lab.eval.tables import write_table
from fundus_lab.eval.zero_shot import ZeroShotUnavailable, class_embeddings, zero_shot

__all__ = [
    "EvalConfig", "LeakageError", "ZeroShotUnavailable", "assert_disjoint", "bootstrap_ci", "class_embeddings",
    "compute_metrics", "explain", "extract_features", "few_shot", "few_shot_fine_tune",
    "fine_tune", "linear_probe", "metrics", "prompts", "quadratic_weighted_kappa", "sample_few_shot",
    "write_split_file", "write_table", "zero_shot",
]
