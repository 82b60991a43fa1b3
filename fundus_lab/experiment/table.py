"""Tables 1 and 2: every method pretrained under one budget and evaluated the same way,
beside the reference rows, on two test columns (in-domain, held-out camera).

Table 1 holds the paper's protocols (zero-shot on seen classes, few-shot by fine-tuning
with k images per class, fine-tuning); Table 2 the field's linear probe and the zero-shot
columns that measure transfer (disjoint prompts, unseen diseases). Each protocol names its
table (``Protocol.table``); a table none of whose protocols ran is not written.

:func:`compare` asks a :class:`fundus_lab.experiment.run.Run` (configs, checkpoints, cached
evaluations) for every record of the table, then writes the tables from them here; the
records go down to the run and come back, never up again.

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

import csv
import difflib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from fundus_lab import config as C
from fundus_lab.eval import seeds as S
from fundus_lab.eval.explain import DIFFUSE_SHARE
from fundus_lab.eval.metrics import chance_level, majority_rate, metric_fn
from fundus_lab.eval.tables import format_cell, summarise, write_table
from fundus_lab.experiment.protocols import COLUMNS, DEFAULT_PROTOCOLS, PROTOCOLS, TABLES
from fundus_lab.experiment.references import REFERENCES
from fundus_lab.experiment.run import Run
from fundus_lab.experiment.store import write_json
from fundus_lab.models.card import write_model_card

METRIC_NAMES = {"single_label_accuracy": "single-label acc.", "accuracy": "acc.", "kappa": "QW kappa", "auc": "AUC",
                "balanced_accuracy": "bal. acc."}


def compare(
    run: Run | str,
    methods: Sequence[str],
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    references: Sequence[str] = tuple(REFERENCES),
    external: Mapping[str, str | Path] | None = None,
    jobs: int = 1,
    **run_kwargs,
) -> dict[str, Path]:
    """Tables 1 and 2 of ``run`` (a :class:`Run`, or a preset name with ``Run``'s keyword arguments:
    ``run_dir``, ``data_root``, ``overrides``, ``force``) for ``methods`` + ``references``,
    and the outside models ``external`` = {name: path} (:meth:`Run.add_external`).

    Evaluates ``methods`` and ``references`` over every pretraining seed and every outside
    model once (rows: methods, outside models, references; each protocol's columns in its
    ``Protocol.table``). ``jobs`` > 1 first pretrains every row in that many processes
    (:meth:`Run.pretrain_parallel`). Outside models are evaluated first, so a checkpoint that
    does not load fails before any pretraining.

    Returns {"csv", "md", "tex" (Table 1), "table2_csv", "table2_md", "table2_tex", "json",
    "few_shot_*"} paths (a table's keys only where one of its protocols ran).
    """
    if not isinstance(run, Run):
        run = Run(run, **run_kwargs)
    elif run_kwargs:
        raise TypeError(f"compare: {sorted(run_kwargs)} are Run arguments; pass them to Run, not with a Run")
    for name, path in (external or {}).items():
        run.add_external(name, path)
    if not methods and not run.externals:
        raise ValueError("compare: no methods given (nor outside models)")
    known = C.available_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:  # before anything trains: a typo must not cost the methods listed before it
        hints = [f"{m!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(m, known, n=1))
                 else repr(m) for m in unknown]
        raise C.ConfigError(f"methods: unknown {', '.join(hints)}; expected some of {known}")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise C.ConfigError(f"protocols: unknown {bad}; expected some of {list(PROTOCOLS)}")
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise C.ConfigError(f"references: unknown {unknown}; expected some of {list(REFERENCES)}")
    rows = list(dict.fromkeys([*methods, *run.externals, *references]))
    budget = run.budget(methods)  # before training: a config the counter cannot build fails first
    run.pretrain_parallel(rows, jobs)
    results: dict[str, dict[str, list]] = {}
    for method in sorted(rows, key=lambda m: m not in run.externals):  # stable: outside models first
        results[method] = {p: [] for p in protocols}
        for seed in run.seeds_of(method):
            for protocol in protocols:
                res = run.evaluate(method, protocol, seed=seed)
                res["json"] = str(run.run_dir / "eval" / method / f"seed{seed}" / f"{protocol}.json")
                results[method][protocol].append(res)
            run.forget(method)
    return write_results({m: results[m] for m in rows}, run.config(), run.run_dir, protocols, budget=budget)


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
                f"batch {t.batch_size} x {t.grad_accum_steps}; {counted}. " + each + ". "
                f"Reference rows keep the equal-steps frame: the supervised row trains on the images of "
                f"train.steps={t.steps} steps ({t.steps * t.batch_size * t.grad_accum_steps} images), as under "
                f"train.budget=steps.")
    return (f"Budget: equal steps (train.budget=steps): every method trains train.steps={t.steps} steps of "
            f"{t.batch_size} x {t.grad_accum_steps} images; {counted}. " + each + ".")


def _relative(path: str, out_dir: Path) -> str:
    """Paths in the table relative to the run folder: two runs into two folders give the same bytes."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(path)


def _majority_note(metric: str, protocol: str, labels: Mapping[tuple[str, str], np.ndarray], chance: float) -> str:
    """`` (majority class of the test labels: 34.2 in-domain, 39.4 held-out camera)`` for an
    accuracy column whose test labels are imbalanced, so that a reader compares accuracy
    with always answering the commonest class, not only with ``chance`` (1/C); empty where
    the classes are balanced."""
    parts = []
    for column, _, header in COLUMNS:
        y = next((v for (_, key), v in labels.items() if key == f"{protocol}_{column}"), None)
        rate = majority_rate(y, metric) if y is not None else None
        if rate is not None and rate > chance + 1e-9:
            parts.append(f"{100 * rate:.1f} {header}")
    return f" (majority class of the test labels: {', '.join(parts)})" if parts else ""


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
        in_table = [p for p in protocols if PROTOCOLS.get(p).table == table]
        if not in_table:
            continue
        columns, chance = [], []
        for p in in_table:
            proto = PROTOCOLS.get(p)
            metric = info.get(p, {}).get("metric")
            dataset = info.get(p, {}).get("dataset") or getattr(cfg.eval, proto.dataset_key)
            for column, _, header in COLUMNS:
                columns.append((f"{p}_{column}",
                                f"{proto.header.format(k=k)} ({dataset}, {METRIC_NAMES.get(metric, metric)}), {header}"))
            if metric:
                level = chance_level(metric, len(info[p]["classes"]))
                chance.append(f"{proto.header.format(k=k)} {100 * level:.1f}" + _majority_note(metric, p, labels, level))
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
                "run-to-run training noise exceeded it in results/default/2026-12-06/reproducibility.md)")
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


