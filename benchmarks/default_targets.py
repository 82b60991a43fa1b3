"""Every target of the default benchmark, measured on one reproduction's run folder.

    python benchmarks/default_targets.py --run-dir runs/default-rerun --out results/default/targets.md

Reads the run's Tables 1 and 2 (``results/table1.csv``, ``results/table2.csv``) and explanation
scores, and adds what the tables do not show, from the same cached checkpoints and splits:

- ``supervised``'s ODIR-like and FIVES accuracy: a full linear probe (``linear_probe_full``, C chosen on val) on
  synth-odir (single-label accuracy, as zero-shot reports it) and on synth-fives, through
  ``Run.evaluate(..., dataset=...)``; cached beside Table 1's evaluations;
- the prompt playground's rank-first share (``benchmarks/playground_accuracy.py``).

Each line prints the measured figure, its 95 % CI where there is one, the threshold and
whether it is met. Only the in-domain test split is read; nothing here selects anything.
"""

from __future__ import annotations

import argparse
import csv
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHANCE = {"zero_shot": 1 / 8, "few_shot": 1 / 4, "fine_tune": 0.0}
HEADERS = {"zero_shot": "zero-shot synth-odir acc.", "few_shot": "few-shot fine-tune k=16 synth-fives acc.",
           "fine_tune": "fine-tune synth-aptos QW kappa"}


def read_table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def cell(table, row: str, protocol: str, column: str = "in_domain") -> tuple[float, float, float] | None:
    """(mean, ci_low, ci_high) of a Table 1 cell, None where n/a."""
    r = table.get(row)
    if r is None:
        return None
    try:
        return tuple(float(r[f"{protocol}_{column}_{k}"]) for k in ("mean", "ci_low", "ci_high"))
    except (KeyError, ValueError):
        return None


def line(name: str, value: tuple | None, threshold: float, pct: bool = True) -> tuple[str, bool | None]:
    if value is None:
        return f"| {name} | n/a | {threshold:g} | not measured |", None
    mean, lo, hi = value
    scale, digits = (100, 1) if pct else (1, 2)
    ci = f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]" if lo == lo else ""
    ok = mean >= threshold
    shown = f"{scale * threshold:g}"
    return f"| {name} | {scale * mean:.{digits}f}{ci} | >= {shown} | {'met' if ok else 'MISSED'} |", ok


