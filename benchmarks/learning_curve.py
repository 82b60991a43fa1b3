"""Metric against pretraining steps: where each row of Table 1 stands at other budgets.

    python benchmarks/learning_curve.py --steps 300 600 1200 --run-dir-for 600=runs/default-rerun
    python benchmarks/learning_curve.py --pretrain-only --steps 300 1200     # train first, score later

For every budget (``train.steps``; each budget is its own full schedule, warm-up and cosine
included, so a point is what a run of that length gives, not an intermediate checkpoint) it
pretrains the chosen methods and reference rows exactly as ``fundus-lab reproduce`` does
(``experiment.Run`` with ``train.steps=<S>``, one run folder per budget, cached) and scores,
on the **in-domain test split** only (nothing here selects anything):

- zero-shot single-label accuracy on synth-odir (rows with a text tower);
- few-shot k=16 accuracy on synth-fives (Table 1's protocol: k-shot fine-tuning over every k of
  ``eval.shots``, ``eval.few_shot_fine_tune_seeds`` draws each; ``--no-few-shot`` skips it);
- a full linear probe, C chosen on val: single-label accuracy on synth-odir and accuracy on
  synth-fives (the figures the issue's ``supervised`` targets are stated in);
- the attention share inside the generator's lesion masks over a uniform map's share
  (last-layer CLS attention and rollout, the first 48 in-domain test images with lesions:
  notebook 02's score).

For each target still missed at the largest budget it fits ``metric = a + b log2(steps)``
to the measured points and prints the budget where that line meets the target: an
extrapolation, stated as one, never a measurement. ``--run-dir-for S=PATH`` reuses a run
folder that already holds the budget (the default reproduction for 600 steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

# (row, column, threshold): the targets of the default benchmark this curve is drawn for
TARGETS = (
    ("ours", "attention share (last layer)", 2.0),
    ("clip", "attention share (last layer)", 2.0),
    ("supervised", "linear probe synth-odir", 0.6),
    ("supervised", "linear probe synth-fives", 0.7),
    ("ours", "zero-shot synth-odir", 0.25),
    ("clip", "zero-shot synth-odir", 0.25),
)
RATIO_COLUMNS = ("attention share (last layer)", "attention share (rollout)")


def parse_run_dirs(pairs: list[str]) -> dict[int, str]:
    out = {}
    for pair in pairs:
        steps, sep, path = pair.partition("=")
        if not sep or not steps.isdigit() or not path:
            raise SystemExit(f"--run-dir-for: expected STEPS=PATH, got {pair!r}")
        out[int(steps)] = path
    return out


def score_row(run, row: str, n_images: int, few_shot: bool = True) -> dict[str, float]:
    """In-domain figures of one row of one budget's run (cached evaluations)."""
    from fundus_lab.eval import explain
    from fundus_lab.eval.zero_shot import has_text_encoder

    cells = {}
    model = run.model(row)
    if run.applies(row, "zero_shot") and has_text_encoder(model):
        cells["zero-shot synth-odir"] = run.evaluate(row, "zero_shot", column="in_domain")["cell"]["summary"]["mean"]
    cached = (run.run_dir / "eval" / row / f"seed{run.seeds()[0]}" / "few_shot.json").is_file()
    if (few_shot or cached) and run.applies(row, "few_shot"):  # skipped only where it would cost a run
        rec = run.evaluate(row, "few_shot", column="in_domain")
        cells["few-shot fine-tune k=16 synth-fives"] = rec["cell"]["summary"]["mean"]
    for dataset in ("synth-odir", "synth-fives"):
        if run.applies(row, "linear_probe_full"):
            rec = run.evaluate(row, "linear_probe_full", column="in_domain", dataset=dataset)
            cells[f"linear probe {dataset}"] = rec["cell"]["summary"]["mean"]
    if "attention_maps" in getattr(model, "capabilities", ()):
        test = run_dataset(run, "synth-odir", "test")
        summary = explain.lesion_attention_summary({row: model}, test, n_images=n_images)
        df = summary.reset_index() if hasattr(summary, "reset_index") else summary
        for kind, column in (("last_layer", RATIO_COLUMNS[0]), ("rollout", RATIO_COLUMNS[1])):
            hit = df[(df["method"] == f"{row}/{kind}") & (df["lesion"] == "all")]
            if len(hit):
                cells[column] = float(hit["mass_in_mask"].iloc[0] / hit["area_fraction"].iloc[0])
    run.forget(row)
    return cells


