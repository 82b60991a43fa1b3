"""Table writers: the three formats, n/a cells, bold best, raw numbers in CSV."""

import csv

from fundus_lab.eval.tables import format_cell, summarise, write_table

COLUMNS = [("zero_shot", "Zero-shot (ODIR acc.)"), ("few_shot", "Few-shot (k=16)"), ("fine_tune", "Fine-tune (kappa)")]


def _rows():
    return [
        {"method": "clip", "zero_shot": summarise([0.5]), "few_shot": summarise([0.6, 0.7]),
         "fine_tune": summarise([0.8, 0.6]), "run_dirs": "runs/clip"},
        {"method": "mae", "zero_shot": None, "few_shot": summarise([0.9, 0.7]),
         "fine_tune": summarise([0.5]), "run_dirs": "runs/mae"},
    ]


def test_summarise_and_format():
    s = summarise([0.6, 0.7, float("nan")])
    assert s["n"] == 2 and abs(s["mean"] - 0.65) < 1e-12 and abs(s["std"] - 0.05) < 1e-12
    assert format_cell(s) == "65.0 ± 5.0"
    assert format_cell(summarise([0.5])) == "50.0"  # one run: no spread to show
    assert format_cell(None) == "n/a"


def test_three_formats(tmp_path):
    paths = write_table(_rows(), tmp_path, COLUMNS, caption="Table 1", extra=["run_dirs"])
    assert set(paths) == {"csv", "md", "tex"}
    rows = list(csv.DictReader(open(paths["csv"])))
    assert rows[0]["few_shot_mean"] == "0.650000" and rows[0]["few_shot_n"] == "2"
    assert rows[1]["zero_shot_mean"] == "n/a" and rows[1]["run_dirs"] == "runs/mae"
    md = paths["md"].read_text().splitlines()
    assert md[2] == "| Method | Zero-shot (ODIR acc.) | Few-shot (k=16) | Fine-tune (kappa) |"
    assert md[4] == "| clip | 50.0 | 65.0 ± 5.0 | **70.0 ± 10.0** |"
    assert md[5] == "| mae | n/a | **80.0 ± 10.0** | 50.0 |"
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}{lccc}" in tex
    assert r"clip & 50.0 & 65.0 $\pm$ 5.0 & \textbf{70.0 $\pm$ 10.0} \\" in tex
    assert r"mae & n/a & \textbf{80.0 $\pm$ 10.0} & 50.0 \\" in tex
