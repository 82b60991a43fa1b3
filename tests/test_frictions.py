"""Small frictions a new user hit (issue 19), one test each: a mistyped dataset or timm name
gets a did-you-mean, few-shot warnings name the draw they are about, tied columns bold no
cell, the kernel's TCP warning stays out of ``reproduce``, ``manifest --help`` is the full
help, and ``build/`` is ignored."""

import subprocess
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest

from fundus_lab.eval import sample_few_shot
from fundus_lab.eval.tables import write_table

ROOT = Path(__file__).resolve().parents[1]


def test_eval_with_a_mistyped_dataset_is_one_line_with_did_you_mean(tmp_path, capsys):
    from fundus_lab.cli import evaluate_main

    code = evaluate_main(["--checkpoint", str(tmp_path), "--protocol", "zero_shot", "--dataset", "synth-odr"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "synth-odr" in err and "did you mean synth-odir" in err


def test_a_mistyped_timm_name_suggests_registered_ones():
    from fundus_lab.models.image import create_timm_model

    with pytest.raises(ValueError, match=r"did you mean 'vit_tiny_patch16_224'"):
        create_timm_model("vit_tinyy_patch16_224", img_size=32)


def test_few_shot_validation_draws_do_not_claim_the_runs_k():
    labels = np.repeat([0, 1, 2], [3, 10, 10])  # class 0: 3 images, one of them taken as the k=1 shot
    shots = sample_few_shot(labels, 1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_few_shot(labels, 4, seed=1, exclude=shots, purpose="the validation draw of the k=1 run")
    (w,) = caught
    message = str(w.message)
    assert "k=4" not in message and "k_val=4" in message and "the k=1 run" in message
    assert "[(0, 2)]" in message  # class 0 has 2 left for validation
    with pytest.warns(UserWarning, match=r"^fewer than k=4 samples"):  # a shot draw still says its k
        sample_few_shot(labels, 4, seed=1)


def test_table_bolds_a_unique_best_only(tmp_path):
    zero = {"mean": 0.0, "std": 0.0, "n": 2, "ci": [0.0, 0.0]}
    rows = [{"method": "a", "zs": zero, "ft": {"mean": 0.51, "std": 0.0, "n": 1}},
            {"method": "b", "zs": dict(zero), "ft": {"mean": 0.5101, "std": 0.0, "n": 1}},  # ties at 51.0 as shown
            {"method": "c", "zs": dict(zero), "ft": {"mean": 0.40, "std": 0.0, "n": 1}}]
    paths = write_table(rows, tmp_path, [("zs", "Zero-shot"), ("ft", "Fine-tune")])
    assert "**" not in paths["md"].read_text() and r"\textbf" not in paths["tex"].read_text()
    rows[1]["ft"]["mean"] = 0.53
    md = write_table(rows, tmp_path, [("zs", "Zero-shot"), ("ft", "Fine-tune")])["md"].read_text()
    assert md.count("**") == 2 and "**53.0**" in md


def test_reproduce_keeps_the_kernels_tcp_warning_out_of_stderr(tmp_path, capfd):
    from fundus_lab.reproduce import run_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sys; print('to stderr', file=sys.stderr)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "n.ipynb"
    nbformat.write(nb, src)
    run_notebook(src, tmp_path / "out.ipynb", {}, tmp_path / "n.log", tmp_path)
    assert "without encryption" not in capfd.readouterr().err
    assert "to stderr" in (tmp_path / "n.log").read_text()  # the notebook's own stderr still reaches its log


def test_manifest_help_is_the_full_help(capsys):
    from fundus_lab.cli import main

    assert main(["manifest", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--image-column", "--label-column", "--task", "--output", "SOURCE".lower()):
        assert option in out


def test_build_folder_is_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "build/"], cwd=ROOT)
    assert done.returncode == 0, ".gitignore does not ignore build/ (pip wheel . leaves it in the checkout)"
