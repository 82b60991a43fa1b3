"""What a notebook's run needs beyond the experiment itself: which run folder it opens
(``runs/latest``, the pointer ``fundus-lab reproduce`` writes, with that run's recorded
parameters) and, when a checkpoint is missing, what would be trained and about how long
(:class:`CheckpointMissing`). :class:`fundus_lab.experiment.run.Run` reads these when it
is built for a notebook (``fl.Run(notebook=...)``).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from fundus_lab import config as C
from fundus_lab.experiment.configs import normalise_overrides
from fundus_lab.experiment.store import KEY_FILE, project_root, read_json
from fundus_lab.names import check_name, split_names

# the notebooks' default run_dir: the run folder runs/latest names (see latest_run)
LATEST = "latest"
LATEST_POINTER = "runs/latest"
# where notebooks work when no reproduce run exists yet
SCRATCH_RUN_DIR = "runs/notebooks"
# methods each preset compares when none are given
DEFAULT_METHODS = {
    "smoke": ["clip", "ours"],
    # the paper's Table 1 on a laptop; `--methods` adds mae, flair, vilref and the ablations
    "default": ["clip", "coca", "eva", "ours"],
    "paper": ["clip", "coca", "eva", "mae", "flair", "vilref", "ours"],
}


class CheckpointMissing(RuntimeError):
    """A notebook asked for a checkpoint the run folder lacks, without ``train_if_missing=True``.

    ``plan`` lists what would be trained (``Run.untrained`` entries, each with ``seconds``:
    the estimate, or None where no rate was measured)."""

    def __init__(self, run_dir: Path, plan: list[dict]):
        self.run_dir, self.plan = run_dir, plan
        lines = [f"{p['method']} (seed {p['seed']}): {p['steps']} steps of batch {p['batch_size']}"
                 + (f", about {format_duration(p['seconds'])} ({p['rate_source']})" if p.get("seconds") is not None
                    else " (no measured rate on this machine yet)") for p in plan]
        known = [p["seconds"] for p in plan if p.get("seconds") is not None]
        total = (f"about {format_duration(sum(known))} in all" + (" plus the runs without a rate" if len(known) < len(plan) else "")
                 if known else "time unknown")
        super().__init__(
            f"no finished checkpoint in {run_dir} for what this cell needs; it would train ({total}):\n  "
            + "\n  ".join(lines)
            + "\nNotebooks do not train unless asked: set train_if_missing = True in the parameters cell and rerun, "
              "or run `make reproduce` (fundus-lab reproduce --preset <preset>) and reopen the notebook on runs/latest.")


def format_duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``1.5 h``: an estimate's precision, no more."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def write_latest(run_dir: Path, runs_dir: Path) -> Path:
    """Point ``runs_dir/latest`` at ``run_dir``: one line, the folder name (relative to
    ``runs_dir`` when inside it, else absolute). A text file works where symlinks do not (Windows)."""
    run_dir, runs_dir = Path(run_dir).resolve(), Path(runs_dir).resolve()
    pointer = runs_dir / LATEST
    if pointer.is_dir():  # a folder (or a symlink to one) named latest is the user's: leave it
        raise FileExistsError(f"{pointer} is a folder; reproduce writes runs/latest as a one-line file naming "
                              "the last run: rename that folder")
    target = run_dir.relative_to(runs_dir) if run_dir.is_relative_to(runs_dir) else run_dir
    tmp = pointer.with_name(f".latest.{time.time_ns()}.tmp")
    tmp.write_text(f"{target.as_posix()}\n")
    tmp.replace(pointer)
    return pointer


def latest_run(pointer: str | Path = LATEST_POINTER) -> Path | None:
    """The run folder ``runs/latest`` names (a one-line file, or a folder/symlink itself);
    None when there is no pointer yet. A pointer naming a missing folder is an error.

    The default pointer is the nearest ``runs/latest`` from the current directory upwards, as
    git finds ``.git``: a notebook opened in JupyterLab runs in ``notebooks/``, and the run
    folders lie beside it in the checkout's ``runs/``."""
    if str(pointer) == LATEST_POINTER:
        here = Path.cwd().resolve()
        found = next((d / pointer for d in (here, *here.parents) if (d / pointer).exists()), None)
        pointer = found if found is not None else C.resolve_path(pointer)
    else:
        pointer = C.resolve_path(pointer)
    if pointer.is_dir():
        return pointer
    if not pointer.is_file():
        return None
    lines = [ln.strip() for ln in pointer.read_text().splitlines() if ln.strip()]
    if len(lines) != 1:
        raise ValueError(f"{pointer}: expected one line naming a run folder (written by fundus-lab reproduce), "
                         f"found {len(lines)} lines")
    target = Path(lines[0])
    run = target if target.is_absolute() else pointer.parent / target
    if not run.is_dir():
        raise FileNotFoundError(f"{pointer} names the run folder {run}, which does not exist; "
                                "run `make reproduce` again, or pass run_dir= a run folder")
    return run


def run_parameters(run_dir: Path) -> dict:
    """What ``reproduce`` ran ``run_dir`` with (its ``parameters.json``); {} for a folder it did not make."""
    path = Path(run_dir) / "parameters.json"
    if not path.is_file():
        return {}
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected the parameters fundus-lab reproduce wrote") from None
    if not isinstance(params, dict) or params.get("preset") not in C.PRESETS:
        raise ValueError(f"{path}: field 'preset' must be one of {C.PRESETS}, got {params.get('preset') if isinstance(params, dict) else params!r}")
    return params


