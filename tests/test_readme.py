"""The README's Python example runs as written when pasted into a script (issue 11).

Each Python block of the README (```python fences, or an indented block that imports
fundus_lab) is written to a file in a fresh folder and run as ``python example.py``: no
``__main__`` guard, relative paths from that folder, exactly what a reader does. Only
its sizes are shrunk to the smoke preset (preset name, image counts, steps), so it
checks that the example's calls fit together, not how well a model learns.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the example's sizes -> smoke sizes; each pattern must match at least one block
SMOKE = [
    (r'preset="(default|paper)"', 'preset="smoke"'),
    (r"n_pretrain=\d+", "n_pretrain=32"),
    (r"n_eval=\d+", "n_eval=48"),
    (r"train\.steps=\d+", "train.steps=2"),
]


def python_blocks(markdown: str) -> list[str]:
    """```python fenced blocks, and indented blocks (4 spaces) that import fundus_lab."""
    blocks = [m.group(1) for m in re.finditer(r"```python\n(.*?)```", markdown, flags=re.S)]
    current: list[str] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
            continue
        text = "\n".join(current).strip("\n")
        if re.search(r"^(import fundus_lab|from fundus_lab)", text, flags=re.M):
            blocks.append(text + "\n")
        current = []
    return blocks


def test_python_blocks_finds_fenced_and_indented_examples():
    md = "text\n\n    import fundus_lab as fl\n    fl.x()\n\nprose\n\n    fundus-lab synth\n\n```python\nimport os\n```\n"
    assert python_blocks(md) == ["import os\n", "import fundus_lab as fl\nfl.x()\n"]


@pytest.mark.slow
def test_readme_python_example_runs_as_a_script(tmp_path):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no Python example (a ```python block or an indented block importing fundus_lab)"
    script = "\n".join(blocks)
    for pattern, smoke in SMOKE:
        script, hits = re.subn(pattern, smoke, script)
        assert hits, f"README example no longer has {pattern!r}; update SMOKE in {Path(__file__).name}"
    (tmp_path / "example.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # a hang (workers re-running the unguarded script) shows as a timeout, not a stuck test run
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"README example failed:\n{script}\n--- stderr ---\n{run.stderr[-4000:]}"
    assert "bootstrapping phase" not in run.stderr
