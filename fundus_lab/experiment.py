"""One experiment (a ``Run``): the configs, checkpoints and evaluations every notebook and
``fundus-lab compare`` share, and the registries of protocols and reference rows.

    run = Run("default", "runs/default", overrides=["method.mask_ratio=0.5"])
    run.config("ours")                    # resolve_config(preset, method, overrides): the one way
    run.checkpoint("eva")                 # pretrains the clip teacher first, then eva; cached
    run.evaluate("ours", "few_shot")      # every test column at once; cached by key
    run.table(["clip", "ours"])           # Tables 1 and 2: methods + reference rows x protocol x column
    run.add_external("biomedclip", "ckpt/")  # an outside model (fl.load_model reads it) joins the table

Adding a protocol or a reference row touches one place: :data:`PROTOCOLS` or :data:`REFERENCES`.
An outside model is registered on the run, not in a registry: it is evaluated like a method,
once (it is not pretrained here), keyed by a hash of its files.

Layout of ``run_dir``::

    pretrain/<method>/seed<s>/             pretraining run (config.yaml, split.csv, checkpoint-last/),
                              cache_key.json  hash of its inputs; an unchanged run is not redone
    eval/<method>/seed<s>/<protocol>.json  metrics, test predictions, key, config, split files
                                           (an outside model: eval/<name>/seed<first seed>/)
    eval/<method>/seed<s>/splits/          the exact samples each evaluation saw
    pretrain/eva-teacher/seed<s>/          EVA's CLIP teacher when it trains other steps than the clip row
                                           (train.budget=flops)
    splits/<dataset>.json                  one split assignment per dataset, shared by every method
    table1.{csv,md,tex}, table2.{csv,md,tex}, pairs.{csv,md}, table2_pairs.{csv,md},
    few_shot.{csv,md,tex}, results.json

Table 1 holds the paper's protocols (each ``Protocol.table`` names its table): zero-shot on the seen classes with
the knowledge-base prompts, few-shot by fine-tuning with k images per class, fine-tuning.
Table 2 holds the field's linear probe and two zero-shot columns that measure transfer
(prompts pretraining never read; diseases pretraining never named). Each has a pairs table
(paired verdicts over pretraining seeds and test images, :mod:`fundus_lab.eval.seeds`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace  # noqa: F401  (tests swap a protocol's function)
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fundus_lab import config as C

# Table 1's two test columns: (key, split name, header). Real datasets have only `test`.
COLUMNS = (("in_domain", "test", "in-domain"), ("held_out_camera", "test_camera", "held-out camera"))
KEY_FILE = "cache_key.json"  # fundus_lab.train.RUN_BOOKKEEPING names it too
METRIC_NAMES = {"single_label_accuracy": "single-label acc.", "accuracy": "acc.", "kappa": "QW kappa", "auc": "AUC",
                "balanced_accuracy": "bal. acc."}


# ---------------------------------------------------------------------------------------
# determinism


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


# ---------------------------------------------------------------------------------------
# hashing and JSON


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    return obj


def write_json(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # processes of one launch may write the same file
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------
# data


def dataset_root(cfg: "C.Config", name: str, data_root: str | None = None) -> str | None:
    """``<synth root>/<name>`` for synthetic sets, else ``data_root/<name>`` (or ``data_root``)."""
    if name.startswith("synth-"):
        return str(C.resolve_path(data_root or cfg.data.synth_root) / name)
    if data_root is None:
        return None
    return str(Path(data_root) / name) if (Path(data_root) / name).is_dir() else str(data_root)


def ensure_synthetic(cfg: "C.Config", names: Sequence[str] = (), data_root: str | None = None) -> Path:
    """Write the configured synthetic benchmark when any of ``names`` is synthetic (all when empty)."""
    root = C.resolve_path(data_root or cfg.data.synth_root)
    if names and not any(n.startswith("synth-") for n in names):
        return root
    from fundus_lab.data import synth

    synth.generate_benchmark(str(root), workers=None, **synth.benchmark_options(cfg.data))
    return root


def open_split(cfg: "C.Config", name: str, split: str, image_size: int, data_root=None, augment: bool = False,
               split_dir: str | Path | None = None):
    """One split of dataset ``name``; with ``split_dir`` the assignment is kept in
    ``split_dir/<name>.json`` so every method sees the same split. A split the reader does
    not name (``test_camera``) is taken from the records' own split column."""
    from fundus_lab.data import open_dataset

    split_file = Path(split_dir) / f"{Path(name).stem}.json" if split_dir is not None else None
    kw = dict(root=dataset_root(cfg, name, data_root), image_size=image_size, augment=augment,
              skip_bad=cfg.data.skip_bad_images, split_file=split_file,
              image_cache=cfg.data.image_cache, image_cache_dir=cfg.data.image_cache_dir)
    try:
        return open_dataset(name, split=split, **kw)
    except ValueError as err:
        if f"split={split!r}" not in str(err):
            raise
    everything = open_dataset(name, split="all", **kw)
    keep = [i for i, r in enumerate(everything.records) if r.split == split]
    if not keep:
        from fundus_lab.data import DataError

        raise DataError(f"dataset {name!r} has no {split!r} records")
    ds = everything.subset(keep)
    ds.split = split
    return ds


def split_names(cfg: "C.Config", name: str, data_root=None, split_dir=None) -> set[str]:
    """The split names dataset ``name`` holds (e.g. {train, val, test, test_camera})."""
    ds = open_split(cfg, name, "all", cfg.model.img_size, data_root, split_dir=split_dir)
    return {r.split for r in ds.records}


def manifest_hash(ds) -> str:
    for c in (getattr(getattr(ds, "manifest", None), "path", None), getattr(ds, "root", None)):
        if c is not None:
            c = Path(c) if Path(c).is_file() else Path(c) / "manifest.yaml"
            if c.is_file():
                return sha256_file(c)
    return sha256_json(repr(getattr(ds, "manifest", None)))


def record_splits(datasets: Mapping[str, Any], folder: Path, name: str) -> dict:
    """Each split's sample list as ``folder/<name>-<split>.csv``; {split: {file, sha256, n}}."""
    from fundus_lab.eval.honesty import write_split_file

    out = {}
    for split in sorted(datasets):
        path = folder / f"{name}-{split}.csv"
        out[split] = {"file": str(path), "sha256": write_split_file(datasets[split], path), "n": len(datasets[split])}
    return out


# ---------------------------------------------------------------------------------------
# metrics of a Table 1 cell


SINGLE_LABEL_PROTOCOLS = ("zero_shot", "zero_shot_disjoint", "zero_shot_unseen", "linear_probe", "linear_probe_full")


def table_metric(task: str, protocol: str) -> str:
    """The number a table shows: ODIR zero-shot or linear probe -> single-label accuracy; grades -> kappa."""
    if task == "multilabel":  # the ODIR-like figure: accuracy over the single-label eyes
        return "single_label_accuracy" if protocol in SINGLE_LABEL_PROTOCOLS else "auc"
    return {"ordinal": "kappa", "binary": "auc"}.get(task, "accuracy")