def write_explanation_scores(summary, run_dir: str | Path, split: str = "test") -> dict[str, Path]:
    """Notebook 02's explanation scores as ``explanation_scores.{csv,txt}`` in the run folder:
    per method and map, the attention mass inside lesion masks against a uniform map's share
    (the masks' area fraction) and their ratio, over every scored focal lesion (``lesion == all``:
    masks over at most a quarter of the image; diffuse types such as media opacity only in their
    own rows of the csv)."""
    run_dir = Path(run_dir)
    df = summary.reset_index() if isinstance(summary, pd.DataFrame) else pd.DataFrame(summary)
    df = df.sort_values(["method", "lesion"]).reset_index(drop=True)
    df["ratio_to_uniform"] = df["mass_in_mask"] / df["area_fraction"]
    csv_path = run_dir / "explanation_scores.csv"
    df.to_csv(csv_path, index=False, float_format="%.6f")
    lines = [f"Attention share inside lesion masks vs a uniform map's share ({split} split: in-domain), focal lesions "
             f"(masks over at most {100 * DIFFUSE_SHARE:.0f} % of the image; the csv lists every lesion type):"]
    for _, r in df[df["lesion"] == "all"].iterrows():
        lines.append(f"{r['method']}: {100 * r['mass_in_mask']:.2f} % in masks vs {100 * r['area_fraction']:.2f} % "
                     f"uniform = {r['ratio_to_uniform']:.2f}x (n={int(r['n'])} masks)")
    txt_path = run_dir / "explanation_scores.txt"
    txt_path.write_text("\n".join(lines) + "\n")
    return {"csv": csv_path, "txt": txt_path}
