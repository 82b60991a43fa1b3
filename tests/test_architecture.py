"""Issue 18's done-means, measured from the code's own imports (tests/import_graph.py reads
the source with ast; nothing is imported), so a change that brings back a cycle, an upward
import, a pile of deferred imports or a module too long to read fails here."""

import json
from pathlib import Path

import import_graph as G

NOTEBOOKS = Path(__file__).resolve().parents[1] / "fundus_lab" / "notebooks"


def test_no_import_cycle_and_no_upward_import():
    g = G.graph()
    assert G.cycles(g["nodes"], g["edges"]) == []
    level = G.levels(g["nodes"], g["edges"])
    assert len(G.upward_edges(g["edges"], level)) <= 1


def test_the_ground_imports_nothing_above_it_and_the_experiment_layer_sits_on_top():
    g = G.graph()
    level = G.levels(g["nodes"], g["edges"])
    for ground in ("registry", "schema", "names", "losses", "knowledge", "checkpoint"):
        assert level[ground] <= 1, (ground, level[ground])
    for lower in ("config", "data", "models", "train", "eval"):
        assert level[lower] < level["experiment"], lower
    assert not [b for (a, b) in g["edges"] if a == "eval" and b in ("experiment", "reproduce", "train")]


def test_few_package_imports_are_deferred_into_functions():
    assert G.graph()["in_function_imports"] <= 30


def test_no_module_over_600_lines():
    assert {path: n for path, n in G.graph()["lines"].items() if n > 600} == {}


def test_every_notebook_builds_its_run_in_one_hop():
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "fl.Run(" in code, path.name


def test_the_graph_reader_sees_cycles_levels_and_deferred_imports(tmp_path, monkeypatch):
    """The measure itself on a made-up package: a -> b at module level, b -> a inside a function."""
    pkg = tmp_path / "fundus_lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fundus_lab import b\n")
    (pkg / "b.py").write_text("def f():\n    from fundus_lab.a import x\n")
    (pkg / "c.py").write_text("from fundus_lab.sub.d import y\nfrom fundus_lab import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from . import e\nfrom ..b import z\n")
    monkeypatch.setattr(G, "ROOT", pkg)
    g = G.graph()
    assert g["edges"] == {("a", "b"): 1, ("b", "a"): 1, ("c", "sub"): 1, ("c", "b"): 1, ("sub", "b"): 1}
    assert g["in_function_imports"] == 1
    assert G.cycles(g["nodes"], g["edges"]) == [["a", "b"]]
    level = G.levels(g["nodes"], g["edges"])
    assert level["a"] == level["b"] == 0 and level["sub"] == 1 and level["c"] == 2
    assert G.upward_edges(g["edges"], level) == [("a", "b"), ("b", "a")]
