"""A name -> factory registry with metadata, filled by decorators at definition sites.

The command line's choices, the docs table and the tests parametrized over
rules all read one registry, so adding a rule never means editing a list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, unknown_name


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, factory and metadata (paper, needs, ...)."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps names to factories; ``kind`` names what is registered in messages ("rule"),
    ``required`` the metadata keys every entry must give (e.g. "paper")."""

    def __init__(self, kind: str, required: tuple[str, ...] = ()):
        self.kind = kind
        self.required = required
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator registering ``factory`` under ``name`` with metadata ``meta``."""
        missing = [key for key in self.required if not meta.get(key)]
        if missing:
            raise ConfigError(f"{self.kind} {name!r} lacks metadata: {', '.join(missing)}")

        def decorate(factory: Callable) -> Callable:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, factory, dict(meta))
            return factory

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugin reloading)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name is a ConfigError naming close matches."""
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)