def run_dataset(run, name: str, split: str):
    from fundus_lab.experiment import open_split

    cfg = run.config()
    return open_split(cfg, name, split, cfg.model.img_size, run.data_root)


def pretrain_seconds(run, row: str) -> float | None:
    from fundus_lab.experiment import KEY_FILE, read_json

    saved = read_json(run.run_dir / "pretrain" / row / f"seed{run.seeds()[0]}" / KEY_FILE) or {}
    return saved.get("seconds")


def extrapolate(steps: list[int], values: list[float], target: float) -> str:
    """Where ``a + b log2(steps)`` (least squares over the points) meets ``target``."""
    pts = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    if len(pts) < 2:
        return "too few points to extrapolate"
    x = np.log2([s for s, _ in pts])
    y = np.asarray([v for _, v in pts])
    b, a = np.polyfit(x, y, 1)
    if b <= 0:
        return f"not rising over the measured budgets (slope {b:+.3f} per doubling): no budget follows from this curve"
    need = 2 ** ((target - a) / b)
    return f"log-linear fit {a:.3f} {b:+.3f}*log2(steps) meets {target:g} at ~{need:,.0f} steps (extrapolated)"


def fmt(column: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if column in RATIO_COLUMNS else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 600, 1200])
    p.add_argument("--methods", nargs="+", default=["ours", "clip"])
    p.add_argument("--references", nargs="*", default=["supervised"])
    p.add_argument("--run-dir-for", nargs="*", default=[], metavar="STEPS=PATH")
    p.add_argument("--curve-root", default="runs/curve", help="run folders of the other budgets: <root>/steps<S>")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n-images", type=int, default=48, help="lesion images scored for the attention share")
    p.add_argument("--pretrain-only", action="store_true", help="train every budget's rows, score nothing")
    p.add_argument("--no-few-shot", action="store_true",
                   help="skip few-shot k=16 (a k-shot fine-tuning per k and draw: the slowest score on a CPU)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)

    from fundus_lab.experiment import Run

    run_dirs = parse_run_dirs(args.run_dir_for)
    rows = [*args.methods, *args.references]
    results: dict[tuple[str, int], dict] = {}
    for steps in sorted(args.steps):
        run = Run(args.preset, run_dirs.get(steps, Path(args.curve_root) / f"steps{steps}"), args.data_root,
                  [f"train.steps={steps}"])
        for row in rows:
            start = time.time()
            run.checkpoint(row)
            if args.pretrain_only:
                print(f"steps {steps}: {row} pretrained ({time.time() - start:.0f} s)", flush=True)
                continue
            cells = score_row(run, row, args.n_images, few_shot=not args.no_few_shot)
            cells["pretrain s"] = pretrain_seconds(run, row)
            results[(row, steps)] = cells
            print(f"steps {steps}: {row}: " + ", ".join(f"{k} {fmt(k, v)}" for k, v in cells.items()
                                                        if k != "pretrain s"), flush=True)
    if args.pretrain_only:
        return 0

    columns = ["zero-shot synth-odir", "few-shot fine-tune k=16 synth-fives", "linear probe synth-odir",
               "linear probe synth-fives", *RATIO_COLUMNS]
    lines = [f"Metric against pretraining steps (preset {args.preset}, in-domain test split; accuracies in %, "
             "attention share as a multiple of a uniform map's; each budget a full schedule)", "",
             "| row | steps | " + " | ".join(columns) + " | pretraining s |",
             "|---|---:|" + "---:|" * (len(columns) + 1)]
    for row in rows:
        for steps in sorted(args.steps):
            cells = results[(row, steps)]
            sec = cells.get("pretrain s")
            seconds = f"{sec:.0f}" if sec is not None else "n/a"
            lines.append(f"| {row} | {steps} | " + " | ".join(fmt(c, cells.get(c)) for c in columns)
                         + f" | {seconds} |")
    lines += ["", "Targets at the largest budget measured:"]
    top = max(args.steps)
    for row, column, threshold in TARGETS:
        if row not in rows:
            continue
        values = [results[(row, s)].get(column) for s in sorted(args.steps)]
        last = values[-1]
        if last is None:
            continue
        shown = fmt(column, threshold)
        if last >= threshold:
            lines.append(f"- {row}, {column} >= {shown}: met at {top} steps ({fmt(column, last)})")
        else:
            lines.append(f"- {row}, {column} >= {shown}: missed at {top} steps ({fmt(column, last)}); "
                         + extrapolate(sorted(args.steps), values, threshold))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