def metric_fn(task: str, metric: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """fn(y_true, probs) of the table metric (what is bootstrapped for the CI)."""
    from fundus_lab.eval.metrics import accuracy, metric_functions

    if metric == "single_label_accuracy":
        def single(y, p):
            keep = y.sum(1) == 1
            return accuracy(y[keep].argmax(1), p[keep].argmax(1)) if keep.any() else float("nan")
        return single
    fns = metric_functions(task, n_classes)
    if metric not in fns:
        raise ValueError(f"metric {metric!r} is not defined for task {task!r} ({sorted(fns)})")
    return fns[metric]


def chance_level(metric: str, n_classes: int) -> float:
    """What a guess scores: 1/C for (balanced) accuracy, 0 for kappa, 0.5 for AUC."""
    return {"kappa": 0.0, "auc": 0.5}.get(metric, 1.0 / max(1, n_classes))


def bootstrap_cell(task: str, metric: str, n_classes: int, labels, probs_per_run: Sequence, n: int,
                   seed: int = 0) -> list[float]:
    """95 % percentile CI of the mean over runs, resampling test images (the same draw for
    every run, so runs that share a test set are not treated as independent samples)."""
    if not probs_per_run or n <= 0:
        return [float("nan"), float("nan")]
    fn = metric_fn(task, metric, n_classes)
    y = np.asarray(labels)
    probs = [np.asarray(p, dtype=np.float64) for p in probs_per_run]
    rng = np.random.default_rng(seed)
    stats = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n):
            idx = rng.integers(0, len(y), len(y))
            stats.append(float(np.mean([fn(y[idx], p[idx]) for p in probs])))
    stats = np.asarray(stats)
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------
# protocols: what runs on which dataset, scoring every test column from one fit


@dataclass
class Fit:
    """What a protocol hands back: per test column, the test predictions of each run."""

    predictions: dict = field(default_factory=dict)  # column -> [probs per run]
    labels: dict = field(default_factory=dict)  # column -> labels
    result: dict = field(default_factory=dict)  # in-domain details (notebooks read these)
    available: bool = True


def _zero_shot(model, sets, cfg, cache_dir, prompts: Callable | None = None) -> Fit:
    """Zero-shot on every test column; ``prompts(test)`` gives the class prompts (default:
    the knowledge base's ensembles, which hold the sentences pretraining paired with images)."""
    from fundus_lab.eval.zero_shot import ZeroShotUnavailable, zero_shot

    fit = Fit()
    for column, test in sets["tests"].items():
        try:
            r = zero_shot(model, test, prompts=prompts(test) if prompts else None, batch_size=cfg.eval.batch_size,
                          bootstrap=0, cache_dir=cache_dir, progress=cfg.eval.progress)
        except ZeroShotUnavailable as err:
            return Fit(available=False, result={"reason": str(err)})
        fit.predictions[column], fit.labels[column] = [r["probs"]], r["labels"]
        if column == "in_domain":
            fit.result = {"metrics": r["metrics"], "prompts": r["prompts"], "labels": r["labels"], "probs": r["probs"]}
    return fit


def _zero_shot_disjoint(model, sets, cfg, cache_dir) -> Fit:
    """Zero-shot on the same classes from prompts no pretraining text holds (:mod:`fundus_lab.eval.prompts`)."""
    from fundus_lab.eval.prompts import dataset_disjoint_prompts

    return _zero_shot(model, sets, cfg, cache_dir, prompts=dataset_disjoint_prompts)


def _zero_shot_unseen(model, sets, cfg, cache_dir) -> Fit:
    """Zero-shot on diseases pretraining never named (``eval.unseen_dataset``), from their
    knowledge-base entries: the dataset's own class prompts."""
    return _zero_shot(model, sets, cfg, cache_dir)


def _table_k(ecfg) -> int:
    """The k the tables show (``eval.few_shot_k``, else the largest of ``eval.shots``)."""
    k = ecfg.few_shot_k or max(ecfg.shots)
    if k not in ecfg.shots:
        raise C.ConfigError(f"eval.few_shot_k = {k} is not one of eval.shots = {list(ecfg.shots)}")
    return k


def _can_fine_tune(model) -> bool:
    return hasattr(getattr(model, "image_encoder", None), "blocks")  # layer-wise lr decay needs the ViT blocks


def _no_blocks(model) -> Fit:
    return Fit(available=False, result={"reason": f"{type(model).__name__}: the image tower has no "
                                                  "transformer blocks to fine-tune with layer-wise lr decay"})


def _fine_tune_recipe(ecfg) -> dict:
    """The fine-tune column's optimiser settings, shared by the k-shot fine-tuning."""
    return dict(lr=ecfg.fine_tune_lr, layer_decay=ecfg.fine_tune_layer_decay, weight_decay=ecfg.fine_tune_weight_decay,
                batch_size=ecfg.fine_tune_batch_size, class_balanced=ecfg.fine_tune_class_balanced)


def _augmented(train, augment: bool):
    train_aug = train.subset(range(len(train)))
    train_aug.augment = augment
    return train_aug


def _few_shot_fine_tune_seeds(ecfg) -> int:
    """How many k-shot draws are fine-tuned per k: ``eval.few_shot_fine_tune_seeds``, else ``eval.seeds``."""
    n = ecfg.few_shot_fine_tune_seeds if ecfg.few_shot_fine_tune_seeds is not None else ecfg.seeds
    if n < 1:
        raise C.ConfigError(f"eval.few_shot_fine_tune_seeds = {n}: fine-tune at least one k-shot draw per k")
    return n


def _few_shot(model, sets, cfg, cache_dir) -> Fit:
    """Table 1's few-shot, the paper's protocol: the image encoder fine-tuned with k labelled
    images per class (the fine-tune recipe), ``eval.few_shot_fine_tune_seeds`` draws per k
    (the first of the probe's draws: the same images). The curve over
    ``eval.shots`` is scored on in-domain test; the table's k on every column."""
    from fundus_lab.eval.few_shot import few_shot_fine_tune

    ecfg = cfg.eval
    if not _can_fine_tune(model):
        return _no_blocks(model)
    k = _table_k(ecfg)
    others = {c: t for c, t in sets["tests"].items() if c != "in_domain"}
    r = few_shot_fine_tune(model, _augmented(sets["train"], ecfg.fine_tune_augment), sets["val"],
                           sets["tests"]["in_domain"], shots=ecfg.shots, seeds=_few_shot_fine_tune_seeds(ecfg),
                           score_at=k, other_tests=others, epochs=ecfg.few_shot_epochs,
                           patience=ecfg.few_shot_patience, progress=ecfg.progress, **_fine_tune_recipe(ecfg))
    fit = Fit(result={"shots": r["shots"], "task": r["task"], "classes": r["classes"], "k": k})
    for column in sets["tests"]:
        name = "test" if column == "in_domain" else column
        fit.predictions[column], fit.labels[column] = r["predictions"][name], r["labels"][name]
    return fit


