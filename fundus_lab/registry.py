"""One idiom for every named, pluggable thing: methods, protocols, reference rows,
objectives, commands, capabilities.

A :class:`Registry` maps names to entries in registration order and answers an unknown
name with one clear error that lists the known names and suggests the close ones, as
``timm.create_model`` and ``open_clip.create_model`` do for model names. It sits at the
ground of the package (it imports nothing of fundus_lab), so any level may hold one.

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("contrastive")
    class Contrastive: ...

    OBJECTIVES.get("contrastive")        # the class
    OBJECTIVES.get("contrastiv")         # UnknownNameError: ... did you mean 'contrastive'?
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has. A ``KeyError`` for lookups and a ``ValueError`` for
    callers that validate input; ``str()`` is the message itself (a plain ``KeyError``
    would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'a', 'b'?"`` for names close to ``name``, ``""`` for none."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, in words, for error messages ("protocol", "method").
        error: the exception class :meth:`get` raises for an unknown name (a subclass of
            :class:`UnknownNameError` or any exception taking one message), so a registry
            can speak its caller's error type (``ConfigError`` for config values).
    """

    def __init__(self, kind: str, error: type[Exception] = UnknownNameError):
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it wraps.

        A name registered twice is an error: two entries under one name would make the
        table's rows depend on import order.
        """
        if entry is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorate
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name raises ``self.error`` listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = self.names()
            raise self.error(f"unknown {self.kind} {name!r}{did_you_mean(str(name), known)}; "
                             f"known: {', '.join(known)}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

