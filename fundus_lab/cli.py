"""``fundus-lab``: the command line over the same library functions the notebooks call.

    fundus-lab synth      write the synthetic benchmark (or one task) as dataset folders + manifests
    fundus-lab pretrain   pretrain a method:  --preset P --method M [--config FILE] key=value ...
    fundus-lab eval       evaluate a checkpoint with one protocol on one dataset
    fundus-lab compare    pretrain several methods under one budget and write Table 1
    fundus-lab reproduce  run every notebook through papermill into runs/<name>/
    fundus-lab manifest   manifest init SOURCE: write a manifest to edit for a labelled CSV or class folders
    fundus-lab predict    class probabilities of images from a saved fine-tuned classifier
    fundus-lab --version

Every command's parser lives here, as a function ``NAME_main(argv) -> int``; the commands are
one :class:`~fundus_lab.registry.Registry` (:data:`SUBCOMMANDS`). A command imports the library
it drives only when it runs, so ``fundus-lab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

from fundus_lab.data.manifest import TASKS, parse_manifest
from fundus_lab.registry import Registry


class Command(NamedTuple):
    """A subcommand: the function ``module.function(argv) -> int`` that runs it, and its one-line help."""

    module: str
    function: str
    help: str


SUBCOMMANDS: Registry[Command] = Registry("command")
SUBCOMMANDS.register("synth", Command("fundus_lab.cli", "synth_main", "write the synthetic fundus benchmark"))
SUBCOMMANDS.register("pretrain", Command("fundus_lab.train", "main", "pretrain a method (accelerate; same code on CPU/GPUs)"))
SUBCOMMANDS.register("eval", Command("fundus_lab.eval.compare", "evaluate_main", "evaluate a checkpoint with one protocol"))
SUBCOMMANDS.register("compare", Command("fundus_lab.eval.compare", "main", "pretrain methods under one budget and write Table 1"))
SUBCOMMANDS.register("reproduce", Command("fundus_lab.reproduce", "main", "run every notebook headlessly into a run folder"))
SUBCOMMANDS.register("manifest", Command("fundus_lab.cli", "manifest_main", "write a manifest for a labelled CSV or class folders"))
SUBCOMMANDS.register("predict", Command("fundus_lab.cli", "predict_main", "class probabilities from a saved fine-tuned classifier"))


def manifest_init_parser() -> argparse.ArgumentParser:
    """The parser of ``fundus-lab manifest init`` (``fundus-lab manifest --help`` prints its help)."""
    ap = argparse.ArgumentParser(prog="fundus-lab manifest init",
                                 description="Write a manifest to edit for a labelled CSV or a folder per class.")
    ap.add_argument("source", help="a CSV (one row per image) or a folder of class subfolders")
    ap.add_argument("--image-column", help="CSV column with image paths (relative to --root)")
    ap.add_argument("--label-column", help="CSV column with the label")
    ap.add_argument("--root", help="folder the image paths are relative to (default: the CSV's folder)")
    ap.add_argument("--task", choices=TASKS, help="default: binary for 2 classes, else multiclass")
    ap.add_argument("--label-separator", help="several labels per cell, separated by this (multilabel)")
    ap.add_argument("--patient-column")
    ap.add_argument("--eye-column")
    ap.add_argument("--text-column")
    ap.add_argument("--split-column")
    ap.add_argument("--sep", default=",", help="CSV field separator")
    ap.add_argument("--name", help="dataset name (default: the file or folder name)")
    ap.add_argument("-o", "--output", help="where to write (default: manifest.yaml beside the source)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return ap


def manifest_init_main(argv: list[str] | None = None) -> int:
    """``fundus-lab manifest init SOURCE [--image-column C --label-column C] [-o manifest.yaml]``."""
    from fundus_lab.data import tabular  # pandas: loaded when the command runs

    ap = manifest_init_parser()
    args = ap.parse_args(argv)
    src = Path(args.source)
    try:
        if src.is_dir():
            manifest = tabular.manifest_from_folder(src, args.task, name=args.name)
            default_out = src / "manifest.yaml"
        else:
            if not args.image_column or not args.label_column:
                ap.error(f"{src}: a CSV needs --image-column and --label-column")
            manifest = tabular.manifest_from_csv(
                src, args.image_column, args.label_column, args.root, args.task, name=args.name, sep=args.sep,
                label_separator=args.label_separator, patient_column=args.patient_column,
                eye_column=args.eye_column, text_column=args.text_column, split_column=args.split_column,
            )
            default_out = src.parent / "manifest.yaml"
        out = Path(args.output) if args.output else default_out
        parse_manifest(manifest, out)  # what we write must load
    except (tabular.TabularError, ValueError) as err:
        print(f"error: {err}")
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite or -o to write elsewhere")
        return 2
    tabular.dump_manifest(manifest, out, str(src))
    n_classes = len(manifest["classes"])
    print(f"wrote {out}: task {manifest['task']}, {n_classes} classes "
          f"({', '.join(c['name'] for c in manifest['classes'][:8])}{' ...' if n_classes > 8 else ''})")
    return 0


def manifest_main(argv: list[str] | None = None) -> int:
    """``fundus-lab manifest init SOURCE ...`` (the one action today)."""
    argv = list(argv or [])
    if argv[:1] in (["-h"], ["--help"]):  # the full help of the one action, not a usage line
        print("fundus-lab manifest: one action, init.\n\n" + manifest_init_parser().format_help())
        return 0
    if not argv or argv[0] != "init":
        print("usage: fundus-lab manifest init SOURCE [--image-column C --label-column C] [-o manifest.yaml]"
              "\n(fundus-lab manifest --help for every option)", file=sys.stderr)
        return 2

    return manifest_init_main(argv[1:])


def predict_main(argv: list[str] | None = None) -> int:
    """``fundus-lab predict CHECKPOINT IMAGES... [--top K] [--json]``: class probabilities per image."""
    ap = argparse.ArgumentParser(prog="fundus-lab predict", description="Class probabilities of a saved fine-tuned classifier.")
    ap.add_argument("checkpoint", help="a folder written by fundus_lab.predict.save_classifier")
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, TIFF)")
    ap.add_argument("--top", type=int, default=0, help="print only the K most likely classes (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"error: no such image file(s): {missing[:5]}")
        return 2
    import numpy as np

    from fundus_lab import predict  # torch: loaded when the command runs
    from fundus_lab.data.images import DataError

    try:
        classifier, info = predict.load_classifier(args.checkpoint, args.device)
        probs = predict.predict_images(classifier, info, args.images, args.batch_size)
    except (predict.ClassifierError, DataError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    classes = info["classes"]
    for path, row in zip(args.images, probs):
        order = np.argsort(-row, kind="stable")
        if args.top:
            order = order[:args.top]
        if args.json:
            print(json.dumps({"image": str(path), "task": info["task"],
                              "probabilities": {classes[i]: round(float(row[i]), 6) for i in order}}))
        else:
            print(f"{path}")
            for i in order:
                print(f"  {classes[i]:<30} {row[i]:.4f}")
    return 0


def synth_main(argv: list[str] | None = None) -> int:
    from fundus_lab.data import synth  # the generator (numpy, PIL, scipy): loaded when the command runs

    parser = argparse.ArgumentParser(prog="fundus-lab synth", description=synth_main.__doc__)
    parser.add_argument("--out", default="data/synth", help="root folder (one sub-folder per task)")
    parser.add_argument("--task", choices=["all", "pretrain", "odir", "fives", "aptos"], default="all")
    parser.add_argument("--n", type=int, default=2000, help="images (pretrain, or the one task)")
    parser.add_argument("--n-eval", type=int, default=600, help="images per evaluation task (with --task all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true",
                        help="re-render a folder that holds a dataset generated with other settings")
    args = parser.parse_args(argv)
    try:
        if args.task == "all":
            manifests = synth.generate_benchmark(
                args.out, n_pretrain=args.n, n_eval=args.n_eval, seed=args.seed,
                image_size=args.image_size, workers=args.workers, overwrite=args.overwrite,
            )
            for task, path in manifests.items():
                print(f"{task}: {path}")
        else:
            path = synth.generate(
                Path(args.out) / f"synth-{args.task}", task=args.task, n=args.n, seed=args.seed,
                image_size=args.image_size, workers=args.workers, overwrite=args.overwrite,
            )
            print(path)
    except synth.SynthSettingsError as err:
        print(f"fundus-lab synth: {err} (here: --out another folder, or --overwrite)", file=sys.stderr)
        return 2
    return 0


synth_main.__doc__ = "Write the procedural synthetic fundus benchmark as dataset folders with manifests."


def help_text() -> str:
    """The top-level help, plain text built from SUBCOMMANDS (the module docstring is reST)."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: fundus-lab COMMAND [options]   (fundus-lab COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in SUBCOMMANDS.items()]
    lines += ["", "  --version  print the installed version",
              "", "Lists of names take one syntax everywhere: --methods clip,coca,ours (or space-separated)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        try:
            print(f"fundus-lab {version('fundus_lab')}")
        except PackageNotFoundError:
            print("fundus-lab (not installed as a package)")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"fundus-lab: unknown command {command!r}{hint}\n\n{help_text()}", file=sys.stderr)
        return 2
    entry = SUBCOMMANDS.get(command)
    result = getattr(importlib.import_module(entry.module), entry.function)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