def _linear_probe(model, sets, cfg, cache_dir) -> Fit:
    """Table 2's linear probe, the field's convention: logistic regression on frozen features
    of k images per class (and the prompt-initialised head), the curves (``few_shot``) on
    in-domain test, the table's k scored on every column."""
    from fundus_lab.eval.features import extract_features
    from fundus_lab.eval.few_shot import few_shot, sample_few_shot
    from fundus_lab.eval.probe import fit_probe

    ecfg = cfg.eval
    k = _table_k(ecfg)
    train, val, task = sets["train"], sets["val"], sets["task"]
    curves = few_shot(model, train, sets["tests"]["in_domain"], shots=ecfg.shots, seeds=ecfg.seeds, val_ds=val,
                      features=ecfg.few_shot_features, head_steps=ecfg.few_shot_head_steps,
                      prompt_head=_has_text(model), batch_size=ecfg.batch_size, cache_dir=cache_dir,
                      progress=ecfg.progress)
    kw = dict(kind=ecfg.few_shot_features, batch_size=ecfg.batch_size, cache_dir=cache_dir, progress=ecfg.progress)
    tx, ty = extract_features(model, train, **kw)
    vx, vy = extract_features(model, val, **kw)
    tests = {c: extract_features(model, t, **kw) for c, t in sets["tests"].items()}
    fit = Fit(result=curves)
    n_classes = len(sets["classes"])
    for seed in range(ecfg.seeds):  # the same draws as few_shot's own (seeded by seed)
        idx = sample_few_shot(ty, k, seed)
        val_idx = sample_few_shot(vy, max(k, 4), seed + 10_000)
        probe, _ = fit_probe(tx[idx], ty[idx], vx[val_idx], vy[val_idx], task, n_classes)
        for column, (x, y) in tests.items():
            fit.predictions.setdefault(column, []).append(probe.predict_proba(x))
            fit.labels[column] = y
    return fit


def _linear_probe_full(model, sets, cfg, cache_dir) -> Fit:
    """A linear probe on the whole training split (C chosen on val); in no default table."""
    from fundus_lab.eval.features import extract_features
    from fundus_lab.eval.probe import fit_logistic, fit_probe

    kw = dict(kind=cfg.eval.few_shot_features, batch_size=cfg.eval.batch_size, cache_dir=cache_dir,
              progress=cfg.eval.progress)
    tx, ty = extract_features(model, sets["train"], **kw)
    vx, vy = extract_features(model, sets["val"], **kw)
    n_classes = len(sets["classes"])
    _, info = fit_probe(tx, ty, vx, vy, sets["task"], n_classes)
    probe = fit_logistic(tx, ty, sets["task"], n_classes, info["C"])
    fit = Fit(result={"C": info["C"], "val_scores": info["val"]})
    for column, test in sets["tests"].items():
        x, y = extract_features(model, test, **kw)
        fit.predictions[column], fit.labels[column] = [probe.predict_proba(x)], y
    return fit


def _fine_tune(model, sets, cfg, cache_dir, save_classifier: str | Path | None = None) -> Fit:
    """Fine-tune over ``eval.fine_tune_seeds``; ``save_classifier``: a folder for the run with the
    best validation score (``fundus-lab predict`` reads it)."""
    from fundus_lab.eval.fine_tune import fine_tune, predict

    ecfg = cfg.eval
    if not _can_fine_tune(model):
        return _no_blocks(model)
    train_aug = _augmented(sets["train"], ecfg.fine_tune_augment)
    fit, runs, best = Fit(), [], None
    for seed in range(ecfg.fine_tune_seeds):
        r = fine_tune(model, train_aug, sets["val"], sets["tests"]["in_domain"], epochs=ecfg.fine_tune_epochs,
                      patience=ecfg.fine_tune_patience, seed=seed, bootstrap=0, return_model=True,
                      progress=ecfg.progress, **_fine_tune_recipe(ecfg))
        classifier = r.pop("model")
        for column, test in sets["tests"].items():
            probs, labels = (r["probs"], r["labels"]) if column == "in_domain" else \
                predict(classifier, test, sets["task"], ecfg.fine_tune_batch_size)
            fit.predictions.setdefault(column, []).append(probs)
            fit.labels[column] = labels
        runs.append({"seed": seed, "metrics": r["metrics"], "best_epoch": r["best_epoch"], "best_val": r["best_val"],
                     "selection_metric": r["selection_metric"], "history": r["history"],
                     "labels": r["labels"], "probs": r["probs"]})  # test predictions: confusion matrices
        if save_classifier is not None and (best is None or r["best_val"] > best[0]):
            best = (r["best_val"], seed, classifier, r["metrics"])
        del classifier
    fit.result = {"runs": runs}
    if best is not None:
        from fundus_lab.predict import save_classifier as write_classifier

        train = sets["train"]
        write_classifier(best[2], save_classifier, sets["classes"], sets["task"], image_size=train.image_size,
                         extra={"seed": best[1], "best_val": best[0], "test_metrics": best[3],
                                "dataset": str(getattr(train, "name", "") or "")})
        fit.result["classifier"] = str(save_classifier)
    return fit


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: where its data comes from, what settings change its result,
    the function that runs it and the Table 1 header."""

    name: str
    header: str  # "{k}" is filled with the few-shot k
    dataset_key: str  # EvalConfig field naming the dataset
    settings: tuple[str, ...]  # EvalConfig fields that change its result (part of the cache key)
    run: Callable[..., Fit]
    needs_training_split: bool = True
    table: str = "table1"  # the table its columns go in (TABLES)


_COMMON = ("batch_size", "bootstrap")
_RECIPE = ("fine_tune_lr", "fine_tune_layer_decay", "fine_tune_weight_decay", "fine_tune_batch_size",
           "fine_tune_class_balanced", "fine_tune_augment")
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    # Table 1: the paper's protocols
    Protocol("zero_shot", "Zero-shot", "zero_shot_dataset", _COMMON, _zero_shot, needs_training_split=False),
    Protocol("few_shot", "Few-shot fine-tune k={k}", "few_shot_dataset",
             _COMMON + ("shots", "seeds", "few_shot_k", "few_shot_epochs", "few_shot_patience",
                        "few_shot_fine_tune_seeds") + _RECIPE, _few_shot),
    Protocol("fine_tune", "Fine-tune", "fine_tune_dataset",
             _COMMON + ("fine_tune_seeds", "fine_tune_epochs", "fine_tune_patience") + _RECIPE, _fine_tune),
    # Table 2: the field's linear probe, and zero-shot transfer beyond the paper
    Protocol("linear_probe", "Linear probe k={k}", "few_shot_dataset",
             _COMMON + ("shots", "seeds", "few_shot_k", "few_shot_features", "few_shot_head_steps"), _linear_probe,
             table="table2"),
    Protocol("zero_shot_disjoint", "Zero-shot, disjoint prompts", "zero_shot_dataset", _COMMON, _zero_shot_disjoint,
             needs_training_split=False, table="table2"),
    Protocol("zero_shot_unseen", "Zero-shot, unseen diseases", "unseen_dataset", _COMMON, _zero_shot_unseen,
             needs_training_split=False, table="table2"),
    Protocol("linear_probe_full", "Linear probe, full training split", "few_shot_dataset",
             _COMMON + ("few_shot_features",), _linear_probe_full, table="table2"),
)}
TABLES = ("table1", "table2")
DEFAULT_PROTOCOLS = ("zero_shot", "few_shot", "fine_tune", "linear_probe", "zero_shot_disjoint", "zero_shot_unseen")


def _has_text(model) -> bool:
    from fundus_lab.eval.zero_shot import has_text_encoder

    return has_text_encoder(model)


# ---------------------------------------------------------------------------------------
# reference rows: the floor, the ceiling and the pixels, measured by the same protocols


class PixelFeatures(torch.nn.Module):
    """Downsampled pixels as features: ``image_features`` / ``encode_image`` of a model with no
    weights (area-averaged to ``side`` x ``side``), so the probes run on it unchanged."""

    def __init__(self, side: int = 16):
        super().__init__()
        self.register_buffer("side", torch.tensor(int(side)))  # in the fingerprint: the cache key

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        s = int(self.side)
        x = torch.nn.functional.adaptive_avg_pool2d(images, (s, s)).flatten(1)  # [N, 3*s*s]
        return {"cls": x}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.image_features(images)["cls"], dim=-1)


def _initial_model(mcfg: "C.Config"):
    """(model at the seeded initial weights pretraining starts from, the pretraining split)."""
    from accelerate.utils import set_seed

    from fundus_lab.train import build_run_model, open_training_data, prepare_tokenizer

    run_dir = Path(mcfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(mcfg.train.seed)
    dataset = open_training_data(mcfg)
    tokenizer = prepare_tokenizer(mcfg, dataset, run_dir)
    set_seed(mcfg.train.seed)
    return build_run_model(mcfg, tokenizer), dataset


def _build_random_init(run: "Run", mcfg: "C.Config", out: Path) -> None:
    model, dataset = _initial_model(mcfg)
    model.save_pretrained(out)


def _build_supervised(run: "Run", mcfg: "C.Config", out: Path) -> None:
    """The same image encoder from random init, trained on the pretraining images' labels for
    the pretraining budget of images seen (epochs = steps x batch / training images)."""
    from fundus_lab.eval.fine_tune import fine_tune

    model, dataset = _initial_model(mcfg)
    root = mcfg.data.root or run.data_root
    from fundus_lab.eval.probe import holdout_indices

    # the pretraining set's own val split, halved by patient: one half picks the epoch, the
    # other is scored (fine_tune wants a test set; no evaluation test split is touched)
    val = open_split(mcfg, mcfg.data.dataset, "val", mcfg.model.img_size, root)
    pick, score = holdout_indices(val, fraction=0.5, seed=mcfg.train.seed)
    if len(pick) == 0 or len(score) == 0:
        raise ValueError(f"the supervised reference picks its epoch and scores on halves of {mcfg.data.dataset}'s val "
                         f"split by patient, which needs at least 2 patients there (found {len(val)} images of one); "
                         "use a larger data.synth_n")
    val, score = val.subset(pick), val.subset(score)
    seen = mcfg.train.steps * mcfg.train.batch_size * mcfg.train.grad_accum_steps
    epochs = max(1, math.ceil(seen / len(dataset)))
    r = fine_tune(model, dataset, val, score, epochs=epochs, lr=mcfg.train.lr, layer_decay=1.0,
                  weight_decay=mcfg.train.weight_decay, batch_size=mcfg.train.batch_size, patience=epochs,
                  seed=mcfg.train.seed, return_model=True)
    model = r["model"].backbone
    model.save_pretrained(out)
    write_json(Path(mcfg.train.output_dir) / "supervised.json",
               {"epochs": epochs, "images_seen": epochs * len(dataset), "budget_images": seen,
                "best_epoch": r["best_epoch"], "val": r["best_val"], "selection_metric": r["selection_metric"],
                "history": r["history"]})


@dataclass(frozen=True)
class Reference:
    """A reference row: how its checkpoint is made and which protocols apply to it."""

    name: str
    architecture: str | None  # the method whose model it builds (None: no model, pixels)
    build: Callable[["Run", "C.Config", Path], None] | None
    protocols: tuple[str, ...]  # where a protocol is missing the cell is n/a
    note: str
    trains: bool = True  # building it trains a model (False: it only saves initial weights, seconds)


REFERENCES: dict[str, Reference] = {r.name: r for r in (
    Reference("random-init", "clip", _build_random_init, tuple(PROTOCOLS),
              "untrained encoders (the floor)", trains=False),
    Reference("supervised", "clip", _build_supervised, ("few_shot", "fine_tune", "linear_probe", "linear_probe_full"),
              "the same image encoder trained on the pretraining images' labels, same images seen; no text tower"),
    Reference("pixels", None, None, ("linear_probe", "linear_probe_full"),
              "a linear probe on 16 x 16 area-averaged pixels"),
)}


# ---------------------------------------------------------------------------------------
# outside models: rows of the table that this run does not pretrain

def external_fingerprint(path: str | Path) -> str:
    """SHA-256 over the files an outside model is read from, by name and content: every file
    of its folder (hidden ones aside), or a weights file and the JSON configs beside it.
    A changed file changes the key, so its evaluations are redone."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    files = ([f for f in sorted(path.rglob("*")) if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts)] if path.is_dir()
        else [path, *sorted(f for f in root.glob("*.json") if f.is_file())])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root)}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# the experiment


