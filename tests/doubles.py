"""Small test doubles shared by several test files (import as ``from doubles import ...``)."""

from __future__ import annotations

from pathlib import Path

import nbformat


def write_notebook(path: Path, params: str, *cells: str) -> None:
    """A tiny numbered notebook as ``reproduce`` runs them: a heading, a ``parameters``-tagged
    cell holding ``params``, then one code cell per entry of ``cells``."""
    nb = nbformat.v4.new_notebook()
    first = nbformat.v4.new_code_cell(params)
    first.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), first] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
