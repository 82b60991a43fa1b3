"""fundus_lab.reproduce on tiny stand-in notebooks: order, parameters, index page, failure reporting."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from fundus_lab import cli, experiment
from fundus_lab import config as C
from fundus_lab import reproduce as rp
from fundus_lab.experiment.store import project_root
from doubles import reproduce_notebook as _notebook


@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(
        folder / "00_write.ipynb",
        "from pathlib import Path\n"
        "figs = Path(run_dir) / 'figures' / '00_write'; figs.mkdir(parents=True)\n"
        "tabs = Path(run_dir) / 'tables' / '00_write'; tabs.mkdir(parents=True)\n"
        "from PIL import Image\n"
        "Image.new('RGB', (4, 4)).save(figs / 'square.png')\n"
        "(tabs / 'scores.csv').write_text(f'method,mean\\nclip,0.61234\\nours,0.75\\n')\n"
        "(Path(run_dir) / 'seen.txt').write_text(f'{preset}|{methods}|{data_root}')",
    )
    _notebook(folder / "01_read.ipynb", "from pathlib import Path\nassert (Path(run_dir) / 'seen.txt').is_file()\nprint('second ran')")
    _notebook(folder / "02_fail.ipynb", "x = 1", "raise ValueError('boom')", "print('never')")
    _notebook(folder / "03_after.ipynb", "print('should not run')")
    return folder


def test_reproduce_runs_in_order_and_writes_index(notebooks, tmp_path):
    lines = []
    run = rp.reproduce("smoke", methods=["clip", "ours"], run_name="r1", runs_dir=tmp_path / "runs",
                       notebooks=["00", "01_read"], notebook_dir=notebooks, log=lines.append, progress=False)
    assert run == tmp_path / "runs" / "r1"
    data_root = C.resolve_path(C.resolve_config("smoke").data.synth_root)  # the preset's, made absolute
    assert (run / "seen.txt").read_text() == f"smoke|['clip', 'ours']|{data_root}"
    status = json.loads((run / "status.json").read_text())
    assert [s["state"] for s in status.values()] == ["ok", "ok"]
    assert any("[2/2] 01_read ok" in line for line in lines)
    executed = nbformat.read(run / "notebooks" / "01_read.ipynb", as_version=4)
    assert "second ran" in json.dumps(executed.cells[-1].outputs)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    index = (run / "index.html").read_text()
    assert "<img src='figures/00_write/square.png'" in index and "0.6123" in index
    assert "notebooks/01_read.ipynb" in index
    readme = (run / "README.md").read_text()
    assert "| clip | 0.6123 |" in readme and "![square](figures/00_write/square.png)" in readme


def test_failure_names_notebook_and_cell_and_keeps_what_finished(notebooks, tmp_path):
    with pytest.raises(rp.NotebookFailed) as info:
        rp.reproduce("smoke", run_name="r2", runs_dir=tmp_path / "runs", notebook_dir=notebooks,
                     notebooks=["00", "02", "03"], log=lambda _: None, progress=False)
    err = info.value
    assert err.notebook.name == "02_fail.ipynb"
    assert err.cell_index == 4  # markdown 1, parameters 2, "x = 1" 3, the raise 4 (as committed)
    assert "ValueError: boom" in str(err) and "raise ValueError" in str(err)
    run = tmp_path / "runs" / "r2"
    status = json.loads((run / "status.json").read_text())
    assert {k: v["state"] for k, v in status.items()} == {"00_write": "ok", "02_fail": "failed", "03_after": "not run"}
    assert (run / "notebooks" / "02_fail.ipynb").is_file()  # executed up to the error
    assert not (run / "notebooks" / "03_after.ipynb").exists()
    assert "boom" in (run / "index.html").read_text()


def test_main_returns_nonzero_on_failure(notebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rp, "list_notebooks", lambda _dir=None, select=None: [notebooks / "02_fail.ipynb"])
    assert cli.reproduce_main(["--preset", "smoke", "--name", "r3", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 1
    assert "02_fail.ipynb failed in cell 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.reproduce_main(["--preset", "huge"])


def _two_cells(folder: Path, name: str) -> None:
    """A notebook of exactly two code cells and no parameters cell (papermill injects none)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x + 1)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{name}.ipynb")


