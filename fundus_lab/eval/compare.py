"""Table 1: pretrain several methods under one budget, evaluate each the same way.

For every method and pretraining seed:

1. pretrain with ``fundus_lab.train.pretrain`` (same preset, same steps and batch size
   for all; ``eva`` first gets a CLIP teacher pretrained under the same budget);
2. zero-shot on ``eval.zero_shot_dataset`` (test split; multilabel sets report accuracy
   on the single-label subset, as zero-shot papers do), few-shot probes on
   ``eval.few_shot_dataset`` and fine-tuning on ``eval.fine_tune_dataset`` (early stopping
   and every choice on the validation split; the test split scored once);
3. a row of Table 1: mean ± std over all runs of a cell (pretraining seeds x evaluation
   seeds), written as ``table1.csv``, ``table1.md`` and ``table1.tex``.

Layout of ``out_dir``::

    pretrain/<method>/seed<s>/        the pretraining run (config.yaml, split.csv, checkpoint-last/ ...)
                         cache_key.json  hash of its inputs; an unchanged run is not redone
    eval/<method>/seed<s>/<protocol>.json   metrics, key, config, seeds and split files of each evaluation
    eval/<method>/seed<s>/splits/<dataset>-<split>.csv   the exact samples seen
    table1.{csv,md,tex}, results.json

Caching: a key = SHA-256 of (resolved config, dataset manifest, split files, and for
evaluations the checkpoint's weights and the eval settings) is stored with each result;
a pretraining or evaluation whose key is unchanged is read back instead of rerun.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fundus_lab import config as C  # attribute access at call time: fundus_lab.config imports this package
from fundus_lab.eval.features import model_fingerprint
from fundus_lab.eval.few_shot import few_shot
from fundus_lab.eval.fine_tune import fine_tune
from fundus_lab.eval.honesty import assert_disjoint, write_split_file
from fundus_lab.eval.probe import holdout_indices, linear_probe
from fundus_lab.eval.tables import summarise, write_table
from fundus_lab.eval.zero_shot import ZeroShotUnavailable, zero_shot

PROTOCOLS = ("zero_shot", "few_shot", "linear_probe", "fine_tune")
BUDGET_KEYS = ("steps", "batch_size", "grad_accum_steps")
KEY_FILE = "cache_key.json"
METRIC_NAMES = {"single_label_accuracy": "single-label acc.", "accuracy": "acc.", "kappa": "QW kappa", "auc": "AUC"}


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
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else str(obj)
    return obj


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1, sort_keys=False))
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------
# data


def dataset_root(cfg: "C.Config", name: str, data_root: str | None = None) -> str | None:
    """Where dataset ``name`` lives: ``<synth root>/<name>`` for synthetic sets, else
    ``data_root/<name>`` (or ``data_root`` itself); None lets the manifest decide."""
    if name.startswith("synth-"):
        return str(Path(data_root or cfg.data.synth_root) / name)
    if data_root is None:
        return None
    return str(Path(data_root) / name) if (Path(data_root) / name).is_dir() else str(data_root)


def ensure_synthetic(cfg: "C.Config", names: Sequence[str] = (), data_root: str | None = None) -> Path:
    """Make sure the synthetic benchmark under ``data_root`` (default ``data.synth_root``) is the
    configured one (size, seed, image size, generator version) when any of ``names`` is
    synthetic (all tasks when ``names`` is empty); the generator skips what is up to date."""
    root = Path(data_root or cfg.data.synth_root)
    if names and not any(n.startswith("synth-") for n in names):
        return root
    from fundus_lab.data import synth

    synth.generate_benchmark(str(root), workers=None, **synth.benchmark_options(cfg.data))
    return root


def open_split(cfg: "C.Config", name: str, split: str, image_size: int, data_root=None, augment: bool = False,
               split_dir: str | Path | None = None):
    """One split of dataset ``name``; with ``split_dir`` the split assignment is read from
    (or first written to) ``split_dir/<name>.json``, so every method sees the same split."""
    from fundus_lab.data import open_dataset

    split_file = Path(split_dir) / f"{Path(name).stem}.json" if split_dir is not None else None
    return open_dataset(name, root=dataset_root(cfg, name, data_root), split=split, image_size=image_size,
                        augment=augment, skip_bad=cfg.data.skip_bad_images, split_file=split_file,
                        image_cache=cfg.data.image_cache, image_cache_dir=cfg.data.image_cache_dir)


def manifest_hash(ds) -> str:
    """Hash of the dataset's manifest file (how labels are read) where it can be found."""
    candidates = [getattr(getattr(ds, "manifest", None), "path", None), getattr(ds, "manifest_path", None)]
    if getattr(ds, "root", None) is not None:
        candidates.append(Path(ds.root) / "manifest.yaml")
    for c in candidates:
        if c is not None and Path(c).is_file():
            return sha256_file(c)
    return sha256_json(repr(getattr(ds, "manifest", None)))


