"""The command line dispatches to library functions and rejects unknown commands clearly."""

import subprocess
import sys

from fundus_lab import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_command_suggests_close_match(capsys):
    assert cli.main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err


def test_every_subcommand_resolves_to_a_callable():
    import importlib

    for name, command in cli.SUBCOMMANDS.items():
        assert callable(getattr(importlib.import_module(command.module), command.function)), name


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fundus_lab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "reproduce" in out.stdout


def test_version_and_manifest_usage(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fundus-lab ")
    assert cli.main(["manifest"]) == 2
    assert "manifest init" in capsys.readouterr().err


def test_top_level_help_is_plain_text(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":data:" not in out and ":func:" not in out
    assert out.startswith("usage: fundus-lab")


def test_names_take_one_syntax_everywhere():
    from fundus_lab.names import split_names

    assert split_names("clip,coca") == ["clip", "coca"]
    assert split_names(["clip,coca", "ours"]) == ["clip", "coca", "ours"]
    assert split_names(["clip", " eva "]) == ["clip", "eva"]
    assert split_names(None) == [] and split_names([""]) == []


def test_comma_list_override_of_numbers():
    from fundus_lab.config import ConfigError, load_config

    assert load_config(preset="smoke", overrides=["eval.shots=1,2,4"]).eval.shots == [1, 2, 4]
    assert load_config(preset="smoke", overrides=["eval.shots=[1, 8]"]).eval.shots == [1, 8]
    import pytest

    with pytest.raises(ConfigError, match="eval.shots"):
        load_config(preset="smoke", overrides=["eval.shots=1,two"])


def test_pretrain_without_method_is_ours(monkeypatch):
    import dataclasses

    from fundus_lab import train

    seen = []
    monkeypatch.setattr(train, "pretrain", lambda cfg, **_: seen.append(cfg) or "runs/x")
    assert cli.main(["pretrain", "--preset", "smoke"]) == 0
    assert cli.main(["pretrain", "--preset", "smoke", "--method", "ours"]) == 0
    assert seen[0].method.name == "ours"
    assert dataclasses.asdict(seen[0]) == dataclasses.asdict(seen[1])


def test_compare_rejects_unknown_methods_before_training(monkeypatch, tmp_path, capsys):
    from fundus_lab import experiment

    def never(*_a, **_k):
        raise AssertionError("compare trained or evaluated before checking the method names")

    monkeypatch.setattr(experiment.Run, "evaluate", never)
    monkeypatch.setattr(experiment.Run, "pretrain", never, raising=False)
    rc = cli.main(["compare", "--preset", "smoke", "--out", str(tmp_path / "cmp"), "--methods", "clip,ousr"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'ousr'" in err and "did you mean 'ours'" in err


def test_compare_and_reproduce_accept_comma_and_space_lists(monkeypatch, tmp_path):
    from fundus_lab import experiment, reproduce

    got = {}
    md = tmp_path / "table.md"
    md.write_text("| table |")
    monkeypatch.setattr(experiment, "compare", lambda run, m, p, r, **kw: got.setdefault("compare", (m, p, r)) and {"md": md})
    cli.main(["compare", "--preset", "smoke", "--out", str(tmp_path / "c"), "--methods", "clip,coca", "ours",
              "--references", "random-init"])
    assert got["compare"][0] == ["clip", "coca", "ours"] and got["compare"][2] == ["random-init"]
    monkeypatch.setattr(reproduce, "reproduce", lambda preset, data_root, methods, *a, **k: got.setdefault("rep", methods))
    cli.main(["reproduce", "--preset", "smoke", "--methods", "clip,coca", "ours"])
    assert got["rep"] == ["clip", "coca", "ours"]


def test_commands_whose_parsers_live_here_print_their_full_help(capsys):
    import pytest

    for command, options in (("synth", ("--out", "--task", "--overwrite")),
                             ("predict", ("--top", "--json", "--batch-size", "checkpoint"))):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fundus-lab {command}"), out
        for option in options:
            assert option in out, (command, option)
    assert cli.SUBCOMMANDS.get("predict").module == "fundus_lab.cli"
