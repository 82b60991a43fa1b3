"""Run every numbered notebook headlessly into one run folder, and what the notebooks share.

``fundus-lab reproduce --preset smoke|default|paper`` (or :func:`reproduce`) executes
``notebooks/NN_*.ipynb`` in order through papermill, passing the same parameters to each
(``preset``, ``run_dir``, ``data_root``, ``methods``), and writes::

    runs/<name>/
        notebooks/NN_*.ipynb      executed copies (outputs included) and .html renderings
        figures/<notebook>/*.png|svg
        tables/<notebook>/*.csv|md
        pretrain/<method>/seed<k>/  pretraining runs (shared by the notebooks and Table 1)
        eval/                     evaluation results of the comparison
        logs/NN_*.log             each kernel's stdout/stderr
        status.json               per notebook: ok | failed | not run, seconds
        index.html, README.md     the tables and figures, with links to each notebook
    runs/latest                   a one-line text file naming the last run that finished
                                  (written by reproduce; a file, not a symlink, so it works on Windows)

A failing notebook stops the run; the error names the notebook and the failing cell, and
everything that finished (and the failing notebook, executed up to the error) is kept.

Notebooks stay thin by calling :func:`notebook_context` once: it returns the run's
:class:`fundus_lab.experiment.Run` (configs from one function, checkpoints cached in the run
folder, the evaluations Table 1 reads), with paths resolved against the project root so a
notebook behaves the same from JupyterLab, papermill or nbval.

Notebooks explore what ``reproduce`` made: opened in JupyterLab with their defaults they read
the run ``runs/latest`` names (its preset, methods, data and overrides from its
``parameters.json``) and never train by surprise. A missing checkpoint raises
:class:`CheckpointMissing`, which says what would be trained and about how long; the notebook
parameter ``train_if_missing=True`` trains it (with a progress bar). ``reproduce`` passes
``train_if_missing=True`` to every notebook, so its papermill runs train what they need.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
# the numbered notebooks ship inside the package (``notebooks/`` at the checkout root links here),
# so ``fundus-lab reproduce`` finds them after a plain ``pip install .`` too
NOTEBOOK_DIR = PACKAGE_DIR / "notebooks"
PRESETS = ("smoke", "default", "paper")
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


def read_status(path: Path) -> dict:
    """A reused run folder's ``status.json`` ({notebook: {state, seconds}}), {} when absent; a
    damaged one is a ValueError naming it, before any notebook runs."""
    if not path.is_file():
        return {}
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        status, why = None, f"not valid JSON ({err})"
    else:
        why = "expected a JSON object of {notebook: {\"state\": ..., \"seconds\": ...}}"
    if isinstance(status, dict) and all(isinstance(v, dict) for v in status.values()):
        return status
    raise ValueError(f"{path}: {why}; it records which notebooks of this run ran: delete it (the notebooks not "
                     "run now then show as 'not run') or reproduce into a new --name")


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


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the notebook, the failing cell (1-based, as in the committed file) and the error."""

    def __init__(self, notebook: Path, cell_index: int | None, source: str, error: str, output: Path):
        self.notebook, self.cell_index, self.source, self.error, self.output = notebook, cell_index, source, error, output
        first = next((ln for ln in source.splitlines() if ln.strip()), "")
        cell = f"cell {cell_index}" if cell_index is not None else "a cell"
        super().__init__(f"{notebook.name} failed in {cell} ({first.strip()[:80]!r}): {error}\n  executed copy: {output}")


# ---------------------------------------------------------------------------------------
# paths


