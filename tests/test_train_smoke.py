"""End to end with the real model and data: the `smoke` preset on a tiny synthetic benchmark."""

import csv
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fundus_lab as fl
from fundus_lab import checkpoint as ckpt
from fundus_lab import train as T
from fundus_lab.cli import pretrain_main
from fundus_lab.config import available_methods, load_config
from fundus_lab.schema import to_dict
from fundus_lab.train_log import TRACKER_PROJECT


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """The smoke preset's synthetic benchmark, written once, in-process (no worker start-up);
    pretrain finds it up to date and uses it as is."""
    root = tmp_path_factory.mktemp("synth")
    d = load_config(preset="smoke").data
    fl.data.synth.generate_benchmark(root, n_pretrain=d.synth_n, n_eval=d.synth_eval_n, seed=d.synth_seed,
                                     image_size=d.synth_image_size, workers=1)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """One fixed vocabulary for runs that must match bit for bit: WordPiece training in
    `tokenizers` breaks frequency ties differently from run to run."""
    out = tmp_path_factory.mktemp("tokenizer")
    fl.data.tokenizer.train_tokenizer(fl.data.tokenizer.default_corpus(), vocab_size=600, out_dir=out)
    return out


def smoke_cfg(synth_root, run_dir, method="ours", **overrides):
    over = {"data.synth_root": str(synth_root), "train.output_dir": str(run_dir)}
    over.update(overrides)
    return load_config(preset="smoke", method=method, overrides=over)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_preset_trains_end_to_end(synth_root, tmp_path):
    cfg = smoke_cfg(synth_root, tmp_path / "run")
    seen = []
    run = T.pretrain(cfg, callbacks=[lambda step, logs: seen.append(step)])
    assert run == tmp_path / "run" and seen == list(range(1, cfg.train.steps + 1))

    rows = read_csv(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == seen
    for key in ("loss", "contrastive_loss", "image_gen_loss", "caption_loss", "lr", "grad_norm", "images_per_s"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    # the logged total is the sum of the (pre-weighted) terms
    r = rows[-1]
    assert float(r["loss"]) == pytest.approx(sum(float(r[k]) for k in ("contrastive_loss", "image_gen_loss", "caption_loss")), rel=1e-5)

    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(cfg)
    ds = fl.data.open_dataset("synth-pretrain", root=synth_root / "synth-pretrain", split="train")
    split = read_csv(run / "split.csv")
    assert [s["path"] for s in split] == [rec.path for rec in ds.records]

    model = fl.load_model(run / "checkpoint-last")
    assert ckpt.last_checkpoint(run).name == f"checkpoint-{cfg.train.steps}"
    z = model.encode_image(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, cfg.model.embed_dim) and torch.allclose(z.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.encode_text(["optic disc cupping"]).shape == (1, cfg.model.embed_dim)


def test_smoke_run_logs_its_losses_to_tensorboard_through_accelerate(synth_root, tmp_path, monkeypatch):
    import accelerate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged, log = [], accelerate.Accelerator.log

    def spy(self, values, step=None, **kwargs):
        logged.append((step, dict(values)))
        return log(self, values, step=step, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "log", spy)
    cfg = smoke_cfg(synth_root, tmp_path / "run", **{"train.steps": 3, "train.log_with": "tensorboard"})
    run = T.pretrain(cfg)
    rows = read_csv(run / "metrics.csv")
    assert [s for s, _ in logged] == [1, 2, 3]
    assert logged[-1][1]["train/loss"] == pytest.approx(float(rows[-1]["loss"]))

    events = EventAccumulator(str(run / "tensorboard" / TRACKER_PROJECT))
    events.Reload()
    for key in ("loss", "contrastive_loss", "image_gen_loss", "caption_loss"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [1, 2, 3], key
        assert [e.value for e in scalars] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key


@pytest.mark.parametrize("method", ["ours", "vilref"])  # vilref: momentum encoders and a queue too
def test_exact_resume_real_model(synth_root, tokenizer_dir, tmp_path, method):
    over = {"train.steps": 6, "train.save_every": 2, "train.keep_checkpoints": 2, "model.tokenizer": str(tokenizer_dir)}
    straight = T.pretrain(smoke_cfg(synth_root, tmp_path / "straight", method, **over))

    def kill(step, logs):
        if step == 3:
            raise RuntimeError("simulated kill")

    cfg = smoke_cfg(synth_root, tmp_path / "killed", method, **over)
    with pytest.raises(RuntimeError, match="simulated kill"):
        T.pretrain(cfg, callbacks=[kill])
    resumed = T.pretrain(cfg, resume=True)

    a = load_file(str(straight / "checkpoint-last" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-last" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [int(r["step"]) for r in read_csv(resumed / "metrics.csv")] == list(range(1, 7))


def test_loss_goes_down_on_a_repeated_batch(synth_root, tmp_path, monkeypatch):
    full = T.open_training_data

    def eight_images(cfg, *args, **kwargs):
        ds = full(cfg, *args, **kwargs)
        ds.augment = False
        return ds.subset(range(8))  # one batch of 8, seen at every step

    monkeypatch.setattr(T, "open_training_data", eight_images)
    # reports: one distinct text per image (several of the 8 share a label set, so their
    # definition texts coincide and could not be told apart by the contrastive term)
    cfg = smoke_cfg(synth_root, tmp_path / "run", **{"train.steps": 20, "train.lr": 3e-3, "train.warmup_steps": 2,
                                                       "train.save_every": 0, "data.text_source": "report"})
    rows = read_csv(T.pretrain(cfg) / "metrics.csv")
    loss = [float(r["loss"]) for r in rows]
    assert sum(loss[-3:]) / 3 < 0.9 * sum(loss[:3]) / 3, loss
    contrastive = [float(r["contrastive_loss"]) for r in rows]
    assert min(contrastive[-3:]) < contrastive[0]


def test_nan_in_a_real_term_is_named(synth_root, tmp_path, monkeypatch):
    from fundus_lab.models.model import FundusVLM

    forward, calls = FundusVLM.forward, []

    def poisoned(self, batch):
        out = forward(self, batch)
        calls.append(1)
        if len(calls) == 5:
            out["caption_loss"] = out["caption_loss"] + float("inf")
            out["loss"] = out["loss"] + out["caption_loss"]
        return out

    monkeypatch.setattr(FundusVLM, "forward", poisoned)
    cfg = smoke_cfg(synth_root, tmp_path / "run", **{"train.save_every": 2})
    with pytest.raises(T.NonFiniteLossError, match=r"^step 5: caption_loss is inf$"):
        T.pretrain(cfg)
    assert ckpt.last_checkpoint(tmp_path / "run").name == "checkpoint-4"
    fl.load_model(tmp_path / "run" / "checkpoint-last")  # the last good checkpoint still loads


@pytest.mark.parametrize("method", available_methods())
def test_every_method_takes_steps(synth_root, tmp_path, method):
    cfg = smoke_cfg(synth_root, tmp_path / "run", method, **{"train.steps": 2, "train.save_every": 0})
    rows = read_csv(T.pretrain(cfg) / "metrics.csv")
    m = cfg.method
    expected = {"contrastive_loss": m.contrastive_weight > 0, "image_gen_loss": m.image_gen_weight > 0,
                "caption_loss": m.caption_weight > 0}
    for term, on in expected.items():
        assert (term in rows[0]) == on, term
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_command_line(synth_root, tmp_path, capsys):
    argv = ["--preset", "smoke", "--method", "clip", f"data.synth_root={synth_root}",
            f"train.output_dir={tmp_path}/{{method}}", "train.steps=2"]
    assert pretrain_main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "clip"))
    assert (tmp_path / "clip" / "checkpoint-last" / "config.json").is_file()
    assert pretrain_main(["--preset", "smoke", "train.stpes=2"]) == 2
    assert "train.steps" in capsys.readouterr().err