def test_progress_shows_notebook_i_of_n_and_cell_j_of_m_unless_switched_off(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _two_cells(folder, "00_one")
    _two_cells(folder, "01_two")
    rp.reproduce("smoke", run_name="p", runs_dir=tmp_path / "runs", notebook_dir=folder, log=lambda _: None)
    err = capsys.readouterr().err
    for i, name in ((1, "00_one"), (2, "01_two")):
        bar = [ln for ln in err.replace("\r", "\n").splitlines() if f"notebook {i}/2 {name}" in ln]
        # the start and the end of the cell count (steps between depend on tqdm's refresh interval)
        assert any("| 0/2 [" in ln for ln in bar) and any("| 2/2 [" in ln for ln in bar), err
    rp.reproduce("smoke", run_name="q", runs_dir=tmp_path / "runs", notebook_dir=folder, log=lambda _: None,
                 progress=False)
    assert capsys.readouterr().err == ""


def test_list_notebooks_selects_by_number_or_name(notebooks):
    assert [p.stem for p in rp.list_notebooks(notebooks)] == ["00_write", "01_read", "02_fail", "03_after"]
    assert [p.stem for p in rp.list_notebooks(notebooks, ["03", "00_write"])] == ["00_write", "03_after"]
    with pytest.raises(ValueError, match="notebook '9' not found; available: 00_write"):
        rp.list_notebooks(notebooks, ["9"])


def test_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """Issue 16 item 4: one rule for every command and notebook (the checkout is only where
    the code is: project_root() names the commit that ran)."""
    monkeypatch.chdir(tmp_path)
    assert (project_root() / "pyproject.toml").is_file()
    assert C.resolve_path("runs/x") == tmp_path / "runs" / "x"
    assert C.resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_index_html_escapes_names_and_table_cells(tmp_path):
    """The index comes from the packaged jinja2 template with autoescape on."""
    run = tmp_path / "run"
    name = "00_<b>bold</b>"
    (run / "tables" / name).mkdir(parents=True)
    (run / "tables" / name / "scores.csv").write_text('method,note\nclip,"<script>alert(1)</script>"\nours,a & b\n')
    (run / "tables" / name / "table1.csv").write_text("method,x\nclip,1\n")
    (run / "tables" / name / "table1.md").write_text("| method | x |\n|---|---|\n| <i>clip</i> | 1 |\n")
    (run / "figures" / name).mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (2, 2)).save(run / "figures" / name / "roc #1.png")
    status = {name: {"state": "failed", "seconds": 1.0, "error": "ValueError: <bad>"}}
    index, readme = rp.write_index(run, status, {"preset": "smoke", "methods": ["<m>"]})
    page = index.read_text()
    for raw in ("<b>bold</b>", "<script>", "<i>clip</i>", "<bad>", "<m>"):
        assert raw not in page, raw
    assert "00_&lt;b&gt;bold&lt;/b&gt; <span class='failed'>[failed]</span>" in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page and "<td>a &amp; b</td>" in page
    assert "<pre>| method | x |" in page and "&lt;i&gt;clip&lt;/i&gt;" in page  # the notebook's own .md table
    assert "<pre class='failed'>ValueError: &lt;bad&gt;</pre>" in page
    assert "<img src='figures/00_%3Cb%3Ebold%3C/b%3E/roc%20%231.png' alt='roc #1'>" in page
    assert "methods=[&#39;&lt;m&gt;&#39;]" in page
    text = readme.read_text()  # README.md beside it: the same content, as Markdown
    assert "## 00_<b>bold</b> (failed)" in text and "| clip | <script>alert(1)</script> |" in text