def record_splits(datasets: dict, folder: Path, name: str) -> dict:
    """Write each split's sample list to ``folder/<name>-<split>.csv``; {split: {file, sha256}}."""
    out = {}
    for split, ds in datasets.items():
        path = folder / f"{name}-{split}.csv"
        out[split] = {"file": str(path), "sha256": write_split_file(ds, path), "n": len(ds)}
    return out


def _validation_split(cfg, dataset: str, train, image_size: int, data_root, split_dir):
    """(val, train, carved): the dataset's own val split, or, where it has none, a
    patient-grouped 20 % of the training split (never the test split)."""
    from fundus_lab.data import DataError

    try:
        return open_split(cfg, dataset, "val", image_size, data_root, split_dir=split_dir), train, False
    except DataError as err:
        if "no 'val' records" not in str(err):
            raise
    fit, hold = holdout_indices(train, fraction=0.2, seed=0)
    return train.subset(hold), train.subset(fit), True


# ---------------------------------------------------------------------------------------
# pretraining, cached


def method_config(cfg: "C.Config", method: str, seed: int, out_dir: str | Path, overrides=None,
                  data_root: str | None = None) -> "C.Config":
    """``cfg`` with ``method``'s section (configs/methods/<method>.yaml) and the shared budget.

    Everything but the method comes from ``cfg``; the method file may set model keys too.
    ``train.steps``, ``batch_size`` and ``grad_accum_steps`` are forced back to ``cfg``'s so
    every method sees the same number of images.
    """
    base = C.to_dict(cfg)
    base["method"] = {}
    layer = C.read_yaml(C._named_file("methods", method))
    merged = C.merge(base, {k: v for k, v in layer.items() if k != "preset"})
    merged = C.merge(merged, C.overrides_to_dict(overrides))
    merged.pop("preset", None)
    mcfg = C.from_dict(C.Config, merged, f"compare:{method}")
    mcfg.preset = cfg.preset
    mcfg.method.name = method
    for key in BUDGET_KEYS:
        setattr(mcfg.train, key, getattr(cfg.train, key))
    mcfg.train.seed = int(seed)
    mcfg.train.output_dir = str(Path(out_dir) / "pretrain" / method / f"seed{seed}")
    if data_root is not None:
        mcfg.data.synth_root = str(data_root)
        if mcfg.data.dataset.startswith("synth-"):
            mcfg.data.root = None
    return mcfg


def pretrain_key(mcfg: "C.Config", data_root=None) -> tuple[str, dict]:
    """Key of a pretraining run: resolved config (minus its own folder) + data manifest + split."""
    d = C.to_dict(mcfg)
    d.pop("eval", None)  # evaluation settings do not change what pretraining learns
    d["train"].pop("output_dir", None)
    for k in ("progress", "tensorboard", "log_every", "save_every", "keep_checkpoints"):
        d["train"].pop(k, None)
    name = mcfg.data.dataset
    ds = open_split(mcfg, name, "train", mcfg.model.img_size, mcfg.data.root or data_root)
    split_path = Path(mcfg.train.output_dir) / "inputs" / f"{Path(name).stem}-train.csv"
    inputs = {"config": d, "manifest": manifest_hash(ds), "split": write_split_file(ds, split_path)}
    return sha256_json(inputs), {"split_file": str(split_path), "manifest": inputs["manifest"]}


