"""Names a user types that become file or folder names, and the one syntax for lists of names.

A manifest name, run name, method, preset, outside model or notebook names a folder or a
file, so each must be one path component that no shell or glob reads specially; a derived
path is checked again after links resolve, so it never leaves its folder. This sits at the
ground of the package (it imports only :mod:`fundus_lab.schema`), so the config loader and
every command share the rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fundus_lab.schema import ConfigError

# names that become file or folder names (manifest name, run name, method, preset, outside
# model, notebook): one path component, nothing a shell or glob reads specially
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: Any, what: str) -> str:
    """``name`` if it is safe as one file or folder name (:data:`SAFE_NAME`, not ``.``/``..``);
    a :class:`ConfigError` naming ``what`` otherwise (``"../x"`` would write outside its folder)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{what} {name!r} is not a usable name: use letters, digits, '.', '_' and '-' "
                          "(it names a file or folder; '.' and '..' are not names)")
    return name


def path_inside(folder: str | Path, name: str, what: str) -> Path:
    """``folder / name`` for a name checked by :func:`check_name`, and checked again after
    resolving links to lie directly inside ``folder``: a derived path never leaves its folder."""
    folder = Path(folder)
    path = folder / check_name(name, what)
    if path.resolve().parent != folder.resolve():
        raise ConfigError(f"{what} {name!r}: {path} resolves to {path.resolve()}, outside {folder}")
    return path


def split_names(values: str | list[str] | tuple | None) -> list[str]:
    """``--methods clip,coca ours`` -> ["clip", "coca", "ours"]: the one syntax every command
    takes for lists of names (comma-separated, several arguments, or both)."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]