def test_index_template_ships_as_package_data():
    import tomllib

    pyproject = tomllib.loads((project_root() / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fundus_lab"]
    assert (rp.PACKAGE_ROOT / "templates" / "index.html.j2").is_file()
    assert any(rp.PACKAGE_ROOT.joinpath("templates", "index.html.j2").match(f"fundus_lab/{p}") for p in patterns)
    assert any(d.replace(" ", "").startswith("jinja2") for d in pyproject["project"]["dependencies"])


def test_markdown_table():
    import pandas as pd

    md = rp.markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.123456]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.1235 |"]


def _smoke_reproduction(folder: Path, overrides=()) -> Path:
    """`fundus-lab reproduce --preset smoke` over notebooks/ into ``folder`` (its own data too)."""
    code = cli.reproduce_main(["--preset", "smoke", "--name", "e2e", "--runs-dir", str(folder / "runs"),
                    "--data-root", str(folder / "synth"), "--no-progress", *overrides])
    assert code == 0
    return folder / "runs" / "e2e"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Two smoke reproductions into two fresh folders (same command, same machine); each
    trains its own knowledge-base tokenizer, which must come out byte-identical."""
    return [_smoke_reproduction(tmp_path_factory.mktemp(f"smoke{i}")) for i in (1, 2)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_reproduce_smoke_end_to_end_on_the_real_notebooks(smoke_runs):
    """`fundus-lab reproduce --preset smoke` over notebooks/: every notebook executed, every table, the index."""
    run = smoke_runs[0]
    expected = [p.name for p in rp.list_notebooks()]
    status = json.loads((run / "status.json").read_text())
    assert sorted(status) == sorted(Path(n).stem for n in expected)
    assert all(s["state"] == "ok" for s in status.values()), status
    for name in expected:
        executed = nbformat.read(run / "notebooks" / name, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[:1]}"
    # the comparison table in all three formats, and the per-notebook tables the index shows
    table1 = run / "table1.csv"
    assert table1.is_file(), "no table1.csv in the run folder"
    for suffix in (".md", ".tex"):
        assert table1.with_suffix(suffix).is_file()
    assert list((run / "tables").rglob("*.csv"))
    index = (run / "index.html").read_text()
    for name in expected:
        assert f"notebooks/{name}" in index
    assert "<img src=" in index and "<table" in index
    assert (run / "README.md").is_file()
    # the record the lead copies to results/<preset>/
    record = json.loads((run / "results" / "run.json").read_text())
    assert record["command"].startswith("fundus-lab reproduce --preset smoke")
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu_model"]
    assert set(record["notebooks"]) == set(status) and record["total_seconds"] > 0
    assert (run / "results" / "table1.md").read_text() == (run / "table1.md").read_text()
    assert "explanation_scores.txt" in {p.name for p in (run / "results").iterdir()}
    assert "uniform" in (run / "explanation_scores.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_smoke_reproductions_give_the_same_table1_byte_for_byte(smoke_runs):
    first, second = smoke_runs
    a, b = (first / "table1.csv").read_bytes(), (second / "table1.csv").read_bytes()
    if a != b:
        import difflib

        diff = "\n".join(difflib.unified_diff(a.decode().splitlines(), b.decode().splitlines(), lineterm=""))
        pytest.fail(f"table1.csv differs between two runs of the same command:\n{diff[:3000]}")


def test_write_summary_records_command_commit_machine_and_times(tmp_path):
    (tmp_path / "table1.md").write_text("| Method |\n")
    (tmp_path / "table1.csv").write_text("method\n")
    status = {"00_a": {"state": "ok", "seconds": 1.5}, "01_b": {"state": "failed", "seconds": 2.0, "error": "x"}}
    out = rp.write_summary(tmp_path, status, "fundus-lab reproduce --preset smoke", 3.5)
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "fundus-lab reproduce --preset smoke" and record["total_seconds"] == 3.5
    assert record["notebooks"]["01_b"] == {"state": "failed", "seconds": 2.0}
    assert len(record["commit"].split("+")[0]) == 40  # this checkout is a git repository
    assert record["machine"]["cores"] >= 1
    import torch  # the kernels a rerun must share to agree bit for bit

    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    md = (out / "run.md").read_text()
    assert f"{record['machine']['cpu_capability']} kernels" in md
    moved = json.loads((rp.write_summary(tmp_path, status, "x", 1.0, commit="0" * 40) / "run.json").read_text())
    assert moved["commit"] == "0" * 40  # the commit the run started on, not HEAD at its end
    assert "HEAD moved to" in (tmp_path / "results" / "run.md").read_text()
    assert "| 00_a | ok | 1.5 |" in md and "## Table 1" in md and (out / "table1.csv").is_file()


def test_a_notebooks_run_reads_a_real_dataset_under_data_root(tmp_path):
    """--data-root with a real layout: the notebooks' datasets come from <data_root>/<name>."""
    from doubles import build_aptos

    truth = build_aptos(tmp_path / "data" / "aptos2019")
    ctx = experiment.Run(notebook="04_zero_shot", preset="smoke", run_dir=tmp_path / "run", data_root=tmp_path / "data",
                         overrides=["eval.zero_shot_dataset=aptos2019", "eval.seeds=1"])
    cfg = ctx.config()
    assert cfg.eval.zero_shot_dataset == "aptos2019" and cfg.eval.seeds == 1
    ds = ctx.dataset(cfg.eval.zero_shot_dataset, split="all")
    assert len(ds) == len(truth)
    assert {Path(r.path).stem: r.label for r in ds.records} == truth


def test_reproduce_rejects_a_mistyped_override_before_running(capsys, tmp_path):
    code = cli.reproduce_main(["--preset", "smoke", "--runs-dir", str(tmp_path), "eval.zero_shot_datset=odir5k"])
    assert code == 2
    err = capsys.readouterr().err
    assert "zero_shot_datset" in err and "zero_shot_dataset" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="key=value"):
        experiment.normalise_overrides(["no-equals-sign"])