def project_root() -> Path:
    """The checkout holding ``pyproject.toml`` (editable install), else the working directory.

    Only to name the code that ran (:func:`git_commit`); relative run and data folders resolve
    against the working directory (:func:`resolve_path`), never against the checkout."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "fundus_lab").is_dir():
        return root
    return Path.cwd()


def resolve_path(path: str | Path) -> Path:
    """:func:`fundus_lab.config.resolve_path`: relative to the current working directory."""
    from fundus_lab.config import resolve_path as resolve

    return resolve(path)


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
        pointer = found if found is not None else resolve_path(pointer)
    else:
        pointer = resolve_path(pointer)
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
    if not isinstance(params, dict) or params.get("preset") not in PRESETS:
        raise ValueError(f"{path}: field 'preset' must be one of {PRESETS}, got {params.get('preset') if isinstance(params, dict) else params!r}")
    return params


def list_notebooks(notebook_dir: str | Path | None = None, select: Sequence[str] | None = None) -> list[Path]:
    """``NN_*.ipynb`` in order; ``select`` keeps those whose name or number matches (``"04"``, ``"04_zero_shot"``)."""
    folder = Path(notebook_dir) if notebook_dir is not None else NOTEBOOK_DIR
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {folder}")
    if not select:
        return found
    picked = []
    for s in select:
        s = str(s).removesuffix(".ipynb")
        hits = [p for p in found if p.stem == s or p.stem.split("_", 1)[0] == s]
        if not hits:
            raise ValueError(f"notebook {s!r} not found; available: {', '.join(p.stem for p in found)}")
        picked += [h for h in hits if h not in picked]
    return sorted(picked)


# ---------------------------------------------------------------------------------------
# what notebooks share: one Run (fundus_lab.experiment), plus where each notebook writes


def make_config(preset: str, method: str | None = None, run_dir: str | Path | None = None,
                data_root: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None):
    """The config of ``method`` in the run ``run_dir``: ``Run(...).config(method)``, the same
    :func:`fundus_lab.config.resolve_config` that Table 1 uses."""
    from fundus_lab.experiment import Run

    return Run(preset, run_dir, data_root, overrides).config(method)


def ensure_data(cfg) -> Path:
    """Write the synthetic benchmark under ``cfg.data.synth_root`` unless it is up to date; returns that root."""
    from fundus_lab.experiment import ensure_synthetic

    return ensure_synthetic(cfg)


def _context_class():
    from fundus_lab.experiment import Run

    class NotebookContext(Run):
        """One notebook's view of the run: the shared :class:`~fundus_lab.experiment.Run`
        (configs, checkpoints, cached evaluations: the numbers Table 1 shows) plus the
        notebook's own figure and table folders and the methods it compares."""

        def __init__(self, name: str, preset: str, run_dir: Path, data_root, methods: list[str], overrides,
                     train_if_missing: bool = False):
            super().__init__(preset, run_dir, data_root, overrides)
            self.name, self.methods = name, list(methods)
            self.train_if_missing = bool(train_if_missing)
            self.figures = self.run_dir / "figures" / name
            self.tables = self.run_dir / "tables" / name

        def __repr__(self) -> str:
            return (f"NotebookContext({self.name!r}, preset={self.preset!r}, run_dir={str(self.run_dir)!r}, "
                    f"methods={self.methods}, overrides={self.overrides}, train_if_missing={self.train_if_missing})")

        def config(self, method: str | None = None, seed: int | None = None):
            cfg = super().config(method, seed)
            if self.train_if_missing and method is not None:
                cfg.train.progress = True  # training asked for from a notebook shows its bar (not part of the cache key)
            return cfg

        def checkpoint(self, method: str, seed: int | None = None, callbacks=()) -> Path:
            """The cached checkpoint; trains it only with ``train_if_missing=True``, else raises
            :class:`CheckpointMissing` saying what would be trained and about how long."""
            if not self.train_if_missing:
                plan = self.untrained(method, seed)
                if plan:
                    raise CheckpointMissing(self.run_dir, [{**p, **estimate_training(p, self.preset, self.run_dir)}
                                                           for p in plan]) from None
            return super().checkpoint(method, seed, callbacks)

        def data(self) -> Path:
            """The synthetic benchmark's root, written on first use."""
            return ensure_data(self.config())

        def dataset(self, name: str, split: str = "test", **kwargs):
            """``fl.data.open_dataset`` with this run's data root and the preset's image size."""
            from fundus_lab.data import open_dataset
            from fundus_lab.experiment import dataset_root

            cfg = self.config()
            root = kwargs.pop("root", None)
            if root is None and name.startswith("synth-"):
                ensure_data(cfg)
            if root is None:  # synthetic: <data_root>/<name>; real: <data_root>/<name> (or the manifest's own)
                root = dataset_root(cfg, name, self.data_root)
            kwargs.setdefault("image_cache", cfg.data.image_cache)
            kwargs.setdefault("image_cache_dir", cfg.data.image_cache_dir)
            return open_dataset(name, root=root, split=split, image_size=kwargs.pop("image_size", cfg.model.img_size),
                                **kwargs)

        def figure_dir(self) -> Path:
            self.figures.mkdir(parents=True, exist_ok=True)
            return self.figures

        def table_dir(self) -> Path:
            self.tables.mkdir(parents=True, exist_ok=True)
            return self.tables

    return NotebookContext


