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

    for name, (module, func, _) in cli.SUBCOMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fundus_lab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "reproduce" in out.stdout


def test_version_and_manifest_usage(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fundus-lab ")
    assert cli.main(["manifest"]) == 2
    assert "manifest init" in capsys.readouterr().err