def notebook_arguments(notebook: str, preset: str | None, run_dir: str | Path | None, data_root, methods,
                       overrides) -> tuple[str, Path, Any, list[str], dict[str, Any]]:
    """(preset, run folder, data root, methods, overrides) of a notebook's run from its
    ``parameters`` cell: ``run_dir`` ``"latest"`` (or None) is the run ``runs/latest`` names,
    else ``runs/notebooks`` when no run exists yet; what the cell leaves None comes from the
    run's ``parameters.json``, else the preset's defaults; ``overrides`` apply over the run's."""
    if preset is not None and preset not in C.PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {C.PRESETS} (or None: the run's)")
    check_name(notebook, "notebook name")  # it names figures/<name>/ and tables/<name>/
    if run_dir is None or str(run_dir) == LATEST:
        run = latest_run()
        if run is None:
            run = C.resolve_path(SCRATCH_RUN_DIR)
            print(f"fundus_lab: no finished run yet ({LATEST_POINTER} is written by `make reproduce`); "
                  f"working in {run}, where checkpoints are trained only with train_if_missing=True")
    else:
        run = C.resolve_path(run_dir)
    made_with = run_parameters(run)
    if preset is None:
        preset = made_with.get("preset", "default")
    elif made_with and preset != made_with["preset"]:
        raise ValueError(f"preset={preset!r}, but {run / 'parameters.json'} says this run was made with preset "
                         f"{made_with['preset']!r}; set preset = None to use the run's, or run_dir to another run")
    if data_root is None:
        data_root = made_with.get("data_root")
    if not split_names(methods):
        methods = made_with.get("methods")
    overrides = {**normalise_overrides(made_with.get("overrides")), **normalise_overrides(overrides)}
    methods = split_names(methods)

    known = C.available_methods()
    if methods:
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"methods: {unknown} are not in configs/methods ({', '.join(known)})")
        chosen = list(methods)
    else:
        chosen = [m for m in DEFAULT_METHODS[preset] if m in known] or known
    run.mkdir(parents=True, exist_ok=True)
    return preset, run, data_root, chosen, overrides


def _recorded_rates(preset: str, run_dir: Path) -> dict[tuple[str, int], list[float]]:
    """Seconds per step of finished pretraining runs at ``preset``: under ``runs/*/`` and
    ``run_dir``, keyed by (method, batch size), from each run's ``cache_key.json`` and ``config.yaml``."""
    rates: dict[tuple[str, int], list[float]] = {}
    folders = {p.resolve() for p in C.resolve_path("runs").glob("*/pretrain/*/seed*")}
    folders |= {p.resolve() for p in Path(run_dir).glob("pretrain/*/seed*")}
    for folder in sorted(folders):
        saved = read_json(folder / KEY_FILE) or {}
        if not saved.get("complete") or not saved.get("seconds") or not (folder / "config.yaml").is_file():
            continue
        try:
            cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            steps, batch = int(cfg["train"]["steps"]), int(cfg["train"]["batch_size"])
        except (yaml.YAMLError, KeyError, TypeError, ValueError):
            continue
        if cfg.get("preset") == preset and steps > 0:
            rates.setdefault((folder.parent.name, batch), []).append(float(saved["seconds"]) / steps)
    return rates


def _benchmark_rates(batch_size: int, img_size: int) -> dict[str, float]:
    """Seconds per step per method from ``results/benchmarks/train_throughput.md`` tables measured
    at this batch and image size; {} when there are none. The fastest timing of a method is kept:
    other jobs on the machine only ever slow a timing down."""
    path = project_root() / "results" / "benchmarks" / "train_throughput.md"
    if not path.is_file():
        return {}
    found: dict[str, list[float]] = {}
    matching = False
    for line in path.read_text().splitlines():
        header = re.search(r"batch (\d+) x (\d+)px", line)
        if header:
            matching = (int(header[1]), int(header[2])) == (batch_size, img_size)
            continue
        row = re.match(r"^(\S+)\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+([\d.]+)\s", line)
        if matching and row:
            found.setdefault(row[1], []).append(float(row[2]))
    return {m: min(v) for m, v in found.items()}


def estimate_training(entry: Mapping[str, Any], preset: str, run_dir: Path) -> dict:
    """``{"seconds", "rate_source"}`` for one ``Run.untrained`` entry: its steps times the
    seconds per step measured by finished runs of the same method, preset and batch here,
    else the rate recorded in ``results/benchmarks/train_throughput.md`` at the same batch
    and image size; seconds None when neither has one."""
    measured = _recorded_rates(preset, run_dir).get((entry["method"], entry["batch_size"]))
    if measured:
        return {"seconds": entry["steps"] * statistics.median(measured),
                "rate_source": f"rate of {len(measured)} finished {entry['method']} run(s) at preset {preset} here"}
    if entry["kind"] == "pretrain":
        cfg = C.resolve_config(preset, entry["method"])
        rate = _benchmark_rates(entry["batch_size"], cfg.model.img_size).get(entry["method"])
        if rate is not None:
            return {"seconds": entry["steps"] * rate,
                    "rate_source": "rate recorded in results/benchmarks/train_throughput.md, idle CPU"}
    return {"seconds": None, "rate_source": None}
