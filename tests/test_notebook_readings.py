"""Notebooks teach: each opens by saying what it shows and what to look for, and every figure
is followed by a short reading (a markdown cell starting ``**Reading.**``). Notebook 00
explains the benchmark's splits; 07 explains how to read Table 1 and its pairs of rows."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# a code cell draws a figure when it calls a plotting function of fundus_lab.viz or model_viz, or saves one
FIGURE_CALLS = ("viz.plot_", "viz.save_figure(", "PromptPlayground(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_what_it_shows_and_what_to_look_for(path):
    opening = nbformat.read(path, as_version=4).cells[0]
    assert opening.cell_type == "markdown"
    assert "**What this shows.**" in opening.source and "**What to look for.**" in opening.source, path.name
    assert "runs/latest" in opening.source and "train_if_missing = True" in opening.source, (
        f"{path.name}: say which run it opens and that it trains only when asked")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_is_followed_by_a_reading(path):
    cells = nbformat.read(path, as_version=4).cells
    figures = [i for i, c in enumerate(cells) if c.cell_type == "code" and any(f in c.source for f in FIGURE_CALLS)]
    assert figures, f"{path.name} draws no figure"
    for i in figures:
        after = cells[i + 1] if i + 1 < len(cells) else None
        assert after is not None and after.cell_type == "markdown" and after.source.startswith("**Reading.**"), (
            f"{path.name}: the figure of cell {i + 1} ({cells[i].source.splitlines()[0]!r}) has no reading after it")
        assert len(after.source.split()) >= 30, f"{path.name}: the reading after cell {i + 1} is too short to teach"


def _notebook(stem: str):
    return nbformat.read(next(p for p in NOTEBOOKS if p.stem == stem), as_version=4)


def test_data_tour_explains_the_benchmark_and_its_patient_level_splits():
    text = "\n".join(c.source for c in _notebook("00_data_tour").cells if c.cell_type == "markdown")
    for needed in ("## The benchmark and its splits", "split by patient", "**In-domain test**", "**Held-out camera**",
                   "synth-odir", "synth-fives", "synth-aptos"):
        assert needed in text, needed


def test_results_table_explains_the_cells_the_cis_and_the_pairs():
    text = "\n".join(c.source for c in _notebook("07_results_table").cells if c.cell_type == "markdown")
    for needed in ("## How to read Table 1", "confidence interval", "**Pairs of rows**", "do not overlap", "**Bold**"):
        assert needed in text, needed