def notebook_context(
    name: str,
    preset: str | None = None,
    run_dir: str | Path | None = LATEST,
    data_root: str | Path | None = None,
    methods: Sequence[str] | str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    train_if_missing: bool = False,
):
    """The one call at the top of every notebook, from its ``parameters`` cell's values.

    Args:
        name: the notebook's name; its figures and tables go to ``figures/<name>/`` and
            ``tables/<name>/`` in the run folder.
        preset: ``smoke`` | ``default`` | ``paper``; None = the run's (from its
            ``parameters.json``), else ``default``.
        run_dir: the run folder (relative paths are from the project root); ``"latest"`` (or
            None) = the one ``runs/latest`` names, the last finished ``make reproduce``, else
            ``runs/notebooks`` when no run exists yet.
        data_root: folder of the synthetic benchmark; None = the run's, else the preset's.
        methods: the methods to compare (list, or comma-separated); None = the run's, else the
            preset's default.
        overrides: config overrides for every config of the run (``["eval.zero_shot_dataset=odir5k"]``
            or a dict), applied over the run's own, e.g. to evaluate on a real dataset found under
            ``data_root``.
        train_if_missing: train a checkpoint the run folder lacks; False (the default) raises
            :class:`CheckpointMissing` with what would be trained and about how long instead.
    Returns:
        a ``NotebookContext``: a :class:`fundus_lab.experiment.Run` with figure/table folders.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {PRESETS} (or None: the run's)")
    from fundus_lab.config import available_methods, check_name, split_names

    check_name(name, "notebook name")  # it names figures/<name>/ and tables/<name>/

    if run_dir is None or str(run_dir) == LATEST:
        run = latest_run()
        if run is None:
            run = resolve_path(SCRATCH_RUN_DIR)
            print(f"fundus_lab: no finished run yet ({LATEST_POINTER} is written by `make reproduce`); "
                  f"working in {run}, where checkpoints are trained only with train_if_missing=True")
    else:
        run = resolve_path(run_dir)
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
    overrides = {**parse_overrides(made_with.get("overrides")), **parse_overrides(overrides)}
    methods = split_names(methods)

    known = available_methods()
    if methods:
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"methods: {unknown} are not in configs/methods ({', '.join(known)})")
        chosen = list(methods)
    else:
        chosen = [m for m in DEFAULT_METHODS[preset] if m in known] or known
    run.mkdir(parents=True, exist_ok=True)
    return _context_class()(name, preset, run, data_root, chosen, overrides, train_if_missing)


def _recorded_rates(preset: str, run_dir: Path) -> dict[tuple[str, int], list[float]]:
    """Seconds per step of finished pretraining runs at ``preset``: under ``runs/*/`` and
    ``run_dir``, keyed by (method, batch size), from each run's ``cache_key.json`` and ``config.yaml``."""
    import yaml

    from fundus_lab.experiment import KEY_FILE, read_json

    rates: dict[tuple[str, int], list[float]] = {}
    folders = {p.resolve() for p in resolve_path("runs").glob("*/pretrain/*/seed*")}
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
    import re

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
    import statistics

    measured = _recorded_rates(preset, run_dir).get((entry["method"], entry["batch_size"]))
    if measured:
        return {"seconds": entry["steps"] * statistics.median(measured),
                "rate_source": f"rate of {len(measured)} finished {entry['method']} run(s) at preset {preset} here"}
    if entry["kind"] == "pretrain":
        from fundus_lab.config import resolve_config

        cfg = resolve_config(preset, entry["method"])
        rate = _benchmark_rates(entry["batch_size"], cfg.model.img_size).get(entry["method"])
        if rate is not None:
            return {"seconds": entry["steps"] * rate,
                    "rate_source": "rate recorded in results/benchmarks/train_throughput.md, idle CPU"}
    return {"seconds": None, "rate_source": None}


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", ...]`` (texts typed by the schema, as on the command line) or a mapping -> ``{"a.b": value}``."""
    from fundus_lab.experiment import normalise_overrides

    return normalise_overrides(overrides)


# ---------------------------------------------------------------------------------------
# running the notebooks


# the kernel's own start-up log (not the notebook's output or errors) writes to our stderr, and
# on every start warns that it runs "over TCP without encryption" (a local kernel, one user):
# once per notebook in a run. Its app log stays at ERROR, so only real kernel failures show.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)


def _notebook_parameters(path: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(path)).keys())


def run_notebook(path: Path, out_path: Path, parameters: Mapping[str, Any], log_path: Path, cwd: Path,
                 kernel_name: str | None = None, progress: str | None = None) -> None:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the failing cell.

    ``progress`` labels papermill's per-cell bar on stderr (``notebook 2/8 01_pretrain: 3/9 cells``);
    None runs quietly."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    declared = _notebook_parameters(path)
    params = {k: v for k, v in parameters.items() if k in declared}  # no "unknown parameter" noise
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        try:
            papermill.execute_notebook(
                str(path), str(out_path), parameters=params, cwd=str(cwd), kernel_name=kernel_name,
                progress_bar={"desc": progress} if progress else False, log_output=False,
                stdout_file=log, stderr_file=log, extra_arguments=list(KERNEL_ARGUMENTS),
            )
        except PapermillExecutionError as err:
            raise NotebookFailed(path, _code_cell_number(out_path, err.cell_index), err.source, f"{err.ename}: {err.evalue}", out_path) from None


def _code_cell_number(executed: Path, cell_index: int | None) -> int | None:
    """The failing cell's 1-based position in the committed notebook.

    Papermill adds cells (injected parameters, an error banner); the failing cell is the
    one whose output is an error, counted without those.
    """
    if not executed.is_file():
        return None if cell_index is None else cell_index + 1
    import nbformat

    added = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [c for c in nbformat.read(executed, as_version=4).cells if not added & set(c.metadata.get("tags", []))]
    for i, c in enumerate(cells, 1):
        if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            return i
    return None if cell_index is None else cell_index + 1


def reproduce(
    preset: str = "default",
    data_root: str | Path | None = None,
    methods: Sequence[str] | None = None,
    run_name: str | None = None,
    notebooks: Sequence[str] | None = None,
    runs_dir: str | Path = "runs",
    kernel_name: str | None = None,
    notebook_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    overrides: Sequence[str] | None = None,
    command: str | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> Path:
    """Run the notebooks in order into ``runs_dir/<run_name>`` and write its index; returns the run folder.

    Args:
        preset: ``smoke`` | ``default`` | ``paper``.
        data_root: folder of the synthetic benchmark (default: the preset's).
        methods: methods to compare (default: the preset's list).
        run_name: folder name (default ``<preset>-<UTC time>``); an existing run folder is
            reused, so its trained checkpoints are too.
        notebooks: a subset by name or number (default: all).
        kernel_name: Jupyter kernel (default: the notebooks' own, ``python3``).
        notebook_dir: where the notebooks are (default: the package's ``notebooks/``).
        overrides: ``key=value`` config overrides passed to every notebook.
        command: the command line as typed, recorded in ``results/`` (default: rebuilt
            from these arguments).
        progress: a bar per notebook on stderr, counting its cells (notebook i/N, cell j/M);
            False keeps stderr quiet (``log`` still gets one line per notebook).
        jobs: > 1 pretrains every (method, seed) of the run and the trained reference rows in
            that many processes before the first notebook (:meth:`Run.pretrain_parallel`), with
            ``train.num_threads`` = cores / jobs added to ``overrides`` unless they set it.

    Raises:
        NotebookFailed: after writing the index, which shows what finished.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {PRESETS}")
    from fundus_lab.config import path_inside

    run_name = run_name or f"{preset}-{datetime.utcnow():%Y%m%d-%H%M%S}"
    if run_name == LATEST:
        raise ValueError(f"run name {LATEST!r} is taken by the pointer {runs_dir}/{LATEST} to the last run; pick another")
    run_dir = path_inside(resolve_path(runs_dir), run_name, "run name")  # never "../elsewhere"
    paths = list_notebooks(notebook_dir, select=notebooks)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    from fundus_lab.experiment import jobs_overrides

    overrides = jobs_overrides(jobs, list(overrides or []))
    parameters = {
        "preset": preset,
        "run_dir": str(run_dir),
        "data_root": str(resolve_path(data_root)) if data_root is not None else None,
        "methods": list(methods) if methods else None,
        "overrides": list(overrides or []),
    }
    # a reused run folder keeps the status of notebooks not run this time
    previous = read_status(run_dir / "status.json")
    status = {p.stem: {"state": "not run", "seconds": None} for p in paths}
    (run_dir / "parameters.json").write_text(json.dumps(parameters, indent=2))
    failure: NotebookFailed | None = None
    started = time.perf_counter()
    commit_at_start = git_commit()  # the code the notebooks run, even if HEAD moves during the run
    log(f"fundus-lab reproduce: preset={preset}, {len(paths)} notebooks -> {run_dir}")
    if jobs > 1:  # the notebooks' own Run (same preset, folder, data, overrides) then finds them cached
        from fundus_lab.experiment import REFERENCES, Run

        start = time.perf_counter()
        rows = list(methods or DEFAULT_METHODS[preset]) + list(REFERENCES)
        Run(preset, run_dir, parameters["data_root"], parse_overrides(overrides)).pretrain_parallel(rows, jobs)
        log(f"pretrained {', '.join(rows)} in {jobs} processes ({time.perf_counter() - start:.0f} s)")
    for i, path in enumerate(paths, 1):
        out = run_dir / "notebooks" / path.name
        log(f"[{i}/{len(paths)}] {path.stem} ...")
        start = time.perf_counter()
        try:
            # the kernel starts where reproduce was called, so relative paths mean the same inside;
            # headless runs are asked to make what is missing; interactive ones are not (see notebook_context)
            run_notebook(path, out, {**parameters, "train_if_missing": True}, run_dir / "logs" / f"{path.stem}.log",
                         Path.cwd(), kernel_name,
                         progress=f"notebook {i}/{len(paths)} {path.stem}" if progress else None)
        except NotebookFailed as err:
            status[path.stem] = {"state": "failed", "seconds": round(time.perf_counter() - start, 1), "error": str(err)}
            failure = err
            log(f"[{i}/{len(paths)}] {path.stem} FAILED after {status[path.stem]['seconds']} s: {err}")
            break
        status[path.stem] = {"state": "ok", "seconds": round(time.perf_counter() - start, 1)}
        log(f"[{i}/{len(paths)}] {path.stem} ok ({status[path.stem]['seconds']} s)")
    status = dict(sorted({**previous, **status}.items()))
    (run_dir / "status.json").write_text(json.dumps(status, indent=2))
    write_index(run_dir, status, parameters)
    if command is None:
        command = " ".join(["fundus-lab reproduce", "--preset", preset]
                           + (["--data-root", str(data_root)] if data_root is not None else [])
                           + (["--methods", *methods] if methods else []) + ["--name", run_name]
                           + (["--notebooks", *notebooks] if notebooks else []) + list(overrides or []))
    write_summary(run_dir, status, command, time.perf_counter() - started, commit=commit_at_start)
    log(f"index: {run_dir / 'index.html'}; summary: {run_dir / 'results'}")
    if failure is not None:  # runs/latest keeps naming the last run that finished
        raise failure
    pointer = write_latest(run_dir, resolve_path(runs_dir))
    log(f"{pointer} -> {run_name}: notebooks opened in JupyterLab explore this run")
    return run_dir


# ---------------------------------------------------------------------------------------
# the run's record: what ran, where, how long (copied to results/<preset>/ by hand)


def git_commit(root: Path | None = None) -> str:
    """``<sha>`` of the checkout (``<sha>+dirty`` with uncommitted changes; ``unknown`` outside git)."""
    import subprocess

    root = root or project_root()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> dict:
    """Cores, CPU model, torch threads and versions: what a rerun must match to compare numbers."""
    import os
    import platform

    import torch

    model, ident = platform.processor() or "unknown", {}
    try:  # "AMD EPYC" alone does not say which generation, and generations round differently
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key.lower() in ("model name", "cpu model", "hardware") and model == (platform.processor() or "unknown"):
                model = value
            elif key in ("cpu family", "model", "stepping") and key not in ident:
                ident[key] = value
    except OSError:
        pass
    if ident:
        model += " (family {}, model {}, stepping {})".format(*(ident.get(k, "?") for k in ("cpu family", "model", "stepping")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu_count": os.cpu_count(), "cpu_model": model, "machine": platform.machine(),
            "system": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            # the SIMD kernels torch dispatches to: runs on different ISAs need not agree bit for bit
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_summary(run_dir: Path, status: Mapping[str, Mapping[str, Any]], command: str, total_seconds: float,
                  commit: str | None = None) -> Path:
    """``run_dir/results/``: table1.md/.csv, table2.md/.csv, their pairs tables, and ``run.md`` + ``run.json`` with the exact
    command, the git commit, the machine and the wall time per notebook and in total."""
    import shutil

    out = Path(run_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("table1.md", "table1.csv", "table2.md", "table2.csv", "pairs.md", "pairs.csv", "table2_pairs.md",
                 "table2_pairs.csv", "few_shot.md", "explanation_scores.txt",
                 "explanation_scores.csv"):
        if (Path(run_dir) / name).is_file():
            shutil.copy(Path(run_dir) / name, out / name)
    at_end = git_commit()
    info = {"command": command, "commit": commit or at_end, "machine": machine(),
            "finished_utc": f"{datetime.utcnow():%Y-%m-%d %H:%M:%S}",
            "notebooks": {n: {"state": s["state"], "seconds": s.get("seconds")} for n, s in status.items()},
            "total_seconds": round(total_seconds, 1)}
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    m = info["machine"]
    md = ["# Run record", "", "```", command, "```", "",
          f"- commit: `{info['commit']}`" + (f" (HEAD moved to `{at_end}` during the run)" if at_end != info["commit"] else ""),
          f"- machine: {m['cores']} cores ({m['cpu_count']} CPUs), {m['cpu_model']}, {m['machine']}; "
          f"torch {m['torch']} with {m['torch_threads']} threads, {m.get('cpu_capability', '?')} kernels; Python {m['python']}"
          + (f"; GPU {m['gpu']}" if m["gpu"] else ""),
          f"- finished: {info['finished_utc']} UTC", f"- wall time: {info['total_seconds'] / 60:.1f} min in total", "",
          "| notebook | state | seconds |", "|---|---|---:|"]
    md += [f"| {n} | {s['state']} | {s['seconds'] if s['seconds'] is not None else ''} |" for n, s in info["notebooks"].items()]
    if (out / "table1.md").is_file():
        md += ["", "## Table 1", "", (out / "table1.md").read_text().strip()]
    if (out / "table2.md").is_file():
        md += ["", "## Table 2", "", (out / "table2.md").read_text().strip()]
    if (out / "pairs.md").is_file():
        md += ["", "## Pairs", "", (out / "pairs.md").read_text().strip()]
    if (out / "table2_pairs.md").is_file():
        md += ["", "## Pairs of Table 2", "", (out / "table2_pairs.md").read_text().strip()]
    (out / "run.md").write_text("\n".join(md) + "\n")
    return out


# ---------------------------------------------------------------------------------------
# the run's index page


def _render_notebook_html(executed: Path) -> Path | None:
    try:
        import nbformat
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    except Exception as err:  # noqa: BLE001 - the .ipynb link still works
        print(f"fundus_lab: could not render {executed.name} as HTML ({err})", file=sys.stderr)
        return None
    out = executed.with_suffix(".html")
    out.write_text(body)
    return out


def _tables(run_dir: Path, name: str) -> list[Path]:
    folder = run_dir / "tables" / name
    return sorted(folder.glob("*.csv")) if folder.is_dir() else []


def _figures(run_dir: Path, name: str) -> list[Path]:
    folder = run_dir / "figures" / name
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _index_entries(run_dir: Path, status: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Per notebook what the index shows (state, links, tables, figures): one list that
    ``index.html`` and ``README.md`` both render, so the two never disagree."""
    import pandas as pd

    def rel(path: Path) -> str:
        return str(path.relative_to(run_dir))

    entries = []
    for name, st in status.items():
        executed = run_dir / "notebooks" / f"{name}.ipynb"
        links = []
        if executed.is_file():
            links.append(("notebook", f"notebooks/{name}.ipynb"))
            rendered = _render_notebook_html(executed)
            if rendered is not None:
                links.append(("html", f"notebooks/{rendered.name}"))
        tables = []
        for table in _tables(run_dir, name):
            entry = {"stem": table.stem, "path": rel(table), "text": None, "frame": None, "unreadable": None,
                     "links": [(p.suffix[1:], rel(p)) for p in sorted(table.parent.glob(f"{table.stem}.*"))]}
            written_md = table.with_suffix(".md")
            if written_md.is_file():  # the notebook's own rendering (e.g. Table 1: mean ± std, best in bold)
                entry["text"] = written_md.read_text()
            else:
                try:
                    entry["frame"] = pd.read_csv(table)
                except Exception as err:  # noqa: BLE001 - shown, not fatal
                    entry["unreadable"] = str(err)
            if entry["frame"] is not None:
                entry["columns"] = [_cell(c) for c in entry["frame"].columns]
                entry["rows"] = [[_cell(v) for v in row] for row in entry["frame"].itertuples(index=False)]
            tables.append(entry)
        figures = [{"stem": fig.stem, "path": rel(fig),
                    "svg": rel(fig.with_suffix(".svg")) if fig.with_suffix(".svg").is_file() else None}
                   for fig in _figures(run_dir, name)]
        entries.append({"name": name, "state": st["state"], "seconds": st.get("seconds"), "error": st.get("error"),
                        "links": links, "tables": tables, "figures": figures})
    return entries


def render_index_html(title: str, params: str, notebooks: list[dict]) -> str:
    """``templates/index.html.j2`` (package data) with autoescape on: a notebook name or a
    table cell holding ``<`` shows as text and cannot inject markup into the page."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("index.html.j2").render(title=title, params=params, notebooks=notebooks)


def write_index(run_dir: Path, status: Mapping[str, Mapping[str, Any]], parameters: Mapping[str, Any]) -> tuple[Path, Path]:
    """``index.html`` and ``README.md``: per notebook its state, tables, figures and links."""
    run_dir = Path(run_dir)
    title = f"fundus_lab run {run_dir.name}"
    params = ", ".join(f"{k}={v}" for k, v in parameters.items() if k != "run_dir")
    entries = _index_entries(run_dir, status)
    md = [f"# {title}", "", f"Parameters: {params}", "", "| notebook | state | seconds |", "|---|---|---|"]
    md += [f"| [{n}](notebooks/{n}.ipynb) | {s['state']} | {s.get('seconds') or ''} |" for n, s in status.items()]
    md.append("")
    for nb in entries:
        md += [f"## {nb['name']} ({nb['state']})", ""]
        if nb["error"]:
            md += ["```", nb["error"], "```", ""]
        for table in nb["tables"]:
            if table["unreadable"]:
                continue
            body = table["text"].strip() if table["text"] is not None else markdown_table(table["frame"])
            md += [f"### {table['stem']}", "", body, "", f"[{table['path']}]({table['path']})", ""]
        md += [line for fig in nb["figures"] for line in (f"![{fig['stem']}]({fig['path']})", "")]
    index, readme = run_dir / "index.html", run_dir / "README.md"
    index.write_text(render_index_html(title, params, entries))
    readme.write_text("\n".join(md) + "\n")
    return index, readme


def _cell(v) -> str:
    """A table value as text: floats to 4 significant digits, missing values empty."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return str(v)


def markdown_table(df) -> str:
    """A DataFrame as a GitHub Markdown table (numbers to 4 significant digits; no tabulate needed)."""
    def cell(v):
        return _cell(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


# ---------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``fundus-lab reproduce``: every notebook through papermill into ``runs/<name>/``."""
    parser = argparse.ArgumentParser(prog="fundus-lab reproduce", description=main.__doc__)
    parser.add_argument("--preset", choices=PRESETS, default="default")
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
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from fundus_lab.config import split_names

    methods = split_names(args.methods) or None
    try:  # a mistyped key or value fails here, before any notebook starts
        from fundus_lab.config import ConfigError, load_config

        load_config(preset=args.preset, overrides=list(args.overrides))
    except (ConfigError, ValueError) as err:
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 2
    try:
        import shlex

        command = "fundus-lab reproduce " + shlex.join(list(sys.argv[1:] if argv is None else argv))
        run_dir = reproduce(args.preset, args.data_root, methods, args.name, args.notebooks, args.runs_dir,
                            overrides=args.overrides, command=command, progress=not args.no_progress, jobs=args.jobs)
    except NotebookFailed as err:
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:  # a --name that is not one safe folder name
        print(f"fundus-lab reproduce: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
