"""The package's own import graph, read from the source with ``ast`` (nothing is imported).

Used by ``tests/test_architecture.py`` and runnable for a report:

    python tests/import_graph.py

A node is a top-level module or a subpackage of ``fundus_lab`` (``fundus_lab.eval`` is one
node, its modules inside it). An edge A -> B is an import of B anywhere in A (module level
or inside a function). Levels: a node's level is one above the highest level it imports
at module level; a cycle is a strongly connected component of more than one node over all
edges; levels condense each cycle into one level, so an upward edge (to a node at the same
or a higher level) is an edge inside a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "fundus_lab"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def node_of(module: str) -> str | None:
    """``fundus_lab.eval.compare`` -> ``eval``; ``fundus_lab`` itself -> None."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == PACKAGE:
                    if target == PACKAGE:  # from fundus_lab import eval, train: each name is a module or a re-export
                        found.extend((f"{PACKAGE}.{a.name}", in_function) for a in child.names)
                    else:
                        found.append((target, in_function))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # imports for annotations only: no runtime edge
            visit(child, inner)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict:
    files = sorted(ROOT.rglob("*.py"))
    nodes: set[str] = set()
    edges: dict[tuple[str, str], int] = {}
    module_level: set[tuple[str, str]] = set()
    in_function = 0
    lines: dict[str, int] = {}
    for path in files:
        here = module_name(path)
        src = node_of(here)
        lines[str(path.relative_to(ROOT.parent))] = len(path.read_text().splitlines())
        if src is None:
            continue
        nodes.add(src)
        for target, inside in imports_of(path):
            dst = node_of(target)
            if dst is None or dst == src:
                continue
            if not (ROOT / dst).is_dir() and not (ROOT / f"{dst}.py").exists():
                continue  # a name re-exported by the package root, not a module
            nodes.add(dst)
            edges[(src, dst)] = edges.get((src, dst), 0) + 1
            if inside:
                in_function += 1
            else:
                module_level.add((src, dst))
    return {"nodes": sorted(nodes), "edges": edges, "module_level": module_level,
            "in_function_imports": in_function, "lines": lines}


def cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    succ = {n: sorted({b for (a, b) in edges if a == n}) for n in nodes}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for n in nodes:
        if n not in index:
            strong(n)
    return out


def levels(nodes, edges) -> dict[str, int]:
    """Level 0 imports nothing of the package; each node sits one above the highest node it
    imports (module level or inside a function: a deferred import is still a dependency).
    The nodes of a cycle share one level, so each edge inside a cycle points upward."""
    comp_of = {n: n for n in nodes}
    for comp in cycles(nodes, edges):
        for n in comp:
            comp_of[n] = comp[0]
    succ: dict[str, set[str]] = {}
    for (a, b) in edges:
        if comp_of[a] != comp_of[b]:
            succ.setdefault(comp_of[a], set()).add(comp_of[b])
    level: dict[str, int] = {}

    def of(c):
        if c not in level:
            level[c] = 1 + max((of(d) for d in succ.get(c, ())), default=-1)
        return level[c]

    return {n: of(comp_of[n]) for n in nodes}


def upward_edges(edges, level) -> list[tuple[str, str]]:
    return sorted((a, b) for (a, b) in edges if level[b] >= level[a])


def report() -> str:
    g = graph()
    level = levels(g["nodes"], g["edges"])
    out = [f"{len(g['nodes'])} nodes, {len(g['edges'])} edges, "
           f"{g['in_function_imports']} package imports inside functions"]
    for lv in sorted(set(level.values())):
        out.append(f"level {lv}: {', '.join(sorted(n for n in level if level[n] == lv))}")
    out.append(f"cycles: {cycles(g['nodes'], g['edges']) or 'none'}")
    out.append(f"upward edges: {upward_edges(g['edges'], level) or 'none'}")
    out.append("edges: " + ", ".join(f"{a}->{b}" for (a, b) in sorted(g["edges"])))
    big = sorted(((n, p) for p, n in g["lines"].items() if n > 600), reverse=True)
    out.append(f"modules over 600 lines: {', '.join(f'{p} ({n})' for n, p in big) or 'none'}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(report() + "\n")
