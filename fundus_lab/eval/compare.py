"""Tables 1 and 2: every method pretrained under one budget and evaluated the same way,
beside the reference rows, on two test columns (in-domain, held-out camera).

Table 1 holds the paper's protocols (zero-shot on seen classes, few-shot by fine-tuning
with k images per class, fine-tuning); Table 2 the field's linear probe and the zero-shot
columns that measure transfer (disjoint prompts, unseen diseases). Each protocol names its
table (``Protocol.table``); a table none of whose protocols ran is not written.

The work is done by :class:`fundus_lab.experiment.Run` (configs, checkpoints, cached
evaluations; the protocol and reference-row registries); this module writes the tables and
holds the ``fundus-lab compare`` and ``fundus-lab eval`` commands.

A cell: the table metric's mean over every run of the cell (pretraining seeds x evaluation
seeds), its 95 % CI (hierarchical bootstrap: pretraining seeds, then test images within each
seed; :mod:`fundus_lab.eval.seeds`) and, where ``eval.pretrain_seeds`` holds more than one
seed, the sample standard deviation over pretraining seeds.

Beside Table 1, ``pairs.{csv,md}``: for every pair of rows and every column, the mean
difference, its 95 % CI from the paired hierarchical bootstrap (the same seed and image draws
for both rows) and a verdict (``A > B``, ``B > A``, ``not separated``); with one pretraining
seed, "training noise unmeasured" and no verdicts.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fundus_lab import config as C
from fundus_lab.eval import seeds as S
from fundus_lab.eval.tables import summarise, write_table
from fundus_lab.experiment import (COLUMNS, DEFAULT_PROTOCOLS, METRIC_NAMES, PROTOCOLS, REFERENCES, TABLES, Run,
                                   chance_level, evaluate_model, metric_fn, normalise_overrides, open_split,
                                   table_metric, write_json)


def compare(
    run: Run | str,
    methods: Sequence[str],
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    references: Sequence[str] = tuple(REFERENCES),
    external: Mapping[str, str | Path] | None = None,
    **run_kwargs,
) -> dict[str, Path]:
    """Tables 1 and 2 of ``run`` (a :class:`Run`, or a preset name with ``Run``'s keyword arguments:
    ``run_dir``, ``data_root``, ``overrides``, ``force``) for ``methods`` + ``references``,
    and the outside models ``external`` = {name: path} (:meth:`Run.add_external`).

    Returns {"csv", "md", "tex" (Table 1), "table2_csv", "table2_md", "table2_tex", "json",
    "few_shot_*"} paths (a table's keys only where one of its protocols ran).
    """
    if not isinstance(run, Run):
        run = Run(run, **run_kwargs)
    elif run_kwargs:
        raise TypeError(f"compare: {sorted(run_kwargs)} are Run arguments; pass them to Run, not with a Run")
    return run.table(methods, protocols, references, external=external)


class _Draws:
    """The hierarchical bootstrap draws of each column, made once per (seeds, test size) so
    every row of a column is scored on the same replicates (what makes the pairs paired)."""

    def __init__(self, n_seeds: int, n_boot: int):
        self.n_seeds, self.n_boot, self._made = n_seeds, n_boot, {}

    def __call__(self, n_test: int):
        if n_test not in self._made:
            self._made[n_test] = S.hierarchical_draws(self.n_seeds, n_test, self.n_boot, seed=0)
        return self._made[n_test]


def _cell(runs: list[dict], column: str, draws: _Draws) -> tuple[dict | None, np.ndarray | None]:
    """One Table 1 cell from the evaluation records of every pretraining seed, and its
    bootstrap replicates (None where there is no interval: then it has no pairs either)."""
    available = [r for r in runs if r.get("available") and (r.get("columns") or {}).get(column)]
    if not available:
        return None, None
    parts = [r["columns"][column] for r in available]
    cell = summarise([v for p in parts for v in p["values"]])
    cell["seeds"] = len(parts)
    cell["seed_std"] = S.seed_sd([float(np.mean(p["values"])) for p in parts])
    cell["n_test"] = parts[0]["n_test"]
    cell["ci"], reps = [float("nan"), float("nan")], None
    labels = np.asarray(parts[0]["labels"])
    same_test = all(np.array_equal(np.asarray(p["labels"]), labels) for p in parts)
    if same_test and draws.n_boot > 0 and len(parts) in (1, draws.n_seeds):  # else no pooled interval
        r0 = available[0]
        fn = metric_fn(r0["task"], r0["metric"], len(r0["classes"]))
        reps = S.replicates(fn, labels, [p["probs"] for p in parts], draws(len(labels)))
        cell["ci"] = S.percentile_ci(reps)
    return cell, reps


def _pairs(rows: list[dict], replicates: dict, labels: dict, columns: Sequence[tuple[str, str]]) -> list[dict]:
    """Every pair of rows (A above B in Table 1) x every column: the mean difference A - B, its
    paired 95 % CI and the verdict (:func:`fundus_lab.eval.seeds.verdict`)."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            for key, header in columns:
                ca, cb = a.get(key), b.get(key)
                ra, rb = replicates.get((a["method"], key)), replicates.get((b["method"], key))
                pair = {"a": a["method"], "b": b["method"], "column": key, "header": header, "diff": None,
                        "ci": None, "seeds": None, "verdict": ""}
                if ca and cb and ra is not None and rb is not None and \
                        np.array_equal(labels[(a["method"], key)], labels[(b["method"], key)]):
                    pair["diff"] = ca["mean"] - cb["mean"]
                    pair["ci"] = S.percentile_ci(ra - rb)
                    pair["seeds"] = min(ca["seeds"], cb["seeds"])
                    pair["verdict"] = S.verdict(pair["ci"], pair["seeds"])
                out.append(pair)
    return out


def write_pairs(pairs: list[dict], out_dir: Path, columns: Sequence[tuple[str, str]], caption: str,
                name: str = "pairs") -> dict[str, Path]:
    """``pairs.csv`` (one line per pair and column, differences on the 0-1 scale) and
    ``pairs.md`` (one line per pair, differences in percentage points, verdicts by name)."""
    import csv

    def num(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.6f}"

    paths = {"pairs_csv": out_dir / f"{name}.csv", "pairs_md": out_dir / f"{name}.md"}
    with open(paths["pairs_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "column", "diff", "ci_low", "ci_high", "seeds", "verdict", "winner"])
        for p in pairs:
            ci = p["ci"] or [None, None]
            winner = {"A > B": p["a"], "B > A": p["b"]}.get(p["verdict"], "")
            w.writerow([p["a"], p["b"], p["column"], num(p["diff"]), num(ci[0]), num(ci[1]),
                        p["seeds"] if p["seeds"] is not None else "n/a", p["verdict"], winner])

    def text(p) -> str:
        if p["diff"] is None or not np.isfinite(p["diff"]):
            return "n/a"
        lo, hi = p["ci"]
        out = f"{100 * p['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        named = {"A > B": f"**{p['a']} > {p['b']}**", "B > A": f"**{p['b']} > {p['a']}**"}
        return out + (f" {named.get(p['verdict'], p['verdict'])}" if p["verdict"] else "")

    by_pair: dict[tuple[str, str], dict[str, dict]] = {}
    for p in pairs:
        by_pair.setdefault((p["a"], p["b"]), {})[p["column"]] = p
    md = [caption, "", "| A | B | " + " | ".join(h for _, h in columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for (a, b), cells in by_pair.items():
        md.append(f"| {a} | {b} | " + " | ".join(text(cells[k]) for k, _ in columns) + " |")
    paths["pairs_md"].write_text("\n".join(md) + "\n")
    return paths


def format_flops(flops: float) -> str:
    """``5.28e13`` -> ``52.8 TFLOP``."""
    for unit, name in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if flops >= unit:
            return f"{flops / unit:.3g} {name}"
    return f"{flops:.3g} FLOP"


def budget_note(cfg: "C.Config", budget: Mapping[str, dict]) -> str:
    """The legend line of the budget rule and each method's steps and training FLOPs."""
    t = cfg.train
    each = "; ".join(
        f"{m}: {b['steps']} steps" + (f" + {b['teacher_steps']} CLIP-teacher steps" if b.get("teacher_steps") else "")
        + f", {format_flops(b['flops'])}" for m, b in budget.items())
    counted = ("training FLOPs are forward + backward of one step counted by FlopCounterMode on an example batch "
               "(fundus_lab.budget) x steps; EVA's two stages each at its own cost, and the CLIP teacher it trains "
               "first counted in")
    if t.budget == "flops":
        return (f"Budget: equal training FLOPs (train.budget=flops): each method trains the steps that make its "
                f"training FLOPs equal those of {t.budget_method} at train.steps={t.steps} (steps = round(budget / FLOPs "
                f"per step averaged over its stages; EVA's teacher trains as many steps as EVA), "
                f"batch {t.batch_size} x {t.grad_accum_steps}; {counted}. " + each + ".")
    return (f"Budget: equal steps (train.budget=steps): every method trains train.steps={t.steps} steps of "
            f"{t.batch_size} x {t.grad_accum_steps} images; {counted}. " + each + ".")


def _relative(path: str, out_dir: Path) -> str:
    """Paths in the table relative to the run folder: two runs into two folders give the same bytes."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(path)


def write_results(results: dict, cfg: "C.Config", out_dir: Path, protocols: Sequence[str],
                  budget: Mapping[str, dict] | None = None) -> dict[str, Path]:
    """``table1.{csv,md,tex}``, ``table2.{csv,md,tex}``, their pairs tables (``pairs.{csv,md}``,
    ``table2_pairs.{csv,md}``) and ``results.json`` from ``{method: {protocol: [record per seed]}}``;
    each protocol's columns go in its table; ``budget`` ({method:
    :func:`fundus_lab.budget.training_flops`}) goes into the legend."""
    out_dir = Path(out_dir)
    draws = _Draws(len(cfg.eval.pretrain_seeds), cfg.eval.bootstrap)
    replicates, labels = {}, {}
    k = cfg.eval.few_shot_k or max(cfg.eval.shots)
    info: dict[str, dict] = {}  # protocol -> metric, dataset, classes
    for per_protocol in results.values():
        for p in protocols:
            for r in per_protocol[p]:
                if r.get("metric") and p not in info:
                    info[p] = {"metric": r["metric"], "dataset": r["dataset"], "classes": r["classes"]}
    rows = []
    for method, per_protocol in results.items():
        row = {"method": method}
        for p in protocols:
            for column, _, _ in COLUMNS:
                key = f"{p}_{column}"
                row[key], replicates[(method, key)] = _cell(per_protocol[p], column, draws)
                if row[key]:
                    labels[(method, key)] = next(np.asarray(r["columns"][column]["labels"]) for r in per_protocol[p]
                                                 if r.get("available") and (r.get("columns") or {}).get(column))
            row[f"{p}_json"] = ";".join(_relative(r["json"], out_dir) for r in per_protocol[p])
        row["run_dirs"] = ";".join(sorted({_relative(r["run_dir"], out_dir) for p in protocols for r in per_protocol[p]}))
        rows.append(row)
    headers: dict[str, str] = {}
    paths: dict[str, Path] = {}
    notes_of: dict[str, list[str]] = {}
    table_columns: dict[str, list[tuple[str, str]]] = {}
    seeds = list(cfg.eval.pretrain_seeds)
    spread = (f"± sample sd over {len(seeds)} pretraining seeds {seeds}" if len(seeds) > 1 else
              f"one pretraining seed ({seeds[0]}): no spread over pretraining seeds, training noise unmeasured")
    ci_of = "seeds, then test images" if len(seeds) > 1 else "test images"
    estimator = S.ESTIMATOR if len(seeds) > 1 else "percentile bootstrap over test images (numpy; one pretraining seed)"
    all_pairs: dict[str, list[dict]] = {}
    for table in TABLES:
        in_table = [p for p in protocols if PROTOCOLS[p].table == table]
        if not in_table:
            continue
        columns, chance = [], []
        for p in in_table:
            proto = PROTOCOLS[p]
            metric = info.get(p, {}).get("metric")
            dataset = info.get(p, {}).get("dataset") or getattr(cfg.eval, proto.dataset_key)
            for column, _, header in COLUMNS:
                columns.append((f"{p}_{column}",
                                f"{proto.header.format(k=k)} ({dataset}, {METRIC_NAMES.get(metric, metric)}), {header}"))
            if metric:
                chance.append(f"{proto.header.format(k=k)} {100 * chance_level(metric, len(info[p]['classes'])):.1f}")
        headers.update(columns)
        table_columns[table] = columns
        pairs_name = "pairs" if table == "table1" else f"{table}_pairs"
        held = [c for c in ("held_out_camera",) if any(r.get(f"{p}_{c}") for r in rows for p in in_table)]
        caption = (f"{TABLE_TITLES[table]} (preset {cfg.preset}): mean over runs [95 % bootstrap CI over {ci_of}], "
                   f"in percent; {spread}. n/a: the protocol does not apply (no text tower, no transformer blocks to "
                   "fine-tune, or a reference row without it)"
                   + ("" if held else "; held-out camera n/a: the datasets have no test_camera split") + ".")
        notes = ["Chance level per protocol (both columns): " + "; ".join(chance) + ".", *TABLE_NOTES[table],
                 "Reference rows: " + "; ".join(f"{n}: {r.note}" for n, r in REFERENCES.items() if n in results) + ".",
                 f"CI: {estimator}, {cfg.eval.bootstrap} replicates, 2.5 and 97.5 percentiles. Which method beats "
                 f"which: {pairs_name}.md (paired verdicts)."]
        if budget:
            notes.append(budget_note(cfg, budget))
        outside = {m: r["external"] for m, per_protocol in results.items() for p in in_table for r in per_protocol[p]
                   if r.get("external")}
        if outside:
            notes.append("Outside models (not pretrained here: one evaluation each, no spread over pretraining seeds; "
                         "zero-shot only with a text tower): " + "; ".join(f"{m}: {path}" for m, path in outside.items())
                         + ".")
        notes_of[table] = notes
        written = write_table(rows, out_dir, columns, name=table, caption=caption, notes=notes,
                              extra=[f"{p}_json" for p in in_table] + ["run_dirs"])
        paths.update(written if table == "table1" else {f"{table}_{kind}": v for kind, v in written.items()})
        pairs = _pairs(rows, replicates, labels, columns)
        rule = (f"verdict A > B (B > A) where the CI lies above (below) 0, not separated where it holds 0; each CI is "
                f"a per-pair 95 % interval, no correction for the {len(rows) * (len(rows) - 1) // 2} pairs x "
                f"{len(columns)} columns" if len(seeds) > 1 else
                f"one pretraining seed ({seeds[0]}): {S.UNMEASURED}, no verdicts (the CI covers test images only; "
                "run-to-run training noise exceeded it in results/default/reproducibility.md)")
        pairs_caption = (f"Pairs of {TABLE_TITLES[table].split(',')[0]} (preset {cfg.preset}): row A minus row B in "
                         f"percentage points [95 % CI of a paired {estimator}: the same seed and image draws for both "
                         f"rows, {cfg.eval.bootstrap} replicates]; {rule}.")
        written = write_pairs(pairs, out_dir, columns, pairs_caption, name=pairs_name)
        paths.update(written if table == "table1" else {f"{table}_{kind}": v for kind, v in written.items()})
        all_pairs[table] = pairs
    write_json(out_dir / "results.json", {"preset": cfg.preset, "rows": rows, "headers": headers,
                                          "metrics": {p: v["metric"] for p, v in info.items()},
                                          "notes": notes_of.get("table1", []), "table_notes": notes_of,
                                          "budget": dict(budget or {}), "pairs": all_pairs.get("table1", []),
                                          "table_pairs": all_pairs})
    paths["json"] = out_dir / "results.json"
    if "table1" in table_columns:
        _write_model_cards(results, rows, table_columns["table1"], paths["md"])
    if "few_shot" in protocols or "linear_probe" in protocols:
        paths.update({f"few_shot_{k}": v for k, v in write_few_shot_curves(results, cfg, out_dir).items()})
    return paths


def _write_model_cards(results: dict, rows: list[dict], columns: list[tuple[str, str]], table_md: Path) -> None:
    """Rewrite each pretrained checkpoint's model card with its method's Table 1 row."""
    from fundus_lab.eval.tables import format_cell
    from fundus_lab.models.card import write_model_card

    by_method = {row["method"]: row for row in rows}
    for method, per_protocol in results.items():
        cells = {header: format_cell(by_method[method].get(key)) for key, header in columns}
        run_dirs = {r["run_dir"] for records in per_protocol.values() for r in records if not r.get("external")}
        for run_dir in sorted(run_dirs):
            checkpoint = Path(run_dir) / "checkpoint-last"
            if (checkpoint / "config.json").is_file():
                write_model_card(checkpoint, cells, str(table_md))


TABLE_TITLES = {"table1": "Table 1, the paper's protocols",
                "table2": "Table 2, the field's linear probe and zero-shot transfer beyond the paper"}
TABLE_NOTES = {
    "table1": ["Zero-shot: the seen classes, prompted from the knowledge base, whose ensembles hold the very "
               "sentences pretraining paired with images (as the paper and FLAIR evaluate). Few-shot: the image "
               "encoder fine-tuned with k labelled images per class (the fine-tune recipe), as the paper does."],
    "table2": ["Linear probe: logistic regression on frozen features of k images per class (the field's "
               "convention: CLIP, FLAIR). Disjoint prompts: the zero-shot classes from templates and paraphrases "
               "no pretraining text holds. Unseen diseases: classes no pretraining image or text has, named from "
               "their knowledge-base entries alone. Both zero-shot columns go beyond the paper."],
}

# k-shot curves: (protocol, head in its result, label)
CURVE_HEADS = (("few_shot", "fine_tune", "fine-tune"), ("linear_probe", "probe", "probe"),
               ("linear_probe", "prompt_head", "prompt head"))


def shot_curve_rows(method: str, records: Mapping[str, Sequence[dict]]) -> list[dict]:
    """The k-shot curves of one method as long rows ``{method, model, protocol, head, k, metric,
    mean, std, n}`` (one per head and k; ``method`` is "<model> (<head>)"), pooling the runs of
    every record (pretraining seed) of ``records`` = {protocol: [evaluation record, ...]}:
    few-shot fine-tuning, and the linear probe and prompt head of ``linear_probe``."""
    rows = []
    for protocol, head, label in CURVE_HEADS:
        per_k: dict[int, list[float]] = {}
        metric = None
        for res in records.get(protocol, ()):
            if not res.get("available"):
                continue
            metric = res["metric"]
            for k, block in (res["result"].get("shots") or {}).items():
                per_k.setdefault(int(k), []).extend(r["metrics"][metric] for r in (block.get(head) or {}).get("runs", []))
        for k in sorted(per_k):
            if per_k[k]:
                cell = summarise(per_k[k])
                rows.append({"method": f"{method} ({label})", "model": method, "protocol": protocol, "head": head,
                             "k": k, "metric": metric, **cell})
    return rows


def write_few_shot_curves(results: dict, cfg: "C.Config", out_dir: Path) -> dict[str, Path]:
    """``few_shot.{csv,md,tex}``: the in-domain metric for every k, of the few-shot fine-tuning
    and of the linear probe and prompt head."""
    shots = [int(k) for k in cfg.eval.shots]
    by_row: dict[str, dict] = {}
    metric = None
    for method, per_protocol in results.items():
        for r in shot_curve_rows(method, per_protocol):
            by_row.setdefault(r["method"], {"method": r["method"]})[f"k{r['k']}"] = {
                "mean": r["mean"], "std": r["std"], "n": r["n"]}
            metric = r["metric"]
    rows = [row for row in by_row.values() if any(row.get(f"k{k}") for k in shots)]
    columns = [(f"k{k}", f"k={k}") for k in shots]
    caption = (f"Few-shot on {cfg.eval.few_shot_dataset}, in-domain test ({METRIC_NAMES.get(metric, metric)}), "
               "mean ± std over seeds, in percent: fine-tune (Table 1's few-shot), probe (Table 2's linear probe) "
               "and prompt head")
    return write_table(rows, out_dir, columns, name="few_shot", caption=caption)


# ---------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``fundus-lab compare --preset P --methods clip,coca,eva,ours [--external NAME=PATH ...]
    [--data-root DIR] [key=value ...]``"""
    parser = argparse.ArgumentParser(prog="fundus-lab compare",
                                     description="Pretrain methods under one budget and write Tables 1 and 2.")
    parser.add_argument("--preset", default=None, help="smoke | default | paper")
    parser.add_argument("--methods", nargs="+", default=["clip,coca,eva,ours"],
                        help="method names, comma-separated (clip,coca,ours) or space-separated")
    parser.add_argument("--references", nargs="*", default=[",".join(REFERENCES)],
                        help="reference rows, like --methods ('' or nothing for none)")
    parser.add_argument("--config", default=None, help="a YAML file of config sections")
    parser.add_argument("--data-root", default=None, help="root of the synthetic benchmark (default data.synth_root)")
    parser.add_argument("--out", default=None, help="run folder (default eval.output_dir)")
    parser.add_argument("--protocols", nargs="+", default=[",".join(DEFAULT_PROTOCOLS)], help="like --methods")
    parser.add_argument("--force", action="store_true", help="redo cached pretraining and evaluations")
    parser.add_argument("--external", action="append", default=[], metavar="NAME=PATH",
                        help="an outside model as a row (Hugging Face CLIP folder, open_clip checkpoint, timm or "
                             "RETFound image weights (image-only: zero-shot n/a), or any checkpoint fl.load_model "
                             "reads); repeat for several")
    parser.add_argument("--jobs", type=int, default=1,
                        help="pretrain the (method, seed) jobs in this many processes at once, each with cores/N "
                             "threads (train.num_threads, unless given); one per GPU on a multi-GPU machine. "
                             "Default 1: results/benchmarks/parallel_jobs.md")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=50 eval.seeds=2")
    args = parser.parse_args(argv)
    split = C.split_names
    external = {}
    for item in args.external:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--external {item!r}: expected NAME=PATH")
        if name in external:
            parser.error(f"--external {name!r} is given twice")
        external[name] = path
    from fundus_lab.models import CheckpointError
    from fundus_lab.models.external import ExternalModelError

    try:
        from fundus_lab.experiment import jobs_overrides

        overrides = jobs_overrides(args.jobs, args.overrides)
        run = Run(args.preset, args.out, args.data_root, overrides, args.force, path=args.config)
        paths = run.table(split(args.methods), split(args.protocols), split(args.references), external=external,
                          jobs=args.jobs)
    except (C.ConfigError, CheckpointError, ExternalModelError) as err:
        print(f"fundus-lab compare: {err}", file=sys.stderr)
        return 2
    for kind in ("md", "table2_md"):
        if kind in paths:
            print(Path(paths[kind]).read_text())
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


def evaluate_main(argv: list[str] | None = None) -> int:
    """``fundus-lab eval --checkpoint DIR --protocol P --dataset NAME [--data-root DIR] [key=value ...]``"""
    from fundus_lab.data.manifest import ManifestError, resolve_manifest_path
    from fundus_lab.experiment import apply_runtime
    from fundus_lab.models import load_model

    parser = argparse.ArgumentParser(prog="fundus-lab eval", description="Evaluate a checkpoint with one protocol.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (uses checkpoint-last)")
    parser.add_argument("--protocol", required=True, choices=list(PROTOCOLS))
    parser.add_argument("--dataset", required=True, help="a manifest name (e.g. synth-aptos) or a manifest path")
    parser.add_argument("--data-root", default=None, help="dataset folder (synthetic: the benchmark root)")
    parser.add_argument("--preset", default=None,
                        help="preset whose eval settings apply (default: the checkpoint's run's, else default)")
    parser.add_argument("--out", default=None, help="output folder (default <checkpoint>/../eval/<dataset>)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--save-classifier", default=None, metavar="DIR",
                        help="fine_tune only: save the best fine-tuned classifier to DIR (then: fundus-lab predict DIR image.png)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.seeds=2 eval.fine_tune_epochs=3")
    args = parser.parse_args(argv)
    if args.save_classifier and args.protocol != "fine_tune":
        print(f"fundus-lab eval: --save-classifier needs --protocol fine_tune (got {args.protocol})", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoint-last").exists():
        checkpoint = checkpoint / "checkpoint-last"
    if not checkpoint.exists():
        print(f"fundus-lab eval: --checkpoint {checkpoint} does not exist", file=sys.stderr)
        return 2
    protocol = PROTOCOLS[args.protocol]
    try:  # a mistyped --dataset name is one line with its did-you-mean, before any model loads
        if not Path(args.dataset).expanduser().exists():  # existing paths (CSV, class folders) are read later
            resolve_manifest_path(args.dataset)
    except ManifestError as err:
        print(f"fundus-lab eval: --dataset {args.dataset}: {err}", file=sys.stderr)
        return 2
    run_cfg = checkpoint.resolve().parent / "config.yaml"
    try:
        cfg = checkpoint_eval_config(run_cfg, args.preset,
                                     [*args.overrides, f"eval.{protocol.dataset_key}={args.dataset}"])
    except C.ConfigError as err:
        print(f"fundus-lab eval: {err}", file=sys.stderr)
        return 2
    apply_runtime(cfg)
    from fundus_lab.experiment import _device

    model = load_model(checkpoint).to(_device()).eval()
    if args.save_classifier and not hasattr(model, "save_pretrained"):
        print(f"fundus-lab eval: --save-classifier: {checkpoint} is an outside model ({type(model).__name__}); "
              "only fundus_lab models are saved as classifiers", file=sys.stderr)
        return 2
    image_size = _image_size_of(checkpoint, model) or cfg.model.img_size
    out_dir = Path(args.out) if args.out else checkpoint.resolve().parent / "eval" / Path(args.dataset).stem
    pretrain_ds = None
    if run_cfg.is_file():  # the data this model was pretrained on must not hold a test patient
        run = copy.deepcopy(cfg)
        run.data = C.from_dict(type(cfg.data), C.read_yaml(run_cfg).get("data") or {}, str(run_cfg))
        try:
            pretrain_ds = open_split(run, run.data.dataset, "train", image_size, run.data.root)
        except (OSError, ValueError) as err:
            print(f"fundus-lab eval: cannot reopen the pretraining data ({err}); patient overlap not checked",
                  file=sys.stderr)
    result = evaluate_model(model, protocol, cfg, out_dir, args.data_root, None, pretrain_ds,
                            {"checkpoint": str(checkpoint), "pretrain_split": str(checkpoint.resolve().parent / "split.csv")},
                            args.force, image_size, save_classifier=args.save_classifier)
    if not result["available"]:
        print(f"{args.protocol} on {args.dataset}: n/a ({result['result']['reason']})")
    else:
        for column, cell in result["columns"].items():
            if cell:
                s, ci = cell["summary"], cell["ci"]
                print(f"{args.protocol} on {args.dataset} ({column}): {result['metric']} = {s['mean']:.4f} "
                      f"[{ci[0]:.4f}, {ci[1]:.4f}] (runs={s['n']}, test images={cell['n_test']})")
    print(out_dir / f"{args.protocol}.json")
    if args.save_classifier and result["available"]:
        print(f"classifier: {args.save_classifier} (fundus-lab predict {args.save_classifier} IMAGE...)")
    return 0


__all__ = ["budget_note", "compare", "evaluate_main", "format_flops", "main", "shot_curve_rows", "table_metric",
           "write_pairs", "write_results"]
