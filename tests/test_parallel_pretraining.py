"""``--jobs N``: independent (method, seed) pretraining jobs in N processes give the same
checkpoints, byte for byte, as one after another; teachers train before their students."""

import sys
from pathlib import Path

import pytest

from fundus_lab import config as C
from fundus_lab.experiment import Run, jobs_overrides, threads_per_job

sys.path.insert(0, str(Path(__file__).parent))
from doubles import COMPARE_TINY as TINY  # noqa: E402  (the compare tests' tiny model, data and budget)

ONE_THREAD = TINY + ["train.num_threads=1"]


def test_threads_per_job_share_the_cores():
    assert threads_per_job(2, cores=2) == 1
    assert threads_per_job(3, cores=2) == 1
    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(1, cores=4) == 4


def test_jobs_set_the_thread_count_in_every_config_unless_given():
    assert jobs_overrides(1, ["train.steps=2"]) == ["train.steps=2"]
    added = jobs_overrides(2, ["train.steps=2"])
    assert added[0] == "train.steps=2" and added[1] == f"train.num_threads={threads_per_job(2)}"
    assert jobs_overrides(2, ["train.num_threads=3"]) == ["train.num_threads=3"]
    with pytest.raises(C.ConfigError, match="--jobs 0: expected 1 or more"):
        jobs_overrides(0, [])


def test_waves_train_the_teacher_before_its_student(tmp_path):
    run = Run("smoke", tmp_path / "run", tmp_path / "data", ONE_THREAD + ["eval.pretrain_seeds=[0,1]"])
    waves = run.pretraining_waves(["eva", "mae", "supervised", "pixels", "random-init"])
    assert len(waves) == 2
    assert set(waves[0]) == {("clip", 0), ("clip", 1), ("mae", 0), ("mae", 1), ("supervised", 0), ("supervised", 1),
                             ("random-init", 0), ("random-init", 1)}  # the pixel row trains nothing
    assert waves[1] == [("eva", 0), ("eva", 1)]
    assert run.pretraining_waves(["clip", "mae"]) == [[("clip", 0), ("clip", 1), ("mae", 0), ("mae", 1)]]
    with pytest.raises(C.ConfigError, match="jobs=0"):
        run.pretrain_parallel(["clip"], 0)


@pytest.mark.slow
def test_parallel_pretraining_is_byte_identical_to_sequential(tmp_path):
    """clip and eva (which distils a clip teacher) at smoke: two processes, then the same
    Run one after another in this process; every saved weight file is the same bytes."""
    data = tmp_path / "data"
    sequential = Run("smoke", tmp_path / "sequential", data, ONE_THREAD)
    seq = {m: sequential.checkpoint(m) for m in ("clip", "eva")}
    parallel = Run("smoke", tmp_path / "parallel", data, ONE_THREAD)
    made = parallel.pretrain_parallel(["clip", "eva"], jobs=2)
    assert set(made) == {("clip", 0), ("eva", 0)}
    for method, path in seq.items():
        assert parallel.checkpoint(method) == made[(method, 0)]  # used as made, not trained again
        a, b = (Path(p) / "model.safetensors" for p in (path, made[(method, 0)]))
        assert a.read_bytes() == b.read_bytes(), method


def test_reproduce_with_jobs_pretrains_first_with_the_notebooks_settings(tmp_path, monkeypatch):
    """``reproduce --jobs 2`` hands every method and reference row to ``pretrain_parallel``
    before the first notebook, under the thread count it also passes to the notebooks (so the
    notebooks' Run finds the same cache keys)."""
    from fundus_lab import reproduce as R
    from fundus_lab.experiment import REFERENCES

    seen = {}

    def record_pretraining(run, rows, jobs):
        seen.update(rows=list(rows), jobs=jobs, overrides=dict(run.overrides), run_dir=run.run_dir)
        return {}

    def record_notebook(path, out, parameters, *args, **kwargs):
        seen.setdefault("parameters", parameters)
        assert "rows" in seen, "a notebook ran before the parallel pretraining"

    monkeypatch.setattr(Run, "pretrain_parallel", record_pretraining)
    monkeypatch.setattr(R, "run_notebook", record_notebook)
    run_dir = R.reproduce("smoke", data_root=tmp_path / "data", methods=["clip", "eva"], run_name="r",
                          notebooks=["00"], runs_dir=tmp_path, overrides=["train.steps=2"], progress=False,
                          log=lambda line: None, jobs=2)
    assert seen["rows"] == ["clip", "eva", *REFERENCES] and seen["jobs"] == 2
    threads = f"train.num_threads={threads_per_job(2)}"
    assert seen["parameters"]["overrides"] == ["train.steps=2", threads]
    # override values stay text until the schema types them (issue 16): the same settings as text
    assert seen["overrides"] == {"train.steps": "2", "train.num_threads": str(threads_per_job(2))}
    assert seen["run_dir"] == run_dir


def test_notebook_01_pretrains_every_method_and_reference_row():
    """Training happens in 01_pretrain: its last cell makes the checkpoint of every method of
    the run and every reference row, so that 02 (attention scores) and later only load them."""
    import json

    import fundus_lab as fl
    from fundus_lab.experiment import REFERENCES
    from fundus_lab.reproduce import NOTEBOOK_DIR

    nb = json.loads((NOTEBOOK_DIR / "01_pretrain.ipynb").read_text())
    last = "".join(next(c for c in reversed(nb["cells"]) if c["cell_type"] == "code")["source"])

    class Context:
        methods = ["clip", "coca", "eva", "ours"]
        made = []

        def checkpoint(self, name):
            self.made.append(name)
            return Path("runs") / name

    run = Context()
    exec(compile(last, "01_pretrain.ipynb", "exec"), {"run": run, "fl": fl})
    assert run.made == [*Context.methods, *REFERENCES]
