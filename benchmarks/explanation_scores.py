"""Notebook 02's explanation table on a finished run folder, without running the notebook.

    python benchmarks/explanation_scores.py --run-dir runs/default-2026-12-07b --out results/default

The same call as notebook 02's scoring cell: ``explain.lesion_attention_summary`` of every
method's image tower over the first 48 in-domain test images with a lesion, written by
``experiment.write_explanation_scores`` as ``explanation_scores.{csv,txt}`` into ``--out``.
Nothing is trained (a missing checkpoint is an error); use it to re-score a recorded run when
the scoring changes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a reproduction's run folder")
    p.add_argument("--out", required=True, help="folder for explanation_scores.{csv,txt}")
    p.add_argument("--preset", default="default")
    p.add_argument("--data-root", default=None)
    p.add_argument("--methods", default="clip,coca,eva,ours")
    p.add_argument("--n-images", type=int, default=48)
    args = p.parse_args(argv)

    import fundus_lab as fl
    from fundus_lab.eval import explain

    start = time.time()
    run = fl.Run(args.preset, args.run_dir, args.data_root, [], methods=args.methods.split(","),
                 train_if_missing=False)
    ds = run.dataset("synth-odir", split="test")
    summary = explain.lesion_attention_summary({m: run.model(m) for m in run.methods}, ds, n_images=args.n_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = fl.experiment.write_explanation_scores(summary, out)
    print(paths["txt"].read_text(), end="")
    print(f"{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