def pretrain_cached(mcfg: "C.Config", force: bool = False, data_root=None, callbacks=()) -> Path:
    """Pretrain unless ``run_dir/cache_key.json`` says the same inputs already finished."""
    from fundus_lab.train import pretrain, run_dir_for

    run_dir = run_dir_for(mcfg)
    if mcfg.data.dataset.startswith("synth-") and mcfg.data.root is None:
        ensure_synthetic(mcfg, [mcfg.data.dataset], mcfg.data.synth_root)
    key, info = pretrain_key(mcfg, data_root)
    saved = read_json(run_dir / KEY_FILE) or {}
    if not force and saved.get("key") == key and saved.get("complete") and (run_dir / "checkpoint-last").exists():
        print(f"fundus_lab: {mcfg.method.name} seed {mcfg.train.seed}: pretraining unchanged, reusing {run_dir}")
        return run_dir
    resume = not force and saved.get("key") == key  # an interrupted run with the same inputs
    write_json(run_dir / KEY_FILE, {"key": key, "complete": False, **info})
    start = time.time()
    run_dir = Path(pretrain(mcfg, callbacks=callbacks, resume=resume))
    write_json(run_dir / KEY_FILE, {"key": key, "complete": True, "seconds": time.time() - start, **info})
    return run_dir


def needs_teacher(mcfg: "C.Config") -> bool:
    return mcfg.method.image_gen_weight > 0 and mcfg.method.image_gen_target == "teacher" and not mcfg.method.teacher_checkpoint


# ---------------------------------------------------------------------------------------
# evaluation of one model


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def table_metric(task: str, protocol: str) -> str:
    """The number Table 1 shows: ODIR zero-shot -> single-label accuracy; grades -> kappa."""
    if task == "multilabel":
        return "single_label_accuracy" if protocol == "zero_shot" else "auc"
    return {"ordinal": "kappa", "binary": "auc"}.get(task, "accuracy")


def _eval_settings(ecfg, protocol: str) -> dict:
    d = C.to_dict(ecfg)
    keep = {"batch_size", "bootstrap"}
    if protocol == "few_shot":
        keep |= {"shots", "seeds", "few_shot_features", "few_shot_head_steps"}
    if protocol == "linear_probe":
        keep |= {"few_shot_features"}
    if protocol == "fine_tune":
        keep |= {k for k in d if k.startswith("fine_tune_")}
    return {k: d[k] for k in sorted(keep)}


