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
import copy
import difflib
import importlib
import json
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple, Sequence

from fundus_lab import config as C
from fundus_lab.checkpoint import CheckpointError
from fundus_lab.config import ConfigError, load_config
from fundus_lab.data.manifest import TASKS, parse_manifest
from fundus_lab.names import split_names
from fundus_lab.registry import Registry


class Command(NamedTuple):
    """A subcommand: the function ``module.function(argv) -> int`` that runs it, and its one-line help."""

    module: str
    function: str
    help: str


SUBCOMMANDS: Registry[Command] = Registry("command")
SUBCOMMANDS.register("synth", Command("fundus_lab.cli", "synth_main", "write the synthetic fundus benchmark"))
SUBCOMMANDS.register("pretrain", Command("fundus_lab.cli", "pretrain_main", "pretrain a method (accelerate; same code on CPU/GPUs)"))
SUBCOMMANDS.register("eval", Command("fundus_lab.cli", "evaluate_main", "evaluate a checkpoint with one protocol"))
SUBCOMMANDS.register("compare", Command("fundus_lab.cli", "compare_main", "pretrain methods under one budget and write Table 1"))
SUBCOMMANDS.register("reproduce", Command("fundus_lab.cli", "reproduce_main", "run every notebook headlessly into a run folder"))
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


# the experiment's commands (compare, eval, reproduce): their parsers here, their work in
# fundus_lab.experiment and fundus_lab.reproduce (imported when the command runs, so the
# top-level help stays fast)