def test_overrides_typed_after_a_list_option_are_overrides_not_names():
    """``--notebooks 07 eval.pretrain_seeds=[0,1,2]``: argparse's nargs="+" takes both words; the
    key=value goes back to the overrides (it once failed as "notebook ... not found")."""
    parse = lambda argv: cli.parse_with_overrides(cli.reproduce_parser(C.PRESETS), argv, ("methods", "notebooks"))
    args = parse(["--preset", "default", "train.steps=5", "--notebooks", "07", "eval.pretrain_seeds=[0,1,2]"])
    assert args.notebooks == ["07"] and args.overrides == ["train.steps=5", "eval.pretrain_seeds=[0,1,2]"]
    args = parse(["--methods", "clip,ours", "eval.seeds=2", "--notebooks", "04", "05"])
    assert args.methods == ["clip,ours"] and args.notebooks == ["04", "05"] and args.overrides == ["eval.seeds=2"]
    with pytest.raises(SystemExit):  # no notebook left: an error, not "every notebook"
        parse(["--notebooks", "eval.seeds=2"])
    compare = cli.compare_parser(experiment.REFERENCES, experiment.DEFAULT_PROTOCOLS)
    args = cli.parse_with_overrides(compare, ["--protocols", "zero_shot", "train.budget=flops"],
                                    ("methods", "references", "protocols"))
    assert args.protocols == ["zero_shot"] and args.overrides == ["train.budget=flops"]


def test_the_makefiles_record_targets_run_notebook_07_with_their_overrides():
    """The three long recorded runs (issue 21) are Makefile lines: each must reach notebook 07
    with its override, and the extended one with its methods."""
    makefile = (project_root() / "Makefile").read_text()
    variables = dict(line.split(" := ", 1) for line in makefile.splitlines() if " := " in line)
    expected = {"record-seeds": "eval.pretrain_seeds=[0,1,2]", "record-equal-flops": "train.budget=flops",
                "record-extended": None}
    for target, override in expected.items():
        recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        line = next(ln for ln in recipe.splitlines() if "fundus-lab reproduce" in ln)
        words = line.split("fundus-lab reproduce", 1)[1].split()
        words = [w.strip("'\"") for w in words]
        words = [variables.get(w[2:-1], w) if w.startswith("$(") else w for w in words]
        args = cli.parse_with_overrides(cli.reproduce_parser(C.PRESETS), words, ("methods", "notebooks"))
        assert args.notebooks == ["07"], target
        assert args.overrides == ([override] if override else []), target
        C.load_config(preset=args.preset, overrides=args.overrides)  # the override is a real key
        if target == "record-extended":
            assert "ours-no-mim" in ",".join(args.methods)