class Run:
    """One experiment: a preset, overrides, a run folder and the data root.

    Args:
        preset: ``smoke`` | ``default`` | ``paper``.
        run_dir: where pretraining runs, evaluations and tables go.
        data_root: the synthetic benchmark's folder (and where real datasets are found);
            None = the preset's ``data.synth_root`` (relative paths are from the project root).
        overrides: ``key=value`` (list or mapping) for every config of the run.
        force: redo cached pretraining and evaluations.
    """

    def __init__(self, preset: str = "default", run_dir: str | Path | None = None, data_root: str | Path | None = None,
                 overrides: Sequence[str] | Mapping[str, Any] | None = None, force: bool = False,
                 path: str | Path | None = None):
        self.preset, self.path, self.force = preset, path, force
        self.overrides = normalise_overrides(overrides)
        base = C.resolve_config(preset, overrides=self.overrides, path=path)
        self.preset = base.preset
        self.data_root = str(C.resolve_path(data_root if data_root is not None else base.data.synth_root))
        self.run_dir = C.resolve_path(run_dir if run_dir is not None else base.eval.output_dir.format(preset=self.preset))
        apply_runtime(base)  # notebooks' own inference (attention, embeddings) runs under the same settings
        self._models: dict = {}
        self._checkpoints: dict = {}
        self.externals: dict[str, Path] = {}  # outside models: name -> path (add_external)

    # outside models ----------------------------------------------------------------------

    def add_external(self, name: str, path: str | Path) -> Path:
        """Register an outside model as the table row ``name``: anything ``fl.load_model``
        reads (a Hugging Face CLIP folder, an open_clip checkpoint, another run's checkpoint).

        It is evaluated by the same protocols, splits and cache layout as a method, once
        (``eval/<name>/seed<first pretraining seed>/``): it is not pretrained here. The name
        must not be a method's or a reference row's; the path must exist. Returns the path.
        """
        name = C.check_name(str(name), "external model name")  # it names the folder eval/<name>/
        taken = "method" if name in C.available_methods() else "reference row" if name in REFERENCES else None
        if taken:
            raise C.ConfigError(f"external model name {name!r} is the name of a {taken}; give the outside model "
                                "another name")
        path = Path(path).expanduser().absolute()
        if not path.exists():
            raise C.ConfigError(f"external model {name!r}: {path} does not exist")
        if self.externals.get(name, path) != path:
            raise C.ConfigError(f"external model {name!r} is already {self.externals[name]}; not also {path}")
        self.externals[name] = path
        return path

    def seeds_of(self, method: str) -> list[int]:
        """The pretraining seeds ``method`` is evaluated for: all of them, or the first for an
        outside model (one set of weights, not pretrained here)."""
        seeds = self.seeds()
        return seeds[:1] if method in self.externals else seeds

    # configs -----------------------------------------------------------------------------

    def config(self, method: str | None = None, seed: int | None = None) -> "C.Config":
        """The run's config (for ``method`` and pretraining ``seed``): :func:`fundus_lab.config.resolve_config`."""
        if method in self.externals:  # evaluated under the run's settings; no pretraining config
            return self.config(None, seed)
        ref = REFERENCES.get(method) if method else None
        arch = ref.architecture if ref else method
        cfg = C.resolve_config(self.preset, arch, self.overrides, path=self.path, seed=seed,
                               synth_root=self.data_root)
        if method is not None:
            cfg.method.name = method if ref is None else cfg.method.name
            cfg.train.output_dir = str(self.run_dir / "pretrain" / method / f"seed{cfg.train.seed}")
        if cfg.data.dataset.startswith("synth-"):
            cfg.data.root = None
        return cfg

    def seeds(self) -> list[int]:
        return [int(s) for s in self.config().eval.pretrain_seeds]

    # checkpoints -------------------------------------------------------------------------

    def checkpoint(self, method: str, seed: int | None = None, callbacks: Iterable = ()) -> Path:
        """``checkpoint-last`` of ``method`` (a method or a reference row), made on first use.

        ``eva`` (any method whose image-generation target is a teacher) first gets a ``clip``
        teacher trained under the same budget and seed.
        """
        seed = self.seeds()[0] if seed is None else int(seed)
        if (method, seed) in self._checkpoints and not callbacks:  # already made (or checked) in this Run
            return self._checkpoints[(method, seed)]
        if method in self.externals:
            path = self.externals[method]
        elif method in REFERENCES:
            path = self._reference_checkpoint(method, seed)
        else:
            path = self._pretrained_checkpoint(method, seed, callbacks)
        self._checkpoints[(method, seed)] = path
        return path

    def _pretrained_checkpoint(self, method: str, seed: int, callbacks: Iterable) -> Path:
        mcfg = self.config(method, seed)
        apply_runtime(mcfg)
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        if needs_teacher(mcfg):
            mcfg.method.teacher_checkpoint = str(self._teacher_checkpoint(method, mcfg))
        return pretrain_cached(mcfg, self.force, callbacks=tuple(callbacks)) / "checkpoint-last"

    def _teacher_checkpoint(self, method: str, mcfg: "C.Config") -> Path:
        """EVA's CLIP teacher: the clip row's own checkpoint when it trains the same steps
        (``train.budget: steps``), else (``flops``: ``train.teacher_steps``) a clip run of its
        own in ``pretrain/<method>-teacher/seed<s>``."""
        from fundus_lab.budget import TEACHER_METHOD

        seed, steps = mcfg.train.seed, mcfg.train.teacher_steps
        if steps is None or steps == self.config(TEACHER_METHOD, seed).train.steps:
            return self.checkpoint(TEACHER_METHOD, seed)
        tcfg = C.resolve_config(self.preset, TEACHER_METHOD, {**self.overrides, "train.budget": "steps",
                                                              "train.steps": steps},
                                path=self.path, seed=seed, synth_root=self.data_root)
        tcfg.train.output_dir = str(self.run_dir / "pretrain" / f"{method}-teacher" / f"seed{seed}")
        if tcfg.data.dataset.startswith("synth-"):
            tcfg.data.root = None
        apply_runtime(tcfg)
        return pretrain_cached(tcfg, self.force) / "checkpoint-last"

    def _reference_checkpoint(self, name: str, seed: int | None) -> Path:
        ref = REFERENCES[name]
        mcfg = self.config(name, seed)
        run_dir = Path(mcfg.train.output_dir)
        out = run_dir / "checkpoint-last"
        if ref.build is None:
            return out
        apply_runtime(mcfg)
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        key = _reference_key(name, mcfg)
        if self.force or not _finished(run_dir, key):
            write_json(run_dir / KEY_FILE, {"key": key, "complete": False})
            C.save_config(mcfg, _mkdir(run_dir) / "config.yaml")
            start = time.time()
            ref.build(self, mcfg, out)
            write_json(run_dir / KEY_FILE, {"key": key, "complete": True, "seconds": time.time() - start})
        return out

    def pretraining_waves(self, rows: Sequence[str]) -> list[list[tuple[str, int]]]:
        """The (row, seed) trainings of ``rows`` (methods and trained reference rows; outside
        models and the pixel row train nothing), in waves whose jobs do not depend on each
        other: a method that distils a teacher (``eva``) waits for the wave holding its
        ``clip`` teacher of the same seed, which joins the first wave if not listed."""
        first, second = [], []
        for row in dict.fromkeys(rows):
            if row in self.externals or (row in REFERENCES and REFERENCES[row].build is None):
                continue
            for seed in self.seeds_of(row):
                if row not in REFERENCES and needs_teacher(self.config(row, seed)):
                    second.append((row, seed))
                    first.append(("clip", seed))
                else:
                    first.append((row, seed))
        first = list(dict.fromkeys(first))
        return [wave for wave in (first, [job for job in second if job not in first]) if wave]

    def pretrain_parallel(self, rows: Sequence[str], jobs: int) -> dict[tuple[str, int], Path]:
        """Pretrain every (row, seed) of ``rows`` in ``jobs`` processes at once, before anything
        needs the models (:meth:`pretraining_waves` orders teachers first).

        Each job is what :meth:`checkpoint` would do in this process: the same config, cache
        key and code, so its checkpoint is byte-identical to a sequential run's. Each process
        runs ``train.num_threads`` threads (the CLI's ``--jobs N`` sets it to cores / N); on a
        machine with several GPUs job ``i`` sees GPU ``i mod jobs`` only. The synthetic data is
        written here first, so jobs never write it at once. ``jobs`` = 1 does nothing: the
        checkpoints are then made when first used, as always. Returns the checkpoints made.
        """
        if jobs < 1:
            raise C.ConfigError(f"jobs={jobs}: expected 1 or more pretraining processes")
        if jobs == 1:
            return {}
        import concurrent.futures
        import multiprocessing

        waves = self.pretraining_waves(rows)
        for row, seed in (job for wave in waves for job in wave):
            cfg = self.config(row, seed)
            ensure_synthetic(cfg, [cfg.data.dataset], self.data_root)
        spec = {"preset": self.preset, "run_dir": str(self.run_dir), "data_root": self.data_root,
                "overrides": self.overrides, "force": self.force, "path": self.path}
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        made: dict[tuple[str, int], Path] = {}
        for wave in waves:
            slots = context.Queue()
            for slot in range(jobs):
                slots.put(slot)
            with concurrent.futures.ProcessPoolExecutor(min(jobs, len(wave)), mp_context=context,
                                                        initializer=_pretrain_worker_init,
                                                        initargs=(slots, gpus, jobs)) as pool:
                done = {f"{row}|{seed}": str(path) for (row, seed), path in made.items()}  # teachers, not redone
                futures = [pool.submit(_pretrain_job, {**spec, "made": done}, row, seed) for row, seed in wave]
                for future in futures:
                    row, seed, path = future.result()
                    made[(row, seed)] = self._checkpoints[(row, seed)] = Path(path)
        return made

    def untrained(self, method: str, seed: int | None = None) -> list[dict]:
        """What :meth:`checkpoint` would train for ``method`` (and ``seed``), in order; [] when
        every checkpoint it needs is cached (or it needs none: outside models, ``pixels``).

        Each entry: ``{"method", "seed", "steps", "batch_size", "kind"}`` (``pretrain`` or
        ``reference``). ``eva`` lists its ``clip`` teacher first when that is missing too;
        ``random-init`` is never listed (it saves initial weights, nothing is trained).
        Nothing is trained; the synthetic data are written if absent (their key needs them).
        """
        seed = self.seeds()[0] if seed is None else int(seed)
        if (method, seed) in self._checkpoints or method in self.externals:
            return []
        mcfg = self.config(method, seed)
        entry = {"method": method, "seed": seed, "steps": mcfg.train.steps, "batch_size": mcfg.train.batch_size,
                 "kind": "reference" if method in REFERENCES else "pretrain"}
        if method in REFERENCES:
            if REFERENCES[method].build is None or not REFERENCES[method].trains:
                return []
            ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
            done = not self.force and _finished(Path(mcfg.train.output_dir), _reference_key(method, mcfg))
            return [] if done else [entry]
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        before: list[dict] = []
        if needs_teacher(mcfg):
            before = self.untrained("clip", mcfg.train.seed)
            if before:  # the teacher's weights are part of this run's key: it cannot be cached yet
                return before + [entry]
            mcfg.method.teacher_checkpoint = str(self.checkpoint("clip", mcfg.train.seed))
        from fundus_lab.train import run_dir_for

        key, _ = pretrain_key(mcfg)
        return [] if not self.force and _finished(run_dir_for(mcfg), key) else [entry]

    def model(self, method: str, seed: int | None = None):
        """The method's model in eval mode (trained first if needed), kept in memory."""
        seed = self.seeds()[0] if seed is None else seed
        if (method, seed) not in self._models:
            if method in REFERENCES and REFERENCES[method].build is None:
                model = PixelFeatures()
            else:
                from fundus_lab.models import load_model

                model = load_model(self.checkpoint(method, seed))
            self._models[(method, seed)] = model.to(_device()).eval()
        return self._models[(method, seed)]

    def forget(self, method: str | None = None) -> None:
        """Drop cached models (all, or one method's) to free memory."""
        for key in [k for k in self._models if method is None or k[0] == method]:
            del self._models[key]
        self._checkpoints = {k: v for k, v in self._checkpoints.items() if method is not None and k[0] != method}

    def provenance(self, method: str, seed: int) -> dict:
        if method in self.externals:
            path = str(self.externals[method])
            return {"method": method, "pretrain_seed": None, "external": path, "run_dir": path, "config": None,
                    "checkpoint": path, "pretrain_split": None}
        run = self.run_dir / "pretrain" / method / f"seed{seed}"
        return {"method": method, "pretrain_seed": seed, "run_dir": str(run), "config": str(run / "config.yaml"),
                "checkpoint": str(run / "checkpoint-last"), "pretrain_split": str(run / "split.csv")}

    # evaluation --------------------------------------------------------------------------

    def applies(self, method: str, protocol: str) -> bool:
        ref = REFERENCES.get(method)
        return ref is None or protocol in ref.protocols

    def evaluate(self, method: str, protocol: str, column: str | None = None, seed: int | None = None,
                 dataset: str | None = None) -> dict:
        """One protocol for one method (pretraining ``seed``), exactly as Table 1 runs it.

        Every test column is scored from the same fit; the JSON
        ``eval/<method>/seed<s>/<protocol>.json`` is cached by a key of the weights, the
        settings, the manifest and the split files. Returns it; with ``column`` its
        ``columns[column]`` entry is also under ``"cell"``. ``dataset`` runs the protocol on
        another dataset than the config names for it (e.g. a linear probe on synth-odir);
        its JSON is then ``<protocol>@<dataset>.json``, beside Table 1's.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
        seed = self.seeds()[0] if seed is None else int(seed)
        record = self._evaluate(method, PROTOCOLS[protocol], seed, dataset)
        if column is not None:
            if column not in record["columns"]:
                raise ValueError(f"column {column!r}; expected one of {list(record['columns'])}")
            record["cell"] = record["columns"][column]
        return record

    def _evaluate(self, method: str, protocol: Protocol, seed: int, dataset: str | None = None) -> dict:
        cfg = self.config(method, seed)
        apply_runtime(cfg)
        ecfg = cfg.eval
        name = protocol.name
        if dataset is not None and dataset != getattr(ecfg, protocol.dataset_key):
            setattr(ecfg, protocol.dataset_key, dataset)
            name = f"{protocol.name}@{Path(dataset).stem}"
        dataset = getattr(ecfg, protocol.dataset_key)
        out_dir = self.run_dir / "eval" / method / f"seed{seed}"
        path = out_dir / f"{name}.json"
        provenance = self.provenance(method, seed)
        if not self.applies(method, protocol.name):
            out = {"protocol": protocol.name, "dataset": dataset, "available": False, "values": [], "summary": None,
                   "result": {"reason": f"{method}: {REFERENCES[method].note}; {protocol.name} does not apply"},
                   "columns": {c: None for c, _, _ in COLUMNS}, **provenance}
            write_json(path, out)
            return read_json(path)
        pretrain_ds, weights = None, None
        if method in self.externals:  # its pretraining data is unknown here: no overlap check
            weights = external_fingerprint(self.externals[method])
        elif method not in REFERENCES or REFERENCES[method].build is not None:
            self.checkpoint(method, seed)
            pretrain_ds = open_split(cfg, cfg.data.dataset, "train", cfg.model.img_size,
                                     cfg.data.root or self.data_root)
        return evaluate_model(lambda: self.model(method, seed), protocol, cfg, out_dir, self.data_root,
                              self.run_dir / "splits", pretrain_ds, provenance, self.force, weights=weights,
                              json_name=name)

    # Tables 1 and 2 ----------------------------------------------------------------------

    def table(self, methods: Sequence[str], protocols: Sequence[str] = DEFAULT_PROTOCOLS,
              references: Sequence[str] = tuple(REFERENCES),
              external: Mapping[str, str | Path] | None = None, jobs: int = 1) -> dict[str, Path]:
        """Evaluate ``methods`` and ``references`` over every pretraining seed, and every outside
        model (those of ``external`` = {name: path} are registered first, see
        :meth:`add_external`) once; write Tables 1 and 2 (rows: methods, outside models, references;
        each protocol's columns in its ``Protocol.table``).
        ``jobs`` > 1 first pretrains every row in that many processes (:meth:`pretrain_parallel`).

        Outside models are evaluated first, so a checkpoint that does not load fails before
        any pretraining."""
        for name, path in (external or {}).items():
            self.add_external(name, path)
        if not methods and not self.externals:
            raise ValueError("compare: no methods given (nor outside models)")
        known = C.available_methods()
        unknown = [m for m in methods if m not in known]
        if unknown:  # before anything trains: a typo must not cost the methods listed before it
            import difflib

            hints = [f"{m!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(m, known, n=1))
                     else repr(m) for m in unknown]
            raise C.ConfigError(f"methods: unknown {', '.join(hints)}; expected some of {known}")
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad:
            raise C.ConfigError(f"protocols: unknown {bad}; expected some of {list(PROTOCOLS)}")
        unknown = [r for r in references if r not in REFERENCES]
        if unknown:
            raise C.ConfigError(f"references: unknown {unknown}; expected some of {list(REFERENCES)}")
        rows = list(dict.fromkeys([*methods, *self.externals, *references]))
        budget = self.budget(methods)  # before training: a config the counter cannot build fails first
        self.pretrain_parallel(rows, jobs)
        results: dict[str, dict[str, list]] = {}
        for method in sorted(rows, key=lambda m: m not in self.externals):  # stable: outside models first
            results[method] = {p: [] for p in protocols}
            for seed in self.seeds_of(method):
                for protocol in protocols:
                    res = self.evaluate(method, protocol, seed=seed)
                    res["json"] = str(self.run_dir / "eval" / method / f"seed{seed}" / f"{protocol}.json")
                    results[method][protocol].append(res)
                self.forget(method)
        from fundus_lab.eval.compare import write_results

        return write_results({m: results[m] for m in rows}, self.config(), self.run_dir, protocols, budget=budget)

    def budget(self, methods: Sequence[str]) -> dict[str, dict]:
        """Each pretrained method's compute under ``train.budget``: {method: {"steps",
        "teacher_steps", "flops_per_step", "flops"}} (:func:`fundus_lab.budget.training_flops`)."""
        from fundus_lab.budget import training_flops

        return {m: training_flops(self.config(m)) for m in methods if m not in self.externals and m not in REFERENCES}


def evaluate_model(model, protocol: "Protocol | str", cfg: "C.Config", out_dir: str | Path,
                   data_root: str | None = None, split_dir: str | Path | None = None, pretrain_ds=None,
                   provenance: Mapping | None = None, force: bool = False, image_size: int | None = None,
                   weights: str | None = None, json_name: str | None = None,
                   save_classifier: str | Path | None = None) -> dict:
    """Run ``protocol`` on the dataset the config names for it, score every test column,
    write ``out_dir/<json_name or protocol>.json`` (cached by key) and return it.

    ``model`` may be a callable that returns the model (loaded only when needed);
    ``pretrain_ds`` (the data the model was pretrained on) must share no patient with a test split;
    ``weights``: the caller's fingerprint of the weights (an outside model's files), in the key
    instead of a hash of the loaded parameters, so a cached result needs no loading.
    ``save_classifier`` (fine_tune only): write the best fine-tuned classifier there (a cached
    result counts only once that folder holds one).
    """
    from fundus_lab.eval.features import model_fingerprint
    from fundus_lab.eval.honesty import assert_disjoint

    protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    ecfg = cfg.eval
    dataset = getattr(ecfg, protocol.dataset_key)
    out_dir = Path(out_dir)
    path = out_dir / f"{json_name or protocol.name}.json"
    split_dir = Path(split_dir) if split_dir is not None else out_dir / "splits"
    image_size = image_size or cfg.model.img_size
    ensure_synthetic(cfg, [dataset], data_root)
    present = split_names(cfg, dataset, data_root, split_dir)
    sets = {"tests": {c: open_split(cfg, dataset, s, image_size, data_root, split_dir=split_dir)
                      for c, s, _ in COLUMNS if s in present}}
    if "in_domain" not in sets["tests"]:
        raise C.ConfigError(f"eval.{protocol.dataset_key}: dataset {dataset!r} has no 'test' split "
                            f"(splits: {sorted(present)})")
    named = {f"test-{c}": t for c, t in sets["tests"].items()}
    val_from_train = False
    if protocol.needs_training_split:
        sets["train"] = open_split(cfg, dataset, "train", image_size, data_root, split_dir=split_dir)
        sets["val"], sets["train"], val_from_train = _validation_split(cfg, dataset, sets["train"], image_size,
                                                                       data_root, split_dir)
        named.update(train=sets["train"], val=sets["val"])
        for name, test in sets["tests"].items():
            assert_disjoint(sets["train"], test, f"{dataset} train", f"{dataset} test ({name})")
            assert_disjoint(sets["val"], test, f"{dataset} val", f"{dataset} test ({name})")
    if pretrain_ds is not None:
        for name, test in sets["tests"].items():
            assert_disjoint(pretrain_ds, test, "pretraining", f"{dataset} test ({name})")
    test0 = sets["tests"]["in_domain"]
    sets["task"], sets["classes"] = test0.task, list(test0.classes)
    split_info = record_splits(named, out_dir / "splits", Path(dataset).stem)
    load = callable(model) and not isinstance(model, torch.nn.Module)
    if weights is None:
        model = model() if load else model
        weights, load = model_fingerprint(model), False
    settings = {k: C.to_dict(getattr(ecfg, k)) for k in protocol.settings}
    key = sha256_json({"protocol": protocol.name, "weights": weights, "settings": settings,
                       "manifest": manifest_hash(test0), "image_size": image_size,
                       "splits": {s: v["sha256"] for s, v in split_info.items()},
                       "runtime": [cfg.train.num_threads, cfg.train.deterministic]})
    saved = read_json(path)
    if save_classifier is not None and protocol.name != "fine_tune":
        raise C.ConfigError(f"save_classifier: only the fine_tune protocol trains a classifier (got {protocol.name!r})")
    classifier_done = save_classifier is None or (Path(save_classifier) / "classifier.json").is_file()
    if not force and saved and saved.get("key") == key and classifier_done:
        return saved
    model = model() if load else model

    start = time.time()
    task, metric = sets["task"], table_metric(sets["task"], protocol.name)
    extra = {} if save_classifier is None else {"save_classifier": save_classifier}
    fit = protocol.run(model, sets, cfg, out_dir / "features" if ecfg.cache_features else None, **extra)
    n_classes = len(sets["classes"])
    columns = {}
    for column, _, _ in COLUMNS:
        if not fit.available or column not in fit.predictions:
            columns[column] = None
            continue
        fn = metric_fn(task, metric, n_classes)
        labels = np.asarray(fit.labels[column])
        values = [float(fn(labels, np.asarray(p))) for p in fit.predictions[column]]
        columns[column] = {
            "values": values, "summary": _summary(values), "n_test": int(len(labels)),
            "ci": bootstrap_cell(task, metric, n_classes, labels, fit.predictions[column], ecfg.bootstrap, seed=0),
            "chance": chance_level(metric, n_classes),
            "labels": labels, "probs": [np.round(np.asarray(p, dtype=np.float64), 6) for p in fit.predictions[column]],
        }
    in_domain = columns.get("in_domain")
    out = {
        "key": key, "protocol": protocol.name, "dataset": dataset, "task": task, "classes": sets["classes"],
        "metric": metric, "available": fit.available, "values": in_domain["values"] if in_domain else [],
        "summary": in_domain["summary"] if in_domain else None, "columns": columns, "result": fit.result,
        "splits": split_info, "val_from_train": val_from_train, "weights_sha1": weights, "settings": settings,
        "seconds": time.time() - start, **(provenance or {}),
    }
    write_json(path, out)
    return read_json(path)


def _summary(values: Sequence[float]) -> dict:
    from fundus_lab.eval.tables import summarise

    return summarise(values)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validation_split(cfg, dataset: str, train, image_size: int, data_root, split_dir):
    """(val, train, carved): the dataset's own val split, or a patient-grouped 20 % of train."""
    from fundus_lab.data import DataError
    from fundus_lab.eval.probe import holdout_indices

    try:
        return open_split(cfg, dataset, "val", image_size, data_root, split_dir=split_dir), train, False
    except DataError as err:
        if "no 'val' records" not in str(err):
            raise
    fit, hold = holdout_indices(train, fraction=0.2, seed=0)
    return train.subset(hold), train.subset(fit), True


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


