"""Run every numbered notebook headlessly into one run folder, and write its index.

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
        results/run.md, run.json  the run's record: command, commit, machine, wall times
    runs/latest                   a one-line text file naming the last run that finished
                                  (written by reproduce; a file, not a symlink, so it works on Windows)

A failing notebook stops the run; the error names the notebook and the failing cell, and
everything that finished (and the failing notebook, executed up to the error) is kept.

Each notebook builds its run in one call, ``fl.Run(..., notebook=NAME)``
(:class:`fundus_lab.experiment.Run`); ``reproduce`` passes ``train_if_missing=True`` to
every notebook, so its papermill runs train what they need, while a notebook opened in
JupyterLab on ``runs/latest`` never trains by surprise.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fundus_lab import config as C
from fundus_lab.config import PACKAGE_ROOT, PRESETS
from fundus_lab.experiment import (DEFAULT_METHODS, LATEST, REFERENCES, Run, jobs_overrides,
                                   normalise_overrides, write_latest)
from fundus_lab.experiment.store import project_root
from fundus_lab.names import path_inside

# the numbered notebooks ship inside the package (``notebooks/`` at the checkout root links here),
# so ``fundus-lab reproduce`` finds them after a plain ``pip install .`` too
NOTEBOOK_DIR = PACKAGE_ROOT / "notebooks"


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


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the notebook, the failing cell (1-based, as in the committed file) and the error."""

    def __init__(self, notebook: Path, cell_index: int | None, source: str, error: str, output: Path):
        self.notebook, self.cell_index, self.source, self.error, self.output = notebook, cell_index, source, error, output
        first = next((ln for ln in source.splitlines() if ln.strip()), "")
        cell = f"cell {cell_index}" if cell_index is not None else "a cell"
        super().__init__(f"{notebook.name} failed in {cell} ({first.strip()[:80]!r}): {error}\n  executed copy: {output}")


# ---------------------------------------------------------------------------------------
# running the notebooks


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


def default_data_root(preset: str, overrides: Sequence[str]) -> str:
    """The preset's ``data.synth_root`` (after ``overrides``), as the run's data folder: written
    absolute into ``parameters.json`` at launch, so a notebook or ``key_figures`` opened on the
    run from another folder finds the run's data instead of generating a new benchmark there."""
    return C.resolve_config(preset, overrides=normalise_overrides(list(overrides))).data.synth_root


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
    run_name = run_name or f"{preset}-{datetime.utcnow():%Y%m%d-%H%M%S}"
    if run_name == LATEST:
        raise ValueError(f"run name {LATEST!r} is taken by the pointer {runs_dir}/{LATEST} to the last run; pick another")
    run_dir = path_inside(C.resolve_path(runs_dir), run_name, "run name")  # never "../elsewhere"
    paths = list_notebooks(notebook_dir, select=notebooks)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    overrides = jobs_overrides(jobs, list(overrides or []))
    parameters = {
        "preset": preset,
        "run_dir": str(run_dir),
        "data_root": str(C.resolve_path(data_root if data_root is not None else default_data_root(preset, overrides))),
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
        start = time.perf_counter()
        rows = list(methods or DEFAULT_METHODS[preset]) + list(REFERENCES)
        Run(preset, run_dir, parameters["data_root"], normalise_overrides(overrides)).pretrain_parallel(rows, jobs)
        log(f"pretrained {', '.join(rows)} in {jobs} processes ({time.perf_counter() - start:.0f} s)")
    for i, path in enumerate(paths, 1):
        out = run_dir / "notebooks" / path.name
        log(f"[{i}/{len(paths)}] {path.stem} ...")
        start = time.perf_counter()
        try:
            # the kernel starts where reproduce was called, so relative paths mean the same inside;
            # headless runs are asked to make what is missing; interactive ones are not (see experiment.Run)
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
    pointer = write_latest(run_dir, C.resolve_path(runs_dir))
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

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PACKAGE_ROOT / "templates"),
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
