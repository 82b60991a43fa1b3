"""Issue 16 item 8: names that become paths (manifest ``name``, reproduce's run name, method
and preset names, outside-model names, notebook names) match ``[A-Za-z0-9._-]+`` and are not
``.``/``..``; derived paths stay inside their folder; the image-cache cleanup deletes only
its own stale caches, inside its own folder."""

from __future__ import annotations

import pytest
import yaml

from fundus_lab import cli
from fundus_lab import config as C
from fundus_lab import names as N
from fundus_lab import reproduce as rp
from fundus_lab.data import open_dataset
from fundus_lab.data.cache import SUFFIX
from fundus_lab.data.manifest import ManifestError
from doubles import Case

BAD_NAMES = ["../../x/victim/rel", "..", ".", "a/b", "a b", "x*", "", "caché"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_name_refuses_what_is_not_one_plain_component(name):
    with pytest.raises(C.ConfigError, match=r"thing .* is not a usable name: use letters, digits"):
        N.check_name(name, "thing")


@pytest.mark.parametrize("name", ["synth-odir", "run_2026.12.07", "A-b_c.d"])
def test_plain_names_pass(name):
    assert N.check_name(name, "thing") == name


def test_path_inside_refuses_a_link_that_leaves_the_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sneaky").symlink_to(tmp_path)
    assert N.path_inside(tmp_path / "runs", "fine", "run name") == tmp_path / "runs" / "fine"
    with pytest.raises(C.ConfigError, match=r"run name 'sneaky': .* outside"):
        N.path_inside(tmp_path / "runs", "sneaky", "run name")


def test_a_manifest_name_that_is_a_path_is_refused_and_writes_nothing(tmp_path):
    """The issue's case: the name put the cache's .npy and .json in another folder."""
    victim = tmp_path / "x" / "victim"
    victim.mkdir(parents=True)
    c = Case(tmp_path / "ds")
    c.m["name"] = "../../x/victim/rel"
    with pytest.raises(ManifestError, match=r"tiny.yaml: name: '../../x/victim/rel' is not a usable name"):
        open_dataset(c.write(), split=None, image_size=8, image_cache=True, image_cache_dir=tmp_path / "cache" / "a")
    assert list(victim.iterdir()) == []


def test_cache_cleanup_deletes_only_its_own_stale_caches(tmp_path):
    """Stale caches of this dataset/split/size are removed; a user's file that the old glob
    ``<stem>-*.u8.npy`` also matched, and other datasets' caches, stay."""
    cache = tmp_path / "cache"
    cache.mkdir()
    c = Case(tmp_path / "ds")
    manifest = c.write()
    stale = cache / f"tiny-all-8-{'0' * 20}{SUFFIX}"
    keep = [cache / f"tiny-all-8-backup{SUFFIX}", cache / f"tiny-all-8-{'0' * 20}-copy{SUFFIX}",
            cache / f"tinier-all-8-{'1' * 20}{SUFFIX}", cache / f"tiny-all-16-{'2' * 20}{SUFFIX}"]
    for path in [stale, *keep]:
        path.write_bytes(b"x")
    stale.with_suffix(".json").write_text("{}")
    ds = open_dataset(manifest, split=None, image_size=8, image_cache=True, image_cache_dir=cache)
    assert ds.image_cache is not None
    assert not stale.exists() and not stale.with_suffix(".json").exists()
    assert all(p.read_bytes() == b"x" for p in keep)


def test_reproduce_run_name_cannot_leave_the_runs_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(C.ConfigError, match=r"run name '../escaped' is not a usable name"):
        rp.reproduce("smoke", run_name="../escaped", runs_dir=runs)
    assert cli.reproduce_main(["--preset", "smoke", "--name", "../escaped", "--runs-dir", str(runs)]) == 2
    assert "run name '../escaped' is not a usable name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()


def test_method_and_preset_names_cannot_name_files_outside_configs(tmp_path, monkeypatch):
    """``method=../evil`` read ``configs/evil.yaml`` (any YAML reachable by a relative path)."""
    configs = tmp_path / "configs"
    for kind in ("presets", "methods"):
        (configs / kind).mkdir(parents=True)
    (configs / "presets" / "default.yaml").write_text("{}\n")
    (configs / "evil.yaml").write_text(yaml.safe_dump({"train": {"output_dir": str(tmp_path / "elsewhere")}}))
    monkeypatch.setattr(C, "CONFIG_DIR", configs)
    with pytest.raises(C.ConfigError, match=r"method name '../evil' is not a usable name"):
        C.load_config(method="../evil")
    with pytest.raises(C.ConfigError, match=r"method name '../evil' is not a usable name"):
        C.load_config(overrides=["method=../evil"])
    with pytest.raises(C.ConfigError, match=r"preset name '../evil' is not a usable name"):
        C.load_config(preset="../evil")


@pytest.mark.parametrize("name", ["..", "a/b", "../x"])
def test_external_and_notebook_names_are_checked(tmp_path, name):
    from fundus_lab.experiment import Run

    run = Run("smoke", tmp_path / "run", tmp_path / "data")
    with pytest.raises(C.ConfigError, match=r"external model name .* is not a usable name"):
        run.add_external(name, tmp_path)
    with pytest.raises(C.ConfigError, match=r"notebook name .* is not a usable name"):
        Run(notebook=name, preset="smoke", run_dir=tmp_path / "nb")
    assert not (tmp_path / "nb").exists()