def write_explanation_scores(summary, run_dir: str | Path, split: str = "test") -> dict[str, Path]:
    """Notebook 02's explanation scores as ``explanation_scores.{csv,txt}`` in the run folder:
    per method and map, the attention mass inside lesion masks against a uniform map's share
    (the masks' area fraction) and their ratio, over every scored lesion (``lesion == all``)."""
    import pandas as pd

    run_dir = Path(run_dir)
    df = summary.reset_index() if isinstance(summary, pd.DataFrame) else pd.DataFrame(summary)
    df = df.sort_values(["method", "lesion"]).reset_index(drop=True)
    df["ratio_to_uniform"] = df["mass_in_mask"] / df["area_fraction"]
    csv_path = run_dir / "explanation_scores.csv"
    df.to_csv(csv_path, index=False, float_format="%.6f")
    lines = [f"Attention share inside lesion masks vs a uniform map's share ({split} split: in-domain), all lesions:"]
    for _, r in df[df["lesion"] == "all"].iterrows():
        lines.append(f"{r['method']}: {100 * r['mass_in_mask']:.2f} % in masks vs {100 * r['area_fraction']:.2f} % "
                     f"uniform = {r['ratio_to_uniform']:.2f}x (n={int(r['n'])} masks)")
    txt_path = run_dir / "explanation_scores.txt"
    txt_path.write_text("\n".join(lines) + "\n")
    return {"csv": csv_path, "txt": txt_path}