def ranking_pairs(table, protocols) -> list[str]:
    """Pairs of rows whose difference exceeds both CI half-widths, per column."""
    out = []
    for protocol in protocols:
        for column in ("in_domain", "held_out_camera"):
            cells = {m: cell(table, m, protocol, column) for m in table}
            cells = {m: c for m, c in cells.items() if c is not None}
            for a, b in combinations(sorted(cells), 2):
                (ma, la, ha), (mb, lb, hb) = cells[a], cells[b]
                gap = abs(ma - mb)
                if gap > (ha - la) / 2 and gap > (hb - lb) / 2:
                    hi_row, lo_row = (a, b) if ma > mb else (b, a)
                    out.append(f"{protocol} {column}: {hi_row} - {lo_row} = +{100 * gap:.1f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a reproduction's run folder (holds results/table1.csv)")
    p.add_argument("--preset", default="default")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="key=value, as given to reproduce")
    args = p.parse_args(argv)

    from fundus_lab.experiment import Run

    run = Run(args.preset, args.run_dir, args.data_root, args.overrides)
    table_csv = run.run_dir / "results" / "table1.csv"
    if not table_csv.is_file():
        raise SystemExit(f"{table_csv}: no Table 1 in this run folder; run `fundus-lab reproduce` first")
    table = read_table(table_csv)
    table2_csv = run.run_dir / "results" / "table2.csv"  # the k-shot probe (Table 1's few-shot before issue 17)
    table2 = read_table(table2_csv) if table2_csv.is_file() else {}
    rows, verdicts = [], []

    def add(name, value, threshold, pct=True):
        text, ok = line(name, value, threshold, pct)
        rows.append(text)
        verdicts.append(ok)

    def probe(row, dataset):
        rec = run.evaluate(row, "linear_probe_full", column="in_domain", dataset=dataset)["cell"]
        return rec["summary"]["mean"], *rec["ci"]

    add("supervised: synth-odir single-label acc. (linear probe)", probe("supervised", "synth-odir"), 0.6)
    add("supervised: synth-fives acc. (linear probe)", probe("supervised", "synth-fives"), 0.7)
    add("supervised: synth-fives acc. (Table 2, linear probe k=16)", cell(table2, "supervised", "linear_probe"), 0.7)
    add("supervised: synth-aptos QW kappa (Table 1, fine-tune)", cell(table, "supervised", "fine_tune"), 0.6)
    for m in ("clip", "ours"):
        add(f"{m}: zero-shot acc. >= 2x chance", cell(table, m, "zero_shot"), 2 * CHANCE["zero_shot"])
        add(f"{m}: linear probe k=16 acc. >= 2x chance", cell(table2, m, "linear_probe"), 2 * CHANCE["few_shot"])
        add(f"{m}: few-shot fine-tune k=16 acc. >= 2x chance", cell(table, m, "few_shot"), 2 * CHANCE["few_shot"])
        add(f"{m}: fine-tune QW kappa", cell(table, m, "fine_tune"), 0.4)
    floor = []
    for protocol in ("zero_shot", "few_shot", "fine_tune"):
        c = cell(table, "random-init", protocol)
        if c is not None:
            floor.append(f"{HEADERS[protocol]} {100 * c[0]:.1f} (chance {100 * CHANCE[protocol]:.1f})")
    scores_csv = run.run_dir / "explanation_scores.csv"
    if scores_csv.is_file():
        with open(scores_csv, newline="") as f:
            share = {r["method"]: float(r["ratio_to_uniform"]) for r in csv.DictReader(f) if r["lesion"] == "all"}
        for kind in ("last_layer", "rollout"):
            v = share.get(f"ours/{kind}")
            add(f"ours: attention share in focal lesion masks / uniform ({kind}; x)",
                None if v is None else (v, float("nan"), float("nan")), 2.0, pct=False)
    else:
        rows.append(f"| ours: attention share in focal lesion masks | n/a | >= 2 | {scores_csv} missing |")

    import playground_accuracy as pa
    from fundus_lab.data import open_dataset
    from fundus_lab.experiment import dataset_root, ensure_synthetic

    cfg = run.config()
    ensure_synthetic(cfg, [d for _, d, _ in pa.CLASSES], run.data_root)
    model = run.model("ours")
    images, labels = pa.test_images(lambda name: open_dataset(name, root=dataset_root(cfg, name, run.data_root),
                                                             split="test", image_size=cfg.model.img_size))
    pg = pa.rank_first_share(model, images, labels, pa.default_prompts())
    add(f"playground (ours): right class first, 4 classes, n={pg['n']}", (pg["share"], float("nan"), float("nan")), 0.6)

    pairs = ranking_pairs(table, ("zero_shot", "few_shot", "fine_tune"))
    n_met = sum(v is True for v in verdicts)
    n_missed = sum(v is False for v in verdicts)
    text = "\n".join([
        f"Targets of the default benchmark, measured on {run.run_dir} (in-domain test split; percent unless noted)",
        "",
        "| target | measured [95 % CI] | threshold | verdict |",
        "|---|---:|---:|---|",
        *rows,
        "",
        f"{n_met} met, {n_missed} missed.",
        f"random-init (the floor): {'; '.join(floor)}.",
        f"Pairs of rows whose difference exceeds both CI half-widths over test images: {len(pairs)}"
        + (f", e.g. {'; '.join(pairs[:6])}" if pairs else "")
        + ". Not verdicts: these CIs leave out training noise; which row beats which is pairs.md's, over pretraining seeds.",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
