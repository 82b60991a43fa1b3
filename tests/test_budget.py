"""train.budget: equal steps or equal training FLOPs. Under ``flops`` each method gets the
steps its per-step FLOPs imply (EVA: both stages and its CLIP teacher counted), computed
inside the experiment's resolve_run_config; the table legend states the rule and each method's steps and FLOPs."""

from pathlib import Path

import pytest
import torch

from fundus_lab import budget as B
from fundus_lab import config as C
from fundus_lab.experiment import resolve_run_config
from fundus_lab.models.model import stage1_steps

# FLOPs of one step by method (EVA: stage 1, stage 2), so the expected steps are computable by hand
FAKE = {"ours": (300,), "clip": (100,), "coca": (200,), "eva": (50, 100), "mae": (70,)}


@pytest.fixture
def fake_flops(monkeypatch):
    monkeypatch.setattr(B, "step_flops", lambda cfg: FAKE[cfg.method.name])


def _cfg(method, *extra):
    return resolve_run_config("smoke", method, ["train.steps=10", *extra])


def test_flops_budget_gives_each_method_the_steps_its_flops_imply(fake_flops):
    budget = 10 * 300  # ours at train.steps
    assert _cfg("ours", "train.budget=flops").train.steps == 10
    assert _cfg("clip", "train.budget=flops").train.steps == 30
    assert _cfg("coca", "train.budget=flops").train.steps == 15
    assert _cfg("mae", "train.budget=flops").train.steps == round(budget / 70)  # 43
    # EVA: teacher (clip, 100) + half the steps at 50 + half at 100 = 175 per step -> 17 steps,
    # and its teacher trains as many
    eva = _cfg("eva", "train.budget=flops")
    assert (eva.train.steps, eva.train.teacher_steps) == (17, 17)
    first = stage1_steps(0.5, 17)
    assert B.training_flops(eva)["flops"] == first * 50 + (17 - first) * 100 + 17 * 100 == budget
    # another reference method sets the budget: clip at 10 steps = 1000
    assert _cfg("ours", "train.budget=flops", "train.budget_method=clip").train.steps == round(1000 / 300)


def test_steps_budget_leaves_every_method_at_train_steps(fake_flops):
    for method in FAKE:
        cfg = _cfg(method)
        assert (cfg.train.steps, cfg.train.teacher_steps) == (10, None)
    eva = B.training_flops(_cfg("eva"))
    assert eva == {"steps": 10, "teacher_steps": 10, "flops_per_step": [50, 100], "flops": 5 * 50 + 5 * 100 + 10 * 100}


def test_unknown_budget_method_is_named():
    with pytest.raises(C.ConfigError, match="train.budget_method = 'oursx' is not a method"):
        _cfg("clip", "train.budget=flops", "train.budget_method=oursx")
    with pytest.raises(C.ConfigError, match="budget"):
        _cfg("clip", "train.budget=equal")


def test_counted_flops_set_steps_within_one_step_of_the_budget():
    """The real counter at the smoke preset: each method's total is the budget to within one of its steps."""
    ref = B.training_flops(_cfg("ours"))["flops"]
    for method in ("clip", "mae", "eva"):
        cfg = _cfg(method, "train.budget=flops")
        got = B.training_flops(cfg)
        per_step = got["flops"] / got["steps"]
        assert abs(got["flops"] - ref) <= per_step
        assert got["steps"] != 10  # the methods cost differently: equal FLOPs is not equal steps
    ours = B.step_flops(_cfg("ours"))[0]
    assert ours > B.step_flops(_cfg("clip"))[0] > 0  # ours adds decoders to clip's two towers


def test_counting_flops_does_not_move_the_random_streams():
    B._stage_flops.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    B.step_flops(_cfg("clip", "train.batch_size=2"))
    assert torch.equal(torch.rand(3), expected)


def test_how_steps_were_set_is_not_part_of_the_pretraining_key():
    from fundus_lab.experiment.pretraining import _pretrain_inputs

    steps = _cfg("clip")
    flops = _cfg("clip", "train.budget=flops", "train.budget_method=clip")  # same steps, other rule
    assert flops.train.steps == steps.train.steps
    assert _pretrain_inputs(steps) == _pretrain_inputs(flops)


def test_eva_under_a_flops_budget_trains_its_own_teacher(tmp_path, fake_flops, monkeypatch):
    """The teacher trains EVA's teacher_steps in its own folder (not the clip row's), and EVA reads it."""
    from fundus_lab import experiment as ex
    from fundus_lab.experiment import run as run_module

    trained = []

    def fake_pretrain(mcfg, force=False, callbacks=()):
        trained.append((mcfg.method.name, mcfg.train.steps, mcfg.train.output_dir, mcfg.method.teacher_checkpoint))
        return Path(mcfg.train.output_dir)

    monkeypatch.setattr(run_module, "pretrain_cached", fake_pretrain)
    monkeypatch.setattr(run_module, "ensure_synthetic", lambda *a, **k: None)
    run = ex.Run("smoke", tmp_path / "run", tmp_path / "data", ["train.steps=10", "train.budget=flops"])
    run.checkpoint("eva")
    (teacher, t_steps, t_dir, _), (eva, e_steps, _, e_teacher) = trained
    assert (teacher, t_steps, eva, e_steps) == ("clip", 17, "eva", 17)
    assert Path(t_dir) == tmp_path / "run" / "pretrain" / "eva-teacher" / "seed0"
    assert Path(e_teacher) == Path(t_dir) / "checkpoint-last"
    trained.clear()
    ex.Run("smoke", tmp_path / "run2", tmp_path / "data", ["train.steps=10"]).checkpoint("eva")
    assert "pretrain/clip/seed0" in trained[0][2]  # equal steps: the clip row is the teacher


def test_legend_states_the_rule_and_each_methods_steps_and_flops(fake_flops):
    from fundus_lab.experiment.table import budget_note

    cfg = _cfg(None, "train.budget=flops")
    note = budget_note(cfg, {m: B.training_flops(_cfg(m, "train.budget=flops")) for m in ("ours", "clip", "eva")})
    assert "equal training FLOPs (train.budget=flops)" in note and "those of ours at train.steps=10" in note
    assert "clip: 30 steps, 3e+03 FLOP" in note
    assert "eva: 17 steps + 17 CLIP-teacher steps, 3e+03 FLOP" in note
    assert "the supervised row trains on the images of train.steps=10 steps (80 images)" in note  # batch 8 at smoke
    steps_note = budget_note(_cfg(None), {"clip": B.training_flops(_cfg("clip"))})
    assert "equal steps (train.budget=steps)" in steps_note and "supervised" not in steps_note


def test_reference_rows_keep_the_equal_steps_budget_under_flops(tmp_path, fake_flops):
    """The supervised row's images seen are the reference budget's (train.steps x batch), not
    those of the method whose architecture it borrows (clip: 30 steps here), so it is the same
    row at equal steps and at equal FLOPs."""
    from fundus_lab import experiment as ex
    from fundus_lab.experiment.pretraining import reference_key

    flops = ex.Run("smoke", tmp_path / "run", tmp_path / "data", ["train.steps=10", "train.budget=flops"])
    steps = ex.Run("smoke", tmp_path / "run2", tmp_path / "data", ["train.steps=10"])
    assert flops.config("clip").train.steps == 30
    for row in ("supervised", "random-init"):
        assert flops.config(row).train.steps == 10
        assert flops.config(row).method.name == flops.config("clip").method.name  # clip's architecture
        assert reference_key(row, flops.config(row)) == reference_key(row, steps.config(row))  # reuses its cache