def parse_with_overrides(parser: argparse.ArgumentParser, argv, list_options: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the ``key=value`` overrides that a list option took back
    among the overrides: ``--notebooks 07 eval.pretrain_seeds=[0,1,2]`` gives argparse's
    ``nargs="+"`` both words, and a notebook, method, protocol or reference name never holds ``=``."""
    args = parser.parse_args(argv)
    for option in list_options:
        values = getattr(args, option)
        taken = [v for v in values or [] if "=" in v]
        if not taken:
            continue
        kept = [v for v in values if "=" not in v]
        if not kept and option != "references":
            parser.error(f"--{option} {' '.join(values)}: expected at least one name before the key=value overrides")
        setattr(args, option, kept)
        args.overrides = [*(args.overrides or []), *taken]
    return args


def compare_parser(references: Sequence[str], protocols: Sequence[str]) -> argparse.ArgumentParser:
    """``fundus-lab compare --preset P --methods clip,coca,eva,ours [--external NAME=PATH ...]
    [--data-root DIR] [key=value ...]``"""
    parser = argparse.ArgumentParser(prog="fundus-lab compare",
                                     description="Pretrain methods under one budget and write Tables 1 and 2.")
    parser.add_argument("--preset", default=None, help="smoke | default | paper")
    parser.add_argument("--methods", nargs="+", default=["clip,coca,eva,ours"],
                        help="method names, comma-separated (clip,coca,ours) or space-separated")
    parser.add_argument("--references", nargs="*", default=[",".join(references)],
                        help="reference rows, like --methods ('' or nothing for none)")
    parser.add_argument("--config", default=None, help="a YAML file of config sections")
    parser.add_argument("--data-root", default=None, help="root of the synthetic benchmark (default data.synth_root)")
    parser.add_argument("--out", default=None, help="run folder (default eval.output_dir)")
    parser.add_argument("--protocols", nargs="+", default=[",".join(protocols)], help="like --methods")
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
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    from fundus_lab import experiment
    from fundus_lab.models.external import ExternalModelError

    parser = compare_parser(experiment.REFERENCES, experiment.DEFAULT_PROTOCOLS)
    args = parse_with_overrides(parser, argv, ("methods", "references", "protocols"))
    split = split_names
    external = {}
    for item in args.external:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--external {item!r}: expected NAME=PATH")
        if name in external:
            parser.error(f"--external {name!r} is given twice")
        external[name] = path
    try:
        overrides = experiment.jobs_overrides(args.jobs, args.overrides)
        run = experiment.Run(args.preset, args.out, args.data_root, overrides, args.force, path=args.config)
        paths = experiment.compare(run, split(args.methods), split(args.protocols), split(args.references),
                                   external=external, jobs=args.jobs)
    except (C.ConfigError, CheckpointError, ExternalModelError) as err:
        print(f"fundus-lab compare: {err}", file=sys.stderr)
        return 2
    for kind in ("md", "table2_md"):
        if kind in paths:
            print(Path(paths[kind]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def eval_parser(protocols: Sequence[str]) -> argparse.ArgumentParser:
    """``fundus-lab eval --checkpoint DIR --protocol P --dataset NAME [--data-root DIR] [key=value ...]``"""
    parser = argparse.ArgumentParser(prog="fundus-lab eval", description="Evaluate a checkpoint with one protocol.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (uses checkpoint-last)")
    parser.add_argument("--protocol", required=True, choices=list(protocols))
    parser.add_argument("--dataset", required=True, help="a manifest name (e.g. synth-aptos) or a manifest path")
    parser.add_argument("--data-root", default=None, help="dataset folder (synthetic: the benchmark root)")
    parser.add_argument("--preset", default=None,
                        help="preset whose eval settings apply (default: the checkpoint's run's, else default)")
    parser.add_argument("--out", default=None, help="output folder (default <checkpoint>/../eval/<dataset>)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--save-classifier", default=None, metavar="DIR",
                        help="fine_tune only: save the best fine-tuned classifier to DIR (then: fundus-lab predict DIR image.png)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.seeds=2 eval.fine_tune_epochs=3")
    return parser


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
    from fundus_lab import data, experiment, models

    args = eval_parser(experiment.PROTOCOLS).parse_args(argv)
    if args.save_classifier and args.protocol != "fine_tune":
        print(f"fundus-lab eval: --save-classifier needs --protocol fine_tune (got {args.protocol})", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoint-last").exists():
        checkpoint = checkpoint / "checkpoint-last"
    if not checkpoint.exists():
        print(f"fundus-lab eval: --checkpoint {checkpoint} does not exist", file=sys.stderr)
        return 2
    protocol = experiment.PROTOCOLS.get(args.protocol)
    try:  # a mistyped --dataset name is one line with its did-you-mean, before any model loads
        if not Path(args.dataset).expanduser().exists():  # existing paths (CSV, class folders) are read later
            data.manifest.resolve_manifest_path(args.dataset)
    except data.ManifestError as err:
        print(f"fundus-lab eval: --dataset {args.dataset}: {err}", file=sys.stderr)
        return 2
    run_cfg = checkpoint.resolve().parent / "config.yaml"
    try:
        cfg = experiment.checkpoint_eval_config(run_cfg, args.preset,
                                                [*args.overrides, f"eval.{protocol.dataset_key}={args.dataset}"])
    except C.ConfigError as err:
        print(f"fundus-lab eval: {err}", file=sys.stderr)
        return 2
    experiment.apply_runtime(cfg)
    model = models.load_model(checkpoint).to(experiment.device()).eval()
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
            pretrain_ds = experiment.open_split(run, run.data.dataset, "train", image_size, run.data.root)
        except (OSError, ValueError) as err:
            print(f"fundus-lab eval: cannot reopen the pretraining data ({err}); patient overlap not checked",
                  file=sys.stderr)
    result = experiment.evaluate_model(
        model, protocol, cfg, out_dir, args.data_root, None, pretrain_ds,
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


def reproduce_parser(presets: Sequence[str]) -> argparse.ArgumentParser:
    """``fundus-lab reproduce``: every notebook through papermill into ``runs/<name>/``."""
    parser = argparse.ArgumentParser(prog="fundus-lab reproduce", description=reproduce_parser.__doc__)
    parser.add_argument("--preset", choices=presets, default="default")
    parser.add_argument("--data-root", default=None,
                        help="folder of the datasets: the synthetic benchmark is written there, and real datasets "
                             "named in overrides are read from <data-root>/<name> (default: the preset's synth_root)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to compare, comma- or space-separated (default: the preset's)")
    parser.add_argument("--name", default=None, help="run folder name under runs/ (default <preset>-<time>)")
    parser.add_argument("--notebooks", nargs="+", default=None, help="run only these (names or numbers, e.g. 00 04)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--no-progress", action="store_true", help="no per-cell progress bars on stderr")
    parser.add_argument("--jobs", type=int, default=1,
                        help="pretrain the (method, seed) jobs in this many processes first, cores/N threads each "
                             "(default 1: results/benchmarks/parallel_jobs.md)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides for every notebook, e.g. eval.zero_shot_dataset=odir5k eval.seeds=3")
    return parser


def reproduce_main(argv: list[str] | None = None) -> int:
    from fundus_lab import reproduce

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_with_overrides(reproduce_parser(C.PRESETS), argv, ("methods", "notebooks"))
    methods = split_names(args.methods) or None
    try:  # a mistyped key or value fails here, before any notebook starts
        C.load_config(preset=args.preset, overrides=list(args.overrides))
    except (C.ConfigError, ValueError) as err:
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 2
    try:
        command = "fundus-lab reproduce " + shlex.join(argv)
        run_dir = reproduce.reproduce(args.preset, args.data_root, methods, args.name, args.notebooks, args.runs_dir,
                                      overrides=args.overrides, command=command, progress=not args.no_progress,
                                      jobs=args.jobs)
    except reproduce.NotebookFailed as err:
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 1
    except C.ConfigError as err:  # a --name that is not one safe folder name
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


def pretrain_main(argv: list[str] | None = None) -> int:
    """``fundus-lab pretrain`` (also ``accelerate launch -m fundus_lab.cli pretrain ...``)."""
    # torch and the models load only for this command: ``fundus-lab --help`` stays instant
    from fundus_lab import checkpoint, train
    from fundus_lab.run_folder import RESUME_OVERRIDABLE, RunFolderLockedError

    parser = argparse.ArgumentParser(
        prog="fundus-lab pretrain",
        description="Pretrain a method on the configured data (accelerate: the same command on CPU or GPUs).",
    )
    parser.add_argument("--config", help="a YAML file of config sections (may name preset: and method:)")
    parser.add_argument("--preset", help="smoke | default | paper")
    parser.add_argument("--method", help="a method from configs/methods/")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the run folder has checkpoints")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help=f"on resume, let KEY differ from the run's config (one of {', '.join(RESUME_OVERRIDABLE)})")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 model.img_size=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, preset=args.preset, method=args.method, overrides=args.overrides)
    except ConfigError as err:
        print(f"fundus-lab pretrain: {err}", file=sys.stderr)
        return 2
    try:
        run_dir = train.pretrain(cfg, resume=not args.no_resume, allow_changes=args.allow_change)
    except (ConfigError, RunFolderLockedError, checkpoint.CheckpointError) as err:
        print(f"fundus-lab pretrain: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


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
