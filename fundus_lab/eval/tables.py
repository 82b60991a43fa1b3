"""Writing the comparison table as CSV (every number), Markdown and LaTeX (for reading).

A row is one method; a cell is ``{"mean", "std", "n"}`` over seeds, optionally with
``"ci": [lo, hi]`` (95 % CI) and ``"seed_std"`` (spread over pretraining seeds), or None
where the protocol does not apply (``mae`` has no text encoder: zero-shot is "n/a", not 0).
CSV keeps the raw values (0-1 scale) and the run folders each row came from; Markdown
and LaTeX show ``mean [lo, hi] ± seed std`` in percent where a CI is given (else
``mean ± std``, std only when more than one seed ran), the best mean of each column in
bold (none where rows tie at the shown precision), and ``notes`` lines under the table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

NA = "n/a"


def summarise(values: Sequence[float]) -> dict:
    """{"mean", "std" (population, as over seeds), "n"} of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {"mean": mean, "std": std, "n": len(vals)}


def format_cell(cell: dict | None, scale: float = 100.0, digits: int = 1, pm: str = "±") -> str:
    """``{"mean": .812, "std": .013, "n": 5}`` -> ``81.2 ± 1.3``; None -> ``n/a``."""
    if cell is None or cell.get("n", 0) == 0 or not math.isfinite(cell["mean"]):
        return NA
    text = f"{cell['mean'] * scale:.{digits}f}"
    ci = cell.get("ci")
    if ci is not None:
        if all(v is not None and math.isfinite(v) for v in ci):
            text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
        if cell.get("seed_std") is not None:
            text += f" {pm} {cell['seed_std'] * scale:.{digits}f}"
    elif cell.get("n", 1) > 1:
        text += f" {pm} {cell['std'] * scale:.{digits}f}"
    return text


def _best(rows: list[dict], key: str, scale: float = 100.0, digits: int = 1) -> float | None:
    """The column's best mean as shown (rounded like :func:`format_cell`), or None where no
    single row holds it: one row, or a tie (every row at 0 bolds nothing)."""
    means = [round(r[key]["mean"] * scale, digits) for r in rows
             if r.get(key) and r[key].get("n", 0) > 0 and math.isfinite(r[key]["mean"])]
    if len(means) < 2 or means.count(max(means)) > 1:
        return None
    return max(means)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def write_table(
    rows: list[dict],
    out_dir: str | Path,
    columns: Sequence[tuple[str, str]],
    name: str = "table1",
    caption: str = "",
    extra: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.tex`` under ``out_dir``.

    Args:
        rows: ``{"method": str, <column key>: cell | None, <extra key>: str, ...}``.
        columns: ``(key, header)`` pairs, in order.
        extra: keys copied verbatim into the CSV only (run folders, seeds).
        notes: lines written under the Markdown and LaTeX tables (chance levels, what rows mean).
    Returns:
        {"csv": path, "md": path, "tex": path}
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if "method" not in row:
            raise ValueError(f"table row {row!r} has no 'method'")

    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "tex": out_dir / f"{name}.tex"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        with_ci = any((row.get(key) or {}).get("ci") is not None for row in rows for key, _ in columns)
        header = ["method"]
        for key, _ in columns:
            header += [f"{key}_mean", f"{key}_std", f"{key}_n"]
            header += [f"{key}_ci_low", f"{key}_ci_high", f"{key}_seed_std"] if with_ci else []
        w.writerow(header + list(extra))

        def num(v):
            return NA if v is None or not math.isfinite(v) else f"{v:.6f}"

        for row in rows:
            line = [row["method"]]
            for key, _ in columns:
                cell = row.get(key)
                line += [NA, NA, 0] if cell is None else [num(cell["mean"]), num(cell["std"]), cell["n"]]
                if with_ci:
                    ci = (cell or {}).get("ci") or [None, None]
                    line += [num(ci[0]), num(ci[1]), num((cell or {}).get("seed_std"))]
            w.writerow(line + [row.get(k, "") for k in extra])

    best = {key: _best(rows, key) for key, _ in columns}

    def is_best(row, key) -> bool:
        cell = row.get(key)
        return bool(best[key] is not None and cell and cell.get("n", 0) and math.isfinite(cell["mean"])
                    and round(cell["mean"] * 100.0, 1) == best[key])

    md = []
    if caption:
        md += [caption, ""]
    md.append("| Method | " + " | ".join(h for _, h in columns) + " |")
    md.append("|---|" + "---:|" * len(columns))
    for row in rows:
        cells = []
        for key, _ in columns:
            text = format_cell(row.get(key))
            cells.append(f"**{text}**" if is_best(row, key) else text)
        md.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    if notes:
        md += [""] + [f"{n}" for n in notes]
    paths["md"].write_text("\n".join(md) + "\n")

    tex = [r"\begin{table}[t]", r"\centering"]
    if caption:
        tex.append(r"\caption{" + _latex_escape(caption) + "}")
    tex += [r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule",
            "Method & " + " & ".join(_latex_escape(h) for _, h in columns) + r" \\", r"\midrule"]
    for row in rows:
        cells = []
        for key, _ in columns:
            text = format_cell(row.get(key), pm=r"$\pm$")
            cells.append(r"\textbf{" + text + "}" if is_best(row, key) else text)
        tex.append(_latex_escape(str(row["method"])) + " & " + " & ".join(cells) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}"]
    tex += [r"\par\footnotesize " + _latex_escape(n) for n in notes]
    tex += [r"\end{table}"]
    paths["tex"].write_text("\n".join(tex) + "\n")
    return paths


def long_format(csv_path: str | Path, headers: dict[str, str] | None = None):
    """A table written by :func:`write_table` as a long DataFrame for plotting:
    one row per (method, column) with ``mean``, ``std``, ``ci_low``, ``ci_high`` (NaN for n/a)."""
    import pandas as pd

    wide = pd.read_csv(csv_path, na_values=[NA])
    keys = [c[: -len("_mean")] for c in wide.columns if c.endswith("_mean")]
    rows = []
    for _, r in wide.iterrows():
        for key in keys:
            rows.append({"method": r["method"], "column": (headers or {}).get(key, key), "mean": r[f"{key}_mean"],
                         "std": r[f"{key}_std"], "ci_low": r.get(f"{key}_ci_low", float("nan")),
                         "ci_high": r.get(f"{key}_ci_high", float("nan"))})
    return pd.DataFrame(rows)


__all__ = ["NA", "format_cell", "long_format", "summarise", "write_table"]
