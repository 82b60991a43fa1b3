"""Notebooks explore what ``reproduce`` made and never train by surprise.

``reproduce`` points ``runs/latest`` at the run it finished; a notebook opened with its
defaults reads that run (preset, methods, data, overrides from its ``parameters.json``);
a missing checkpoint raises ``CheckpointMissing`` with what would be trained and about how
long, unless ``train_if_missing=True``; papermill runs from ``reproduce`` pass that flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fundus_lab import experiment
from fundus_lab import reproduce as rp
from fundus_lab.experiment import notebook as nb
from doubles import COMPARE_TINY as TINY
from doubles import write_notebook  # noqa: E402

PARAMS = ('preset = None\nrun_dir = "latest"\ndata_root = None\nmethods = None\noverrides = []\n'
          'train_if_missing = False\n')


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root of its own, so ``runs/latest`` of the real checkout is never read or written."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setattr(rp, "project_root", lambda: root)
    monkeypatch.setattr(nb, "project_root", lambda: root)
    monkeypatch.chdir(root)  # relative paths mean the working directory (issue 16)
    return root


def _notebook(path: Path, *cells: str) -> None:
    write_notebook(path, PARAMS, *cells)


# ---------------------------------------------------------------------------------------
# the runs/latest pointer


def test_latest_pointer_round_trip_is_a_one_line_relative_file(project):
    runs = project / "runs"
    run = runs / "smoke-1"
    run.mkdir(parents=True)
    assert experiment.latest_run() is None  # no reproduce yet
    pointer = experiment.write_latest(run, runs)
    assert pointer == runs / "latest" and not pointer.is_symlink()
    assert pointer.read_text() == "smoke-1\n"  # relative: the runs folder can be moved or copied
    assert experiment.latest_run() == runs / "smoke-1"
    elsewhere = project / "other" / "run"
    elsewhere.mkdir(parents=True)
    experiment.write_latest(elsewhere, runs)
    assert experiment.latest_run() == elsewhere.resolve()


def test_a_bad_latest_pointer_names_the_file_and_what_it_expects(project):
    runs = project / "runs"
    runs.mkdir()
    (runs / "latest").write_text("gone-run\n")
    with pytest.raises(FileNotFoundError, match=r"runs/latest names the run folder .*gone-run, which does not exist"):
        experiment.latest_run()
    (runs / "latest").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"runs/latest: expected one line naming a run folder"):
        experiment.latest_run()


def test_a_folder_named_latest_is_read_but_never_overwritten(project):
    runs = project / "runs"
    (runs / "latest").mkdir(parents=True)
    assert experiment.latest_run() == runs / "latest"
    with pytest.raises(FileExistsError, match="is a folder"):
        experiment.write_latest(runs / "x", runs)
    with pytest.raises(ValueError, match="run name 'latest' is taken"):
        rp.reproduce("smoke", run_name="latest", runs_dir=runs, log=lambda _: None, progress=False)


def test_reproduce_points_latest_at_a_finished_run_and_passes_train_if_missing(project, tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_flag.ipynb", "from pathlib import Path\n(Path(run_dir) / 'flag.txt').write_text(repr(train_if_missing))")
    _notebook(nbs / "01_fail.ipynb", "raise RuntimeError('boom')")
    runs = project / "runs"
    first = rp.reproduce("smoke", run_name="ok", runs_dir=runs, notebook_dir=nbs, notebooks=["00"], log=lambda _: None,
                         progress=False)
    assert (first / "flag.txt").read_text() == "True"  # headless runs train what they need
    assert experiment.latest_run() == first
    assert "train_if_missing" not in json.loads((first / "parameters.json").read_text())
    with pytest.raises(rp.NotebookFailed):
        rp.reproduce("smoke", run_name="broken", runs_dir=runs, notebook_dir=nbs, log=lambda _: None, progress=False)
    assert experiment.latest_run() == first  # a failed run does not become the one notebooks open


# ---------------------------------------------------------------------------------------
# a notebook's Run opens the latest run with its own parameters


def _fake_run(runs: Path, name: str, **params) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    base = {"preset": "smoke", "run_dir": str(run), "data_root": None, "methods": None, "overrides": []}
    (run / "parameters.json").write_text(json.dumps({**base, **params}))
    experiment.write_latest(run, runs)
    return run


def test_a_notebooks_run_opens_the_latest_run_with_its_parameters(project):
    data = project / "data-x"
    run = _fake_run(project / "runs", "smoke-7", methods=["clip"], data_root=str(data),
                    overrides=["eval.seeds=2", "method.mask_ratio=0.5"])
    ctx = experiment.Run(notebook="04_zero_shot", overrides=["eval.seeds=3"])
    assert ctx.run_dir == run and ctx.preset == "smoke" and ctx.methods == ["clip"]
    assert ctx.data_root == str(data)
    # the notebook's over the run's; values stay text until the schema types them (issue 16)
    assert ctx.overrides == {"eval.seeds": "3", "method.mask_ratio": "0.5"}
    assert ctx.config().eval.seeds == 3 and ctx.config("clip").method.mask_ratio == 0.5
    assert ctx.train_if_missing is False
    assert ctx.figure_dir() == run / "figures" / "04_zero_shot"
    assert experiment.Run(notebook="04_zero_shot", methods="ours").methods == ["ours"]


def test_a_preset_other_than_the_runs_is_refused(project):
    _fake_run(project / "runs", "smoke-7")
    with pytest.raises(ValueError, match=r"preset='default', but .*smoke-7/parameters.json says this run was made "
                                         r"with preset 'smoke'"):
        experiment.Run(notebook="04_zero_shot", preset="default")


def test_a_broken_parameters_json_names_the_field(project):
    run = _fake_run(project / "runs", "smoke-7")
    (run / "parameters.json").write_text(json.dumps({"preset": "fast"}))
    with pytest.raises(ValueError, match=r"parameters.json: field 'preset' must be one of"):
        experiment.Run(notebook="04_zero_shot")


def test_without_any_run_notebooks_work_in_a_scratch_folder_and_say_so(project, capsys):
    ctx = experiment.Run(notebook="00_data_tour")
    assert ctx.run_dir == project / "runs" / "notebooks" and ctx.preset == "default"
    assert "no finished run yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# no training by surprise


def _benchmark_file(root: Path) -> None:
    bench = root / "results" / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "train_throughput.md").write_text(
        "preset default, device cpu, precision no, batch 32 x 128px, 4 timed steps after 1 warm-up\n"
        "method           params M    img/s  vs clip   step s  peak MiB step +MiB GFLOP/img    MFU\n"
        "clip                 4.82     67.2    1.00x    0.500      1162       349      1.51      -\n"
        "ours                 6.77     41.7    0.62x    0.800      1455       634      2.75      -\n"
        "ours                 6.77     13.0    0.30x    2.400      1455       634      2.75      -\n"
        "preset other, batch 8 x 32px\n"
        "clip                 4.82     67.2    1.00x    9.000      1162       349      1.51      -\n")


def test_the_estimate_uses_the_recorded_rate_at_the_same_batch_and_size(project):
    _benchmark_file(project)
    from fundus_lab.config import resolve_config

    cfg = resolve_config("default", "ours")
    assert (cfg.train.batch_size, cfg.model.img_size) == (32, 128), "the recorded table above is at 32 x 128px"
    entry = {"method": "ours", "seed": 0, "steps": 600, "batch_size": 32, "kind": "pretrain"}
    est = nb.estimate_training(entry, "default", project / "runs" / "x")
    # the fastest of the two timings of ours: a busy machine only slows a timing down
    assert est["seconds"] == pytest.approx(600 * 0.8) and "train_throughput.md" in est["rate_source"]
    assert nb.estimate_training({**entry, "method": "coca"}, "default", project / "runs" / "x")["seconds"] is None
    assert nb.format_duration(480) == "8 min" and nb.format_duration(20) == "20 s" and nb.format_duration(9000) == "2.5 h"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:fewer than k")
def test_a_missing_checkpoint_is_described_not_trained_and_train_if_missing_trains_it(project, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    ctx = experiment.Run(notebook="04_zero_shot", preset="smoke", run_dir=run_dir, data_root=data, methods=["clip"],
                         overrides=TINY)
    with pytest.raises(experiment.CheckpointMissing) as info:
        ctx.model("clip")
    message = str(info.value)
    assert "clip (seed 0): 2 steps of batch 8" in message and "train_if_missing = True" in message
    assert info.value.plan[0]["seconds"] is None  # nothing measured yet at this preset and batch
    assert not (run_dir / "pretrain" / "clip" / "seed0" / "checkpoint-last").exists()
    with pytest.raises(experiment.CheckpointMissing):
        ctx.evaluate("clip", "zero_shot")  # evaluations need the checkpoint too
    # eva needs a clip teacher first: both are listed, teacher first
    with pytest.raises(experiment.CheckpointMissing) as info:
        ctx.checkpoint("eva")
    assert [p["method"] for p in info.value.plan] == ["clip", "eva"]
    # reference rows: supervised trains (the pretraining budget), random-init only saves initial weights
    assert [p["method"] for p in ctx.untrained("supervised")] == ["supervised"]
    assert ctx.untrained("random-init") == [] and ctx.untrained("pixels") == []

    trainer = experiment.Run(notebook="04_zero_shot", preset="smoke", run_dir=run_dir, data_root=data, methods=["clip"],
                             overrides=TINY, train_if_missing=True)
    assert trainer.config("clip").train.progress is True  # a bar while it trains
    checkpoint = trainer.checkpoint("clip")
    assert checkpoint.is_dir()

    again = experiment.Run(notebook="04_zero_shot", preset="smoke", run_dir=run_dir, data_root=data, methods=["clip"],
                           overrides=TINY)
    assert again.untrained("clip") == [] and again.checkpoint("clip") == checkpoint
    assert again.model("clip") is not None
    with pytest.raises(experiment.CheckpointMissing) as info:  # the teacher exists now: only eva is left
        again.checkpoint("eva")
    assert [p["method"] for p in info.value.plan] == ["eva"]
    # a rate measured here times the next clip run of the same preset and batch
    est = nb.estimate_training({"method": "clip", "seed": 1, "steps": 4, "batch_size": 8, "kind": "pretrain"}, "smoke",
                               run_dir)
    assert est["seconds"] is not None and est["seconds"] > 0 and "finished clip run" in est["rate_source"]


def test_notebooks_find_runs_latest_from_their_own_folder_upwards(project, monkeypatch):
    """A notebook opened in JupyterLab runs in ``notebooks/``: the nearest ``runs/latest`` above
    it is the checkout's (the relative-path rule itself stays the working directory)."""
    runs = project / "runs"
    (runs / "smoke-1").mkdir(parents=True)
    experiment.write_latest(runs / "smoke-1", runs)
    inner = project / "fundus_lab" / "notebooks"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert experiment.latest_run() == (runs / "smoke-1").resolve()
