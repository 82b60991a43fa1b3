"""Issue 10, training side: one job per run folder (a two-process test), NaN gradients stopped
before they reach the weights, resume refused for a different run, and every broken
checkpoint a CheckpointError naming the file (items 1, 4, 5, 16). Each failed before the fix.

The model and data are the test doubles of tests/test_train_loop.py (a fraction of a second a run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fundus_lab import checkpoint as ckpt
from fundus_lab import train as T
from fundus_lab.cli import pretrain_main
from fundus_lab.config import ConfigError
from fundus_lab.run_folder import RunFolderLockedError, lock_run_dir, unlock_run_dir
from doubles import DoubleModel, make_cfg, weights

REPO = Path(__file__).resolve().parent.parent


def stop_at(step_to_stop):
    def cb(step, logs):
        if step == step_to_stop:
            raise KeyboardInterrupt("killed")

    return cb


# ---------------------------------------------------------------------------------------
# item 1: two jobs, one run folder


def test_a_second_process_cannot_write_a_locked_run_folder(doubles, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from fundus_lab.run_folder import lock_run_dir
            handle = lock_run_dir(Path({str(run)!r}))
            print("locked", flush=True)
            sys.stdin.read()  # hold the lock until the test closes stdin (or kills us)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLockedError, match=rf"run folder {run} is in use by another job \(pid {holder.pid}"):
            T.pretrain(make_cfg(run, steps=2))
        assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the lock: no stale lock files
        holder.wait(timeout=30)
    assert T.pretrain(make_cfg(run, steps=2)) == run
    assert [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]] == [1, 2]


def test_the_lock_is_released_when_a_run_fails(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    handle = lock_run_dir(tmp_path / "run")  # free again in this process too
    unlock_run_dir(handle)


def test_leftover_tmp_checkpoints_are_cleaned_on_the_next_start(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    junk = tmp_path / "run" / ".tmp-checkpoint-99"  # a step this run never saves
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    T.pretrain(cfg)
    assert not junk.exists() and not list((tmp_path / "run").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------
# item 4: NaN gradients reach the weights


class NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradient_with_a_finite_loss_stops_before_the_step(doubles, tmp_path, monkeypatch):
    forward = DoubleModel.forward

    def poisoned(self, batch):
        if self.steps_done == 4:  # the 5th step: NaN flows back into enc only
            x = batch["image"].flatten(1)
            z = self.norm(NanGrad.apply(self.enc(x)))
            recon = ((self.dec(z) - x) ** 2).mean()
            return {"loss": recon, "image_gen_loss": recon}
        return forward(self, batch)

    monkeypatch.setattr(DoubleModel, "forward", poisoned)
    cfg = make_cfg(tmp_path / "run", save_every=1)
    with pytest.raises(T.NonFiniteGradientError, match=r"^step 5: non-finite gradient in parameter group 0 .*enc.weight"):
        T.pretrain(cfg)
    assert ckpt.last_checkpoint(cfg.train.output_dir).name == "checkpoint-4"
    assert all(torch.isfinite(v).all() for v in weights(cfg.train.output_dir).values())


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"step 7: refusing to save non-finite weights .*weight"):
        ckpt.check_finite_weights(model, "step 7")


# ---------------------------------------------------------------------------------------
# item 5: resume accepts a different run


def test_resume_with_a_different_budget_is_refused_listing_every_key(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    saved = (tmp_path / "run" / "config.yaml").read_text()
    changed = make_cfg(tmp_path / "run", lr=0.01, seed=5, batch_size=2)
    with pytest.raises(ConfigError, match=r"3 difference\(s\): train.batch_size: run has 4, config asks 2; "
                                          r"train.lr: run has 0.05, config asks 0.01; train.seed: run has 0, config asks 5"):
        T.pretrain(changed)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the run's record is untouched
    method = make_cfg(tmp_path / "run")
    method.method.name, method.method.caption_weight = "clip", 0.0
    with pytest.raises(ConfigError, match=r"method.caption_weight: run has .*; method.name: run has 'ours', config asks 'clip'"):
        T.pretrain(method)


def test_checkpoints_without_the_run_config_are_not_resumed(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"holds checkpoints but no config.yaml"):
        T.pretrain(cfg)


def test_resume_override_allows_only_the_safe_keys(doubles, tmp_path):
    cfg = make_cfg(tmp_path / "run", steps=4)
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    longer = make_cfg(tmp_path / "run", steps=6)
    with pytest.raises(ConfigError, match="train.steps"):
        T.pretrain(longer)
    T.pretrain(longer, allow_changes=["train.steps"])
    assert ckpt.last_checkpoint(tmp_path / "run").name == "checkpoint-6"
    with pytest.raises(ConfigError, match=r"allow_changes: \['train.lr'\] cannot be changed"):
        T.pretrain(make_cfg(tmp_path / "run", steps=6, lr=1.0), allow_changes=["train.lr"])


# ---------------------------------------------------------------------------------------
# item 16: clear errors instead of raw ones


@pytest.fixture()
def broken_run(doubles, tmp_path):
    """A run killed at step 3 (checkpoint-2 is last) and a function to resume it."""
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    last = ckpt.last_checkpoint(tmp_path / "run")
    assert last.name == "checkpoint-2"
    return last, lambda: T.pretrain(cfg)


def test_truncated_optimizer_file_is_a_checkpoint_error(broken_run):
    last, resume = broken_run
    f = last / ckpt.OPTIMIZER_FILE
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=rf"{f}: cannot be read as safetensors .*truncated"):
        resume()


def test_missing_step_is_a_checkpoint_error(broken_run):
    last, resume = broken_run
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    del state["step"]
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: field 'step' is None; expected an integer"):
        resume()


def test_missing_tensor_key_is_a_checkpoint_error(broken_run):
    last, resume = broken_run
    f = last / ckpt.OPTIMIZER_FILE
    tensors = load_file(str(f))
    tensors.pop(sorted(k for k in tensors if "exp_avg_sq" in k)[0])
    save_file(tensors, str(f))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: names tensor .*exp_avg_sq.* which .*optimizer.safetensors does not hold"):
        resume()


def test_bad_rng_state_is_a_checkpoint_error(broken_run):
    last, resume = broken_run
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    state["trainer"]["rng"][0]["torch"] = [1, 2, 3]
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: rng state is malformed"):
        resume()


def test_optimizer_shape_mismatch_is_found_at_load(broken_run):
    last, resume = broken_run
    f = last / ckpt.OPTIMIZER_FILE
    tensors = load_file(str(f))
    key = sorted(k for k in tensors if k.endswith("exp_avg") and tensors[k].ndim == 2)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(f))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer state 'exp_avg' of group \d parameter \d+ has shape"):
        resume()


def test_cli_reports_a_locked_run_folder_and_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    handle = lock_run_dir(run)  # a second open file description conflicts even in one process
    try:
        code = pretrain_main(["--preset", "smoke", "--method", "clip", f"train.output_dir={run}"])
    finally:
        unlock_run_dir(handle)
    assert code == 2
    assert f"run folder {run} is in use by another job (pid {os.getpid()}" in capsys.readouterr().err
