"""``fundus-lab``: the command line over the same library functions the notebooks call.

    fundus-lab synth      write the synthetic benchmark (or one task) as dataset folders + manifests
    fundus-lab pretrain   pretrain a method:  --preset P --method M [--config FILE] key=value ...
    fundus-lab eval       evaluate a checkpoint with one protocol on one dataset
    fundus-lab compare    pretrain several methods under one budget and write Table 1
    fundus-lab reproduce  run every notebook through papermill into runs/<name>/
    fundus-lab manifest   manifest init SOURCE: write a manifest to edit for a labelled CSV or class folders
    fundus-lab predict    class probabilities of images from a saved fine-tuned classifier
    fundus-lab --version
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fundus_lab.config import ConfigError, load_config

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS = {
    "synth": ("fundus_lab.cli", "synth_main", "write the synthetic fundus benchmark"),
    "pretrain": ("fundus_lab.cli", "pretrain_main", "pretrain a method (accelerate; same code on CPU/GPUs)"),
    "eval": ("fundus_lab.eval.compare", "evaluate_main", "evaluate a checkpoint with one protocol"),
    "compare": ("fundus_lab.eval.compare", "main", "pretrain methods under one budget and write Table 1"),
    "reproduce": ("fundus_lab.reproduce", "main", "run every notebook headlessly into a run folder"),
    "manifest": ("fundus_lab.cli", "manifest_main", "write a manifest for a labelled CSV or class folders"),
    "predict": ("fundus_lab.predict", "predict_main", "class probabilities from a saved fine-tuned classifier"),
}


def manifest_main(argv: list[str] | None = None) -> int:
    """``fundus-lab manifest init SOURCE ...`` (the one action today)."""
    from fundus_lab.data.tabular import manifest_init_main, manifest_init_parser

    argv = list(argv or [])
    if argv[:1] in (["-h"], ["--help"]):  # the full help of the one action, not a usage line
        print("fundus-lab manifest: one action, init.\n\n" + manifest_init_parser().format_help())
        return 0
    if not argv or argv[0] != "init":
        print("usage: fundus-lab manifest init SOURCE [--image-column C --label-column C] [-o manifest.yaml]"
              "\n(fundus-lab manifest --help for every option)", file=sys.stderr)
        return 2

    return manifest_init_main(argv[1:])


def synth_main(argv: list[str] | None = None) -> int:
    from fundus_lab.data import synth

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
            from pathlib import Path

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
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    lines += ["", "  --version  print the installed version",
              "", "Lists of names take one syntax everywhere: --methods clip,coca,ours (or space-separated)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"fundus-lab {version('fundus_lab')}")
        except PackageNotFoundError:
            print("fundus-lab (not installed as a package)")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        import difflib

        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"fundus-lab: unknown command {command!r}{hint}\n\n{help_text()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[command]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
