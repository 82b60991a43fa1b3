"""The committed notebooks' contract (fast, no kernel): executing them is `make test-notebooks`.

Each numbered notebook: valid nbformat, stored without outputs, first code cell tagged
``parameters`` holding only plain assignments (``preset``, ``run_dir``, ``data_root``,
``methods`` at least) that papermill can override, and one ``fl.Run(..., notebook=NAME)``
call naming the notebook itself (so its figures land in ``figures/<notebook>/``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "00_data_tour", "01_pretrain", "02_attention_and_reconstruction", "03_embedding_umap", "04_zero_shot",
    "05_few_shot", "06_fine_tune", "07_results_table", "08_prompt_playground",
]


def test_every_designed_notebook_exists():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_contract(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{path.name} is stored with outputs"
    params = code[0]
    assert "parameters" in params.metadata.get("tags", []), f"{path.name}: first code cell is not tagged 'parameters'"
    assigned = {}
    for node in ast.parse(params.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{path.name}: the parameters cell must hold plain assignments only, got {ast.unparse(node)!r}")
        assigned[node.targets[0].id] = ast.literal_eval(node.value)  # literals only: papermill overrides them
    assert {"preset", "run_dir", "data_root", "methods", "train_if_missing"} <= set(assigned), path.name
    # opened in JupyterLab: the latest reproduce run, its own preset, and no training by surprise
    assert assigned["preset"] is None and assigned["run_dir"] == "latest" and assigned["train_if_missing"] is False
    rest = "\n".join(c.source for c in code[1:])
    assert "fl.Run(" in rest and f'notebook="{path.stem}"' in rest, f"{path.name}: build the run with fl.Run(..., notebook={path.stem!r})"
    assert "train_if_missing=train_if_missing" in rest, f"{path.name}: pass train_if_missing to fl.Run"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), f"{path.name}: start with a heading"