# ---------------------------------------------------------------------------------------
# pretraining, cached


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``train.num_threads`` for ``jobs`` pretraining processes sharing ``cores`` (default: this
    process's CPUs): cores / jobs, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def jobs_overrides(jobs: int, overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus ``train.num_threads=cores/jobs`` when ``jobs`` > 1 and the user set no
    thread count: every config of the run (and so every cache key) then says what ran."""
    if jobs < 1:
        raise C.ConfigError(f"--jobs {jobs}: expected 1 or more pretraining processes")
    if jobs == 1 or any(str(o).split("=", 1)[0].strip() == "train.num_threads" for o in overrides):
        return list(overrides)
    return [*overrides, f"train.num_threads={threads_per_job(jobs)}"]


def _pretrain_worker_init(slots, gpus: int, jobs: int) -> None:
    """A pretraining worker's place: with several GPUs, the one of its slot (before CUDA starts)."""
    slot = slots.get()
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % min(gpus, jobs))


def _pretrain_job(spec: dict, row: str, seed: int) -> tuple[str, int, str]:
    """One (row, seed) of :meth:`Run.pretrain_parallel`, in its own process: a :class:`Run`
    like the caller's makes the checkpoint exactly as the caller would have."""
    run = Run(spec["preset"], spec["run_dir"], spec["data_root"], spec["overrides"], spec["force"], path=spec["path"])
    for key, path in spec.get("made", {}).items():
        name, _, made_seed = key.rpartition("|")
        run._checkpoints[(name, int(made_seed))] = Path(path)
    return row, seed, str(run.checkpoint(row, seed))