def evaluate(
    model,
    protocol: str,
    dataset: str,
    cfg: "C.Config",
    out_dir: str | Path,
    data_root: str | None = None,
    pretrain_ds=None,
    image_size: int | None = None,
    force: bool = False,
    provenance: dict | None = None,
    split_dir: str | Path | None = None,
) -> dict:
    """Run one protocol on one dataset and write ``out_dir/<protocol>.json`` (cached by key).

    The split assignment is kept in ``split_dir/<dataset>.json`` (default ``out_dir/splits``;
    ``compare`` shares one across methods) and each split's sample list is written to
    ``out_dir/splits/``; ``pretrain_ds`` (the data the model was
    pretrained on) must share no patient with the test split.
    Returns the JSON written: {"key", "protocol", "dataset", "task", "metric", "values",
    "available", "result", "splits", ...provenance}.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}; expected one of {PROTOCOLS}")
    out_dir = Path(out_dir)
    ecfg = cfg.eval
    image_size = image_size or cfg.model.img_size
    ensure_synthetic(cfg, [dataset], data_root)
    splits = ["test"] if protocol == "zero_shot" else ["train", "val", "test"]
    split_dir = Path(split_dir) if split_dir is not None else out_dir / "splits"
    sets = {s: open_split(cfg, dataset, s, image_size, data_root, split_dir=split_dir) for s in splits if s != "val"}
    val_from_train = False
    if "val" in splits:
        sets["val"], sets["train"], val_from_train = _validation_split(cfg, dataset, sets["train"], image_size,
                                                                       data_root, split_dir)
    for s in splits[:-1]:
        assert_disjoint(sets[s], sets["test"], f"{dataset} {s}", f"{dataset} test")
    if pretrain_ds is not None:
        assert_disjoint(pretrain_ds, sets["test"], "pretraining", f"{dataset} test")
    split_info = record_splits(sets, out_dir / "splits", Path(dataset).stem)
    weights = model_fingerprint(model)
    key = sha256_json({
        "protocol": protocol, "weights": weights, "settings": _eval_settings(ecfg, protocol),
        "manifest": manifest_hash(sets["test"]), "splits": {s: v["sha256"] for s, v in split_info.items()},
        "image_size": image_size,
    })
    path = out_dir / f"{protocol}.json"
    saved = read_json(path)
    if not force and saved and saved.get("key") == key:
        return saved

    test = sets["test"]
    task = test.task
    metric = table_metric(task, protocol)
    cache_dir = out_dir / "features" if ecfg.cache_features else None
    start = time.time()
    available, values, result = True, [], None
    if protocol == "zero_shot":
        try:
            result = zero_shot(model, test, batch_size=ecfg.batch_size, bootstrap=ecfg.bootstrap, cache_dir=cache_dir)
            values = [result["metrics"][metric]]
            result = {"metrics": result["metrics"], "prompts": result["prompts"],
                      "labels": result["labels"], "probs": result["probs"]}
        except ZeroShotUnavailable as err:
            available, result = False, {"reason": str(err)}
    elif protocol == "few_shot":
        result = few_shot(model, sets["train"], test, shots=ecfg.shots, seeds=ecfg.seeds, val_ds=sets["val"],
                          features=ecfg.few_shot_features, head_steps=ecfg.few_shot_head_steps,
                          batch_size=ecfg.batch_size, cache_dir=cache_dir)
        k = ecfg.few_shot_k or max(ecfg.shots)
        if k not in result["shots"]:
            raise C.ConfigError(f"eval.few_shot_k = {k} is not one of eval.shots = {list(ecfg.shots)}")
        values = [r["metrics"][metric] for r in result["shots"][k]["probe"]["runs"]]
    elif protocol == "linear_probe":
        result = linear_probe(model, sets["train"], test, val_ds=sets["val"], features=ecfg.few_shot_features,
                              batch_size=ecfg.batch_size, bootstrap=ecfg.bootstrap, cache_dir=cache_dir)
        values = [result["metrics"][metric]]
        result = {"metrics": result["metrics"], "C": result["C"], "val_scores": result["val_scores"]}
    else:
        train_aug = sets["train"].subset(range(len(sets["train"])))
        train_aug.augment = ecfg.fine_tune_augment
        runs = []
        for seed in range(ecfg.fine_tune_seeds):
            r = fine_tune(model, train_aug, sets["val"], test, epochs=ecfg.fine_tune_epochs, lr=ecfg.fine_tune_lr,
                          layer_decay=ecfg.fine_tune_layer_decay, weight_decay=ecfg.fine_tune_weight_decay,
                          batch_size=ecfg.fine_tune_batch_size, class_balanced=ecfg.fine_tune_class_balanced,
                          patience=ecfg.fine_tune_patience, seed=seed, bootstrap=ecfg.bootstrap)
            runs.append({"seed": seed, "metrics": r["metrics"], "best_epoch": r["best_epoch"],
                         "best_val": r["best_val"], "selection_metric": r["selection_metric"], "history": r["history"],
                         "labels": r["labels"], "probs": r["probs"]})  # test predictions: confusion matrices
            values.append(r["metrics"][metric])
        result = {"runs": runs}
    out = {
        "key": key, "protocol": protocol, "dataset": dataset, "task": task, "classes": list(test.classes),
        "metric": metric, "available": available, "values": values, "summary": summarise(values) if available else None,
        "result": result, "splits": split_info, "val_from_train": val_from_train, "weights_sha1": weights, "settings": _eval_settings(ecfg, protocol),
        "seconds": time.time() - start, **(provenance or {}),
    }
    write_json(path, out)
    return read_json(path)


# ---------------------------------------------------------------------------------------
# the comparison


def compare(
    cfg: "C.Config",
    methods: Sequence[str],
    out_dir: str | Path | None = None,
    data_root: str | None = None,
    overrides=None,
    force: bool = False,
    protocols: Sequence[str] = ("zero_shot", "few_shot", "fine_tune"),
) -> dict[str, Path]:
    """Pretrain ``methods`` under ``cfg``'s budget, evaluate each, write Table 1.

    Args:
        cfg: the base config (preset, data, train budget, eval settings).
        methods: names of ``configs/methods/*.yaml``.
        out_dir: default ``cfg.eval.output_dir`` (``{preset}`` is filled in).
        data_root: root of the synthetic benchmark (default ``cfg.data.synth_root``).
        overrides: ``key=value`` applied on top of every method's config.
        force: redo pretraining and evaluation even if cached.
    Returns:
        {"csv", "md", "tex", "json"} paths.
    """
    from fundus_lab.models import load_model

    if not methods:
        raise ValueError("compare: no methods given")
    out_dir = Path(str(out_dir or cfg.eval.output_dir).format(preset=cfg.preset))
    datasets = {"zero_shot": cfg.eval.zero_shot_dataset, "few_shot": cfg.eval.few_shot_dataset,
                "fine_tune": cfg.eval.fine_tune_dataset, "linear_probe": cfg.eval.few_shot_dataset}
    ensure_synthetic(cfg, [cfg.data.dataset] + [datasets[p] for p in protocols], data_root)
    device = _device()
    results: dict[str, dict[str, list]] = {}
    for method in methods:
        results[method] = {p: [] for p in protocols}
        for seed in cfg.eval.pretrain_seeds:
            mcfg = method_config(cfg, method, seed, out_dir, overrides, data_root)
            if needs_teacher(mcfg):
                teacher_cfg = method_config(cfg, "clip", seed, out_dir, overrides, data_root)
                teacher_dir = pretrain_cached(teacher_cfg, force, data_root)
                mcfg.method.teacher_checkpoint = str(teacher_dir / "checkpoint-last")
            run_dir = pretrain_cached(mcfg, force, data_root)
            model = load_model(run_dir / "checkpoint-last").to(device).eval()
            pretrain_ds = open_split(mcfg, mcfg.data.dataset, "train", mcfg.model.img_size,
                                     mcfg.data.root or data_root)
            provenance = {"method": method, "pretrain_seed": seed, "run_dir": str(run_dir),
                          "config": str(run_dir / "config.yaml"), "checkpoint": str(run_dir / "checkpoint-last"),
                          "pretrain_split": str(run_dir / "split.csv")}
            for protocol in protocols:
                res = evaluate(model, protocol, datasets[protocol], mcfg, out_dir / "eval" / method / f"seed{seed}",
                               data_root, pretrain_ds, force=force, provenance=provenance,
                               split_dir=out_dir / "splits")
                res["json"] = str(out_dir / "eval" / method / f"seed{seed}" / f"{protocol}.json")
                results[method][protocol].append(res)
            del model
    return write_results(results, cfg, out_dir, protocols)


def write_results(results: dict, cfg: "C.Config", out_dir: Path, protocols: Sequence[str]) -> dict[str, Path]:
    """Table 1 from per-run results: a cell pools the values of every run (all seeds)."""
    k = cfg.eval.few_shot_k or max(cfg.eval.shots)
    headers = {
        "zero_shot": ("Zero-shot", cfg.eval.zero_shot_dataset),
        "few_shot": (f"Few-shot k={k}", cfg.eval.few_shot_dataset),
        "linear_probe": ("Linear probe", cfg.eval.few_shot_dataset),
        "fine_tune": ("Fine-tune", cfg.eval.fine_tune_dataset),
    }
    rows, metrics = [], {}
    for method, per_protocol in results.items():
        row = {"method": method}
        for protocol in protocols:
            runs = per_protocol[protocol]
            if runs:
                metrics[protocol] = runs[0]["metric"]
            available = [r for r in runs if r["available"]]
            row[protocol] = summarise([v for r in available for v in r["values"]]) if available else None
            row[f"{protocol}_json"] = ";".join(r["json"] for r in runs)
        row["run_dirs"] = ";".join(sorted({r["run_dir"] for p in protocols for r in per_protocol[p]}))
        rows.append(row)
    columns = [(p, f"{headers[p][0]} ({headers[p][1]}, {METRIC_NAMES.get(metrics.get(p), metrics.get(p))})")
               for p in protocols]
    caption = (f"Table 1 (preset {cfg.preset}): mean ± std over seeds, in percent; "
               "n/a: the method has no text encoder")
    paths = write_table(rows, out_dir, columns, name="table1", caption=caption,
                        extra=[f"{p}_json" for p in protocols] + ["run_dirs"])
    write_json(out_dir / "results.json", {"preset": cfg.preset, "rows": rows, "metrics": metrics})
    paths["json"] = out_dir / "results.json"
    if "few_shot" in protocols:
        paths.update({f"few_shot_{k}": v for k, v in write_few_shot_curves(results, cfg, out_dir).items()})
    return paths


def write_few_shot_curves(results: dict, cfg: "C.Config", out_dir: Path) -> dict[str, Path]:
    """``few_shot.{csv,md,tex}``: the few-shot metric for every k, probe and prompt head."""
    rows, metric = [], None
    shots = [int(k) for k in cfg.eval.shots]
    for method, per_protocol in results.items():
        for head in ("probe", "prompt_head"):
            row = {"method": f"{method} ({head.replace('_', ' ')})"}
            for k in shots:
                values = []
                for res in per_protocol["few_shot"]:
                    metric = res["metric"]
                    block = res["result"]["shots"].get(str(k)) or {}
                    values += [r["metrics"][metric] for r in (block.get(head) or {}).get("runs", [])]
                row[f"k{k}"] = summarise(values) if values else None
            if any(row[f"k{k}"] for k in shots):
                rows.append(row)
    columns = [(f"k{k}", f"k={k}") for k in shots]
    caption = (f"Few-shot on {cfg.eval.few_shot_dataset} ({METRIC_NAMES.get(metric, metric)}), "
               "mean ± std over seeds, in percent")
    return write_table(rows, out_dir, columns, name="few_shot", caption=caption)


# ---------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``fundus-lab compare --preset P --methods clip,coca,eva,ours [--data-root DIR] [key=value ...]``"""
    parser = argparse.ArgumentParser(prog="fundus-lab compare",
                                     description="Pretrain methods under one budget and write Table 1.")
    parser.add_argument("--preset", default=None, help="smoke | default | paper")
    parser.add_argument("--methods", default="clip,coca,eva,ours", help="comma-separated method names")
    parser.add_argument("--config", default=None, help="a YAML file of config sections")
    parser.add_argument("--data-root", default=None, help="root of the synthetic benchmark (default data.synth_root)")
    parser.add_argument("--out", default=None, help="output folder (default eval.output_dir)")
    parser.add_argument("--protocols", default="zero_shot,few_shot,fine_tune")
    parser.add_argument("--force", action="store_true", help="redo cached pretraining and evaluations")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=50 eval.seeds=2")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    try:
        if bad:
            raise C.ConfigError(f"--protocols: unknown {bad}; expected some of {list(PROTOCOLS)}")
        cfg = C.load_config(args.config, preset=args.preset, overrides=args.overrides)
        paths = compare(cfg, methods, args.out, args.data_root, args.overrides, args.force, protocols)
    except C.ConfigError as err:
        print(f"fundus-lab compare: {err}", file=sys.stderr)
        return 2
    print(Path(paths["md"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _image_size_of(checkpoint: Path, model) -> int | None:
    """The input size the model was built for: its own config, else the run's config.yaml."""
    for obj in (getattr(model, "model_cfg", None), getattr(model, "image_encoder", None)):
        size = getattr(obj, "img_size", None)
        if isinstance(size, int):
            return size
    for cand in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml"):
        if cand.is_file():
            size = (C.read_yaml(cand).get("model") or {}).get("img_size")
            if size:
                return int(size)
    return None


def evaluate_main(argv: list[str] | None = None) -> int:
    """``fundus-lab eval --checkpoint DIR --protocol P --dataset NAME [--data-root DIR] [key=value ...]``"""
    from fundus_lab.models import load_model

    parser = argparse.ArgumentParser(prog="fundus-lab eval", description="Evaluate a checkpoint with one protocol.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (uses checkpoint-last)")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    parser.add_argument("--dataset", required=True, help="a manifest name (e.g. synth-aptos) or a manifest path")
    parser.add_argument("--data-root", default=None, help="dataset folder (synthetic: the benchmark root)")
    parser.add_argument("--preset", default=None, help="preset whose eval settings apply (default: default)")
    parser.add_argument("--out", default=None, help="output folder (default <checkpoint>/../eval/<dataset>)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.seeds=2 eval.fine_tune_epochs=3")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoint-last").exists():
        checkpoint = checkpoint / "checkpoint-last"
    if not checkpoint.exists():
        print(f"fundus-lab eval: --checkpoint {checkpoint} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = C.load_config(preset=args.preset, overrides=args.overrides)
    except C.ConfigError as err:
        print(f"fundus-lab eval: {err}", file=sys.stderr)
        return 2
    model = load_model(checkpoint).to(_device()).eval()
    image_size = _image_size_of(checkpoint, model) or cfg.model.img_size
    out_dir = Path(args.out) if args.out else checkpoint.resolve().parent / "eval" / Path(args.dataset).stem
    split_csv = checkpoint.resolve().parent / "split.csv"
    run_cfg = checkpoint.resolve().parent / "config.yaml"
    pretrain_ds = None
    if run_cfg.is_file():  # the data this model was pretrained on must not hold a test patient
        run = copy.deepcopy(cfg)
        run_data = C.read_yaml(run_cfg).get("data") or {}
        run.data = C.from_dict(type(cfg.data), run_data, str(run_cfg))
        try:
            pretrain_ds = open_split(run, run.data.dataset, "train", image_size, run.data.root)
        except (OSError, ValueError) as err:
            print(f"fundus-lab eval: cannot reopen the pretraining data ({err}); patient overlap not checked",
                  file=sys.stderr)
    result = evaluate(model, args.protocol, args.dataset, cfg, out_dir, args.data_root, pretrain_ds, image_size,
                      force=args.force, provenance={"checkpoint": str(checkpoint), "pretrain_split": str(split_csv)})
    if not result["available"]:
        print(f"{args.protocol} on {args.dataset}: n/a ({result['result']['reason']})")
    else:
        s = result["summary"]
        print(f"{args.protocol} on {args.dataset}: {result['metric']} = {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})")
    print(out_dir / f"{args.protocol}.json")
    return 0


__all__ = ["compare", "evaluate", "evaluate_main", "main", "method_config", "pretrain_cached", "table_metric"]
