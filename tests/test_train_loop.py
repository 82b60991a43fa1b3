"""The training loop's bookkeeping: schedule, sampler, exact resume, NaN stop, logs, callbacks.

These tests swap the library's model and data for a tiny test double (tests/doubles.py, the
``doubles`` fixture of tests/conftest.py) so each run takes a fraction of a second; tests/test_train_smoke.py runs the
real model on the synthetic benchmark.
"""

import csv
import math
from pathlib import Path

import pytest
import torch

from doubles import DoubleModel, load_double, make_cfg, weights
from fundus_lab import checkpoint as ckpt
from fundus_lab import optim
from fundus_lab import train as T
from fundus_lab.config import ConfigError
from fundus_lab.run_folder import check_resumable
from fundus_lab.sampling import ResumableBatchSampler
from fundus_lab.train_log import TRACKER_PROJECT


def test_lr_schedule_warmup_then_cosine():
    f = lambda s: optim.lr_factor(s, warmup_steps=4, total_steps=12, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = DoubleModel()
    groups = optim.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == ["dec.weight", "enc.weight", "head.weight"]


def test_sampler_shards_and_restarts_mid_epoch():
    full = list(ResumableBatchSampler(10, 2, seed=3))
    assert len(full) == 5 and sorted(i for b in full for i, _ in b) == list(range(10))
    s = ResumableBatchSampler(10, 2, seed=3)
    s.set_position(0, 3)
    assert list(s) == full[3:]
    s.set_position(1, 0)
    assert [i for b in s for i, _ in b] != [i for b in full for i, _ in b]  # a new order each epoch
    ranks = [list(ResumableBatchSampler(10, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    seen = [i for r in ranks for b in r for i, _ in b]
    assert len(ranks[0]) == len(ranks[1]) == 2 and len(set(seen)) == 8  # disjoint, equal shares


def test_exact_resume_after_a_kill(doubles, tmp_path):
    straight = T.pretrain(make_cfg(tmp_path / "straight"))

    def kill(step, logs):
        if step == 5:  # after checkpoint-4, before checkpoint-6
            raise KeyboardInterrupt("killed")

    cfg = make_cfg(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[kill])
    assert ckpt.last_checkpoint(cfg.train.output_dir).name == "checkpoint-4"
    resumed = T.pretrain(cfg, resume=True)

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the CSV reads as one run: the killed run's step-5 row was replaced, not duplicated
    steps = [int(r["step"]) for r in csv.DictReader(open(resumed / "metrics.csv"))]
    assert steps == list(range(1, 9))
    assert [p.name for p in ckpt.list_checkpoints(resumed)] == ["checkpoint-6", "checkpoint-8"]
    # and the run really learnt something (a broken loop could be "exactly" equal by not moving)
    first = load_double(tmp_path / "straight" / "checkpoint-6")
    assert not torch.equal(first.enc.weight, load_double(straight / "checkpoint-8").enc.weight)


def test_resume_false_starts_over_and_finished_run_is_not_rerun(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run", steps=4)
    run = T.pretrain(cfg)
    before = weights(run)
    assert T.pretrain(cfg, resume=True) == run  # already at train.steps: nothing to do
    calls = []
    T.pretrain(cfg, callbacks=[lambda s, l: calls.append(s)], resume=False)
    assert calls == [1, 2, 3, 4]
    for key, value in weights(run).items():
        assert torch.equal(value, before[key])  # seeded: starting over repeats the run


def test_nan_loss_stops_naming_step_and_term(doubles, tmp_path, monkeypatch):
    forward = DoubleModel.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        if self.steps_done == 4:  # the 5th step's forward
            out["image_gen_loss"] = out["image_gen_loss"] * float("nan")
            out["loss"] = out["loss"] + out["image_gen_loss"]
        return out

    monkeypatch.setattr(DoubleModel, "forward", poisoned)
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(T.NonFiniteLossError, match=r"^step 5: image_gen_loss is nan$"):
        T.pretrain(cfg)
    last = ckpt.last_checkpoint(cfg.train.output_dir)
    assert last.name == "checkpoint-4"
    assert all(torch.isfinite(v).all() for v in weights(cfg.train.output_dir).values())


def test_csv_has_every_term_and_callbacks_see_them(doubles, tmp_path):
    seen = []
    cfg = make_cfg(tmp_path / "run", steps=6, log_every=3, grad_accum_steps=2, log_with="tensorboard")
    run = T.pretrain(cfg, callbacks=[lambda step, logs: seen.append((step, logs))])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6] == [s for s, _ in seen]
    for key in ("loss", "image_gen_loss", "class_loss", "lr", "grad_norm", "images_per_s", "logit_scale"):
        assert key in rows[0], key
    # logged values are the mean over the window's micro-batches and agree with the callback
    assert float(rows[1]["loss"]) == pytest.approx(seen[1][1]["loss"])
    # the lr logged is the one the step used: step 3 is the first after the 2 warm-up steps
    # (peak lr), step 6 is 3/4 of the way down the cosine over the 4 steps after warm-up
    assert float(rows[0]["lr"]) == pytest.approx(0.05)
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert (run / "config.yaml").is_file() and (run / "split.csv").is_file()
    assert any((run / "tensorboard").iterdir())


def test_bad_settings_name_the_field(doubles, tmp_path):
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        T.pretrain(make_cfg(tmp_path / "a", grad_accum_steps=0))
    with pytest.raises(ConfigError, match="fewer than one batch"):
        T.pretrain(make_cfg(tmp_path / "b", batch_size=64))
    T.pretrain(make_cfg(tmp_path / "c", steps=2))
    changed = make_cfg(tmp_path / "c", steps=4)
    changed.data.augment = not changed.data.augment
    with pytest.raises(ConfigError, match="data.augment"):
        T.pretrain(changed)


# ---------------------------------------------------------------------------------------
# experiment trackers (train.log_with, through accelerate)


def tensorboard_scalars(run_dir, tag):
    """(step, value) of one scalar as TensorBoard shows it (restart purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard" / TRACKER_PROJECT))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_through_accelerate_reads_as_one_run_after_a_resume(doubles, tmp_path):
    def kill(step, logs):
        if step == 5:  # the killed run already logged step 5; the resumed one logs it again
            raise KeyboardInterrupt("killed")

    cfg = make_cfg(tmp_path / "run", log_with="tensorboard")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[kill])
    run = T.pretrain(cfg, resume=True)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    for key in ("loss", "image_gen_loss", "class_loss", "lr"):
        scalars = tensorboard_scalars(run, f"train/{key}")
        assert [s for s, _ in scalars] == list(range(1, 9)), key  # purge_step dropped the killed run's step 5
        assert [v for _, v in scalars] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
    # the run config went to the tracker as flat hyperparameters
    hparams = [yaml_file.read_text() for yaml_file in (run / "tensorboard").rglob("hparams.yml")]
    assert hparams and all("train.lr: 0.05" in h and "model.image_mean: '[" in h for h in hparams)


def test_log_with_none_writes_no_tracker_files(doubles, tmp_path, monkeypatch):
    import accelerate

    calls = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw: calls.append(step))
    run = T.pretrain(make_cfg(tmp_path / "run", steps=2, log_with="none"))
    assert (run / "metrics.csv").is_file()
    assert not (run / "tensorboard").exists() and not list(run.rglob("events.out.tfevents*"))
    assert calls == []


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_a_config_error(doubles, tmp_path, monkeypatch, tracker):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"train.log_with = '{tracker}' needs .*pip install {tracker}"):
        T.pretrain(make_cfg(tmp_path / "run", log_with=tracker))
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run started


def test_old_runs_without_log_with_resume(doubles, tmp_path):
    """A run folder whose config.yaml predates ``train.log_with`` (only ``tensorboard: false``)."""
    import yaml

    cfg = make_cfg(tmp_path / "run", steps=2)
    run = T.pretrain(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["log_with"]
    saved["train"]["tensorboard"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resumable(run / "config.yaml", make_cfg(tmp_path / "run", steps=2, log_with="tensorboard"))
    resumed = make_cfg(tmp_path / "run", steps=2)
    resumed.train.log_with = "tensorboard"
    assert T.pretrain(resumed, resume=True) == run