def needs_teacher(mcfg: "C.Config") -> bool:
    from fundus_lab.budget import counts_teacher

    return counts_teacher(mcfg)


def _pretrain_inputs(mcfg: "C.Config") -> dict:
    d = C.to_dict(mcfg)
    d.pop("eval", None)  # evaluation settings do not change what pretraining learns
    d["data"].pop("synth_root", None)  # where the data lives is not what it is (manifest hash below)
    for k in ("output_dir", "progress", "tensorboard", "log_with", "log_every", "save_every", "keep_checkpoints"):
        d["train"].pop(k, None)
    # how the steps were set is not what is learnt (train.steps is); the teacher is hashed itself
    for k in ("budget", "budget_method", "teacher_steps"):
        d["train"].pop(k, None)
    if not d["train"].get("compile"):  # eager runs keep the keys they had before the switch existed
        d["train"].pop("compile", None)
    # switches added for issue 17 enter a key only when set away from their default (eva,
    # flair), so the methods they do not touch keep their cached runs
    if d["model"].get("text_pooling") == "cls":
        d["model"].pop("text_pooling")
    if d["model"].get("text_dropout") == 0.1:
        d["model"].pop("text_dropout")
    if d["method"].get("text_init") == "random":
        d["method"].pop("text_init")
    from fundus_lab.models.model import code_revision

    revision = code_revision(mcfg.method)
    if revision is not None:  # a code change the config does not show (CoCa's CLS position): old runs retrain
        d["code_revision"] = revision
    return d


