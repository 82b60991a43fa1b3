"""Checkpoints: atomic writes, pruning, and loading without unpickling."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fundus_lab import checkpoint as ckpt


def _save_linear(model):
    def save(folder):
        save_file(model.state_dict(), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"in": 4, "out": 3}))

    return save


def _trained_linear(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_flatten_roundtrip_keeps_types():
    state = {"a": torch.arange(3), 0: {"t": (1.5, 2), "l": [None, True, "x"]}, "n": np.arange(2, dtype=np.int16)}
    tensors = {}
    tree = ckpt.flatten_state(state, tensors)
    json.dumps(tree)  # the tree is JSON
    back = ckpt.unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert torch.equal(back["a"], state["a"])
    assert back[0]["t"] == (1.5, 2) and isinstance(back[0]["t"], tuple)
    assert back[0]["l"] == [None, True, "x"]
    assert back["n"].dtype == np.int16 and back["n"].tolist() == [0, 1]
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.flatten_state({"f": object()}, {})


def test_optimizer_state_roundtrip_is_exact(tmp_path):
    model, opt = _trained_linear()
    ckpt.save_checkpoint(tmp_path, 3, save_model=_save_linear(model), optimizer=opt, trainer_state={"epoch": 1})

    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict(load_file(str(tmp_path / "checkpoint-last" / "model.safetensors")))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    state = ckpt.load_checkpoint(tmp_path / "checkpoint-last", opt2)
    assert state == {"step": 3, "trainer": {"epoch": 1}}
    assert opt2.param_groups[0]["lr"] == 0.1 and tuple(opt2.param_groups[0]["betas"]) == (0.9, 0.98)
    # one more identical step on both gives identical weights: moments and step counts came back
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, opt2)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_rng_state_roundtrip():
    ckpt_state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move on
    ckpt.set_rng_state(ckpt_state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_last_points_to_newest_and_old_ones_are_pruned(tmp_path):
    model, opt = _trained_linear(1)
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, save_model=_save_linear(model), optimizer=opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoint-last").is_symlink()
    assert ckpt.last_checkpoint(tmp_path).name == "checkpoint-6"
    # saving the same step again replaces it in place
    ckpt.save_checkpoint(tmp_path, 6, save_model=_save_linear(model), optimizer=opt, keep=2)
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last")["step"] == 6


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained_linear(1)
    ckpt.save_checkpoint(tmp_path, 2, save_model=_save_linear(model), optimizer=opt, trainer_state={"epoch": 0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the optimizer")

    monkeypatch.setattr(ckpt, "save_file", killed)  # the model is written, then the kill
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, save_model=_save_linear(model), optimizer=opt, keep=1)
    monkeypatch.undo()

    assert not (tmp_path / "checkpoint-4").exists()
    assert ckpt.last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last") == {"step": 2, "trainer": {"epoch": 0}}
    # the next save clears the leftover temp folder and succeeds
    ckpt.save_checkpoint(tmp_path, 4, save_model=_save_linear(model), optimizer=opt, keep=1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert ckpt.last_checkpoint(tmp_path).name == "checkpoint-4"


def test_incomplete_folder_is_never_taken_for_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint-9").mkdir()  # e.g. copied by hand, no state file
    assert ckpt.last_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is missing"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-9")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = _trained_linear()
    ckpt.save_checkpoint(tmp_path, 3, save_model=_save_linear(model), optimizer=opt,
                         trainer_state={"rng": [ckpt.rng_state()]})
    suffixes = {p.suffix for p in (tmp_path / "checkpoint-3").iterdir()}
    assert suffixes <= {".json", ".safetensors"}

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    state = ckpt.load_checkpoint(tmp_path / "checkpoint-last", opt2)
    ckpt.set_rng_state(state["trainer"]["rng"][0])
