"""The evaluation protocols of the tables and the one function that runs any of them.

A protocol adapter takes a model and the opened splits (``sets``: ``tests`` per column,
``train``, ``val``, ``task``, ``classes``), runs one of the :mod:`fundus_lab.eval`
functions, and hands back a :class:`Fit`: the test predictions of every run, per test
column, all scored from one fit. :data:`PROTOCOLS` names each adapter with its dataset,
its cache-relevant settings and the table it goes in; adding a protocol is one
``PROTOCOLS.register``. :func:`evaluate_model` opens the data, checks that no test
patient was seen, scores every column and caches the record by a key of what changes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from fundus_lab import config as C
from fundus_lab.eval.features import extract_features, model_fingerprint
from fundus_lab.eval.few_shot import few_shot, few_shot_fine_tune, sample_few_shot
from fundus_lab.eval.fine_tune import fine_tune, predict
from fundus_lab.eval.honesty import assert_disjoint
from fundus_lab.eval.metrics import bootstrap_cell, chance_level, metric_fn, table_metric
from fundus_lab.eval.probe import fit_logistic, fit_probe
from fundus_lab.eval.prompts import dataset_disjoint_prompts
from fundus_lab.eval.tables import summarise
from fundus_lab.eval.zero_shot import ZeroShotUnavailable, has_text_encoder, zero_shot
from fundus_lab.experiment.datasets import (ensure_synthetic, manifest_hash, open_split, record_splits, split_names,
                                            validation_split)
from fundus_lab.experiment.store import read_json, sha256_json, write_json
from fundus_lab.predict import save_classifier as write_classifier
from fundus_lab.registry import Registry

# the tables' two test columns: (key, split name, header). Real datasets have only `test`.
COLUMNS = (("in_domain", "test", "in-domain"), ("held_out_camera", "test_camera", "held-out camera"))


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
    ecfg = cfg.eval
    k = _table_k(ecfg)
    train, val, task = sets["train"], sets["val"], sets["task"]
    curves = few_shot(model, train, sets["tests"]["in_domain"], shots=ecfg.shots, seeds=ecfg.seeds, val_ds=val,
                      features=ecfg.few_shot_features, head_steps=ecfg.few_shot_head_steps,
                      prompt_head=has_text_encoder(model), batch_size=ecfg.batch_size, cache_dir=cache_dir,
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
PROTOCOLS: Registry[Protocol] = Registry("protocol")
for _protocol in (
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
):
    PROTOCOLS.register(_protocol.name, _protocol)
TABLES = ("table1", "table2")
DEFAULT_PROTOCOLS = ("zero_shot", "few_shot", "fine_tune", "linear_probe", "zero_shot_disjoint", "zero_shot_unseen")


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
    protocol = PROTOCOLS.get(protocol) if isinstance(protocol, str) else protocol
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
        sets["val"], sets["train"], val_from_train = validation_split(cfg, dataset, sets["train"], image_size,
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
            "values": values, "summary": summarise(values), "n_test": int(len(labels)),
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
