"""Outside models in Table 1: a tiny open_clip checkpoint saved here is evaluated beside clip
with the same protocols, splits and cache layout (eval/<name>/seed<s>/), once, keyed by a
hash of its files; bad names, paths and checkpoints are refused before any pretraining."""

import csv
import json
import math
import re

import pytest

from fundus_lab import config as C
from doubles import external_compare_run as _run, save_tiny_open_clip

pytestmark = pytest.mark.filterwarnings("ignore:fewer than k")  # tiny data: validation draws fall short

PROTOCOLS = ["zero_shot", "few_shot"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from fundus_lab.experiment import compare

    out = tmp_path_factory.mktemp("compare_external")
    folder = out / "tinyclip"
    folder.mkdir()
    save_tiny_open_clip(folder, seed=3)
    run = _run(out)
    paths = compare(run, ["clip"], PROTOCOLS, references=[], external={"tinyclip": folder})
    return out, folder, run, paths


@pytest.mark.slow  # pretrains clip and evaluates both rows (minutes on a shared CPU)
def test_outside_model_gets_a_row_with_finite_numbers_and_a_legend(compared):
    out, folder, run, paths = compared
    rows = {r["method"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert list(rows) == ["clip", "tinyclip"]  # methods first, then outside models
    for protocol in PROTOCOLS:
        value = float(rows["tinyclip"][f"{protocol}_in_domain_mean"])
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert int(rows["tinyclip"]["few_shot_in_domain_n"]) == 2  # one evaluation x 2 few-shot seeds
    md = paths["md"].read_text()
    assert "| tinyclip |" in md
    assert "Outside models (not pretrained here" in md and f"tinyclip: {folder}" in md
    record = json.loads((run.run_dir / "eval" / "tinyclip" / "seed0" / "few_shot.json").read_text())
    assert record["external"] == str(folder) and record["pretrain_seed"] is None
    # the same splits as the method beside it
    clip = json.loads((run.run_dir / "eval" / "clip" / "seed0" / "few_shot.json").read_text())
    assert {s: v["sha256"] for s, v in record["splits"].items()} == {s: v["sha256"] for s, v in clip["splits"].items()}
    assert not (run.run_dir / "pretrain" / "tinyclip").exists()  # nothing pretrained for it


@pytest.mark.slow  # pretrains clip and evaluates both rows (minutes on a shared CPU)
def test_cached_until_a_file_of_the_model_changes(compared, monkeypatch):
    import fundus_lab.models

    out, folder, run, _ = compared
    before = run.evaluate("tinyclip", "zero_shot")

    def refuse(*args, **kwargs):
        raise AssertionError("a cached outside model was loaded again")

    monkeypatch.setattr(fundus_lab.models, "load_model", refuse)
    run.forget("tinyclip")
    assert run.evaluate("tinyclip", "zero_shot")["key"] == before["key"]  # from the cache, nothing loaded
    monkeypatch.undo()
    save_tiny_open_clip(folder, seed=4)  # new weights in the same file
    run.forget("tinyclip")
    after = run.evaluate("tinyclip", "zero_shot")
    assert after["key"] != before["key"] and after["weights_sha1"] != before["weights_sha1"]


def test_outside_model_is_evaluated_for_one_pretraining_seed(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    run = _run(tmp_path, ["eval.pretrain_seeds=[0,1]"])
    run.add_external("m", folder)
    assert run.seeds_of("m") == [0] and run.seeds_of("clip") == [0, 1]


def test_names_that_collide_and_paths_that_do_not_exist_are_refused(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(C.ConfigError, match="'clip' is the name of a method"):
        run.add_external("clip", tmp_path)
    with pytest.raises(C.ConfigError, match="'pixels' is the name of a reference row"):
        run.add_external("pixels", tmp_path)
    with pytest.raises(C.ConfigError, match="letters, digits"):
        run.add_external("a/b", tmp_path)
    with pytest.raises(C.ConfigError, match=f"{tmp_path / 'nowhere'} does not exist"):
        run.add_external("mine", tmp_path / "nowhere")


@pytest.mark.slow  # pretrains clip and evaluates both rows (minutes on a shared CPU)
def test_a_bad_checkpoint_fails_with_the_loader_error_before_any_pretraining(compared, monkeypatch):
    import fundus_lab.train
    from fundus_lab.experiment import compare
    from fundus_lab.models.external import ExternalModelError

    out, _, _, _ = compared
    bad = out / "broken"
    bad.mkdir()
    (bad / "open_clip_model.safetensors").write_bytes(b"not safetensors")
    (bad / "open_clip_config.json").write_text((out / "tinyclip" / "open_clip_config.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("pretraining started before the outside model was checked")

    monkeypatch.setattr(fundus_lab.train, "pretrain", refuse)
    with pytest.raises(ExternalModelError, match=re.escape(f"{bad / 'open_clip_model.safetensors'}: not a readable")):
        compare(_run(out), ["ours"], PROTOCOLS, references=[], external={"broken": bad})


def test_cli_external_option(tmp_path, capsys):
    from fundus_lab.cli import compare_main as main

    base = ["--preset", "smoke", "--out", str(tmp_path / "run"), "--methods", "clip", "--references", ""]
    assert main([*base, "--external", f"clip={tmp_path}"]) == 2
    assert "'clip' is the name of a method" in capsys.readouterr().err
    assert main([*base, "--external", f"mine={tmp_path / 'nowhere'}"]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--external", "no-equals-sign"])
    assert "expected NAME=PATH" in capsys.readouterr().err