def pretrain_key(mcfg: "C.Config") -> tuple[str, dict]:
    """Key of a pretraining run: resolved config (minus bookkeeping) + data manifest + split."""
    from fundus_lab.eval.honesty import write_split_file

    name = mcfg.data.dataset
    ds = open_split(mcfg, name, "train", mcfg.model.img_size, mcfg.data.root or mcfg.data.synth_root)
    split_path = Path(mcfg.train.output_dir) / "inputs" / f"{Path(name).stem}-train.csv"
    split_sha = write_split_file(ds, split_path)
    teacher = mcfg.method.teacher_checkpoint
    inputs = {"config": _pretrain_inputs(mcfg), "manifest": manifest_hash(ds), "split": split_sha,
              "teacher": sha256_file(Path(teacher) / "model.safetensors") if teacher and
              (Path(teacher) / "model.safetensors").is_file() else None}
    if inputs["teacher"]:
        inputs["config"]["method"].pop("teacher_checkpoint", None)
    return sha256_json(inputs), {"split_file": str(split_path), "manifest": inputs["manifest"]}


def _finished(run_dir: Path, key: str) -> bool:
    """``run_dir`` holds a finished checkpoint made from inputs with this ``key``."""
    saved = read_json(Path(run_dir) / KEY_FILE) or {}
    return saved.get("key") == key and bool(saved.get("complete")) and (Path(run_dir) / "checkpoint-last").exists()


def _reference_key(name: str, mcfg: "C.Config") -> str:
    return sha256_json({"reference": name, "config": _pretrain_inputs(mcfg)})


def pretrain_cached(mcfg: "C.Config", force: bool = False, callbacks=()) -> Path:
    """Pretrain unless ``run_dir/cache_key.json`` says the same inputs already finished."""
    from fundus_lab.train import pretrain, run_dir_for

    run_dir = run_dir_for(mcfg)
    key, info = pretrain_key(mcfg)
    saved = read_json(run_dir / KEY_FILE) or {}
    if not force and _finished(run_dir, key):
        print(f"fundus_lab: {mcfg.method.name} seed {mcfg.train.seed}: pretraining unchanged, reusing {run_dir}")
        return run_dir
    resume = not force and saved.get("key") == key  # an interrupted run with the same inputs
    ours = bool(saved)  # our key file: the folder is this cache's, a run of other inputs is replaced
    write_json(run_dir / KEY_FILE, {"key": key, "complete": False, **info})
    start = time.time()
    run_dir = Path(pretrain(mcfg, callbacks=callbacks, resume=resume, replace_run=ours))
    write_json(run_dir / KEY_FILE, {"key": key, "complete": True, "seconds": time.time() - start, **info})
    return run_dir


__all__ = ["COLUMNS", "DEFAULT_PROTOCOLS", "PROTOCOLS", "REFERENCES", "TABLES", "PixelFeatures", "Protocol", "Reference", "Run", "apply_runtime",
           "bootstrap_cell", "chance_level", "evaluate_model", "external_fingerprint", "write_explanation_scores", "metric_fn", "normalise_overrides", "pretrain_cached", "table_metric"]
