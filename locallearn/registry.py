"""A name -> factory registry with metadata, filled by decorators at definition sites.

The command line's choices, the docs table and the tests parametrized over
rules all read one registry, so adding a rule never means editing a list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
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
    """Maps names to factories; ``kind`` names what is registered in messages ("rule").

    ``required``: the metadata keys every entry must give (e.g. "paper"); ``defaults``,
    if given: the other keys an entry may give (besides ``summary`` and ``paper``) and
    their values where it does not; ``choices``: the values a key may take.
    """

    def __init__(self, kind: str, required: tuple[str, ...] = (),
                 defaults: Mapping[str, Any] | None = None,
                 choices: Mapping[str, tuple] | None = None):
        self.kind = kind
        self.required = required
        self.defaults = defaults
        self.choices = choices or {}
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator registering ``factory`` under ``name`` with metadata ``meta``."""
        missing = [key for key in self.required if not meta.get(key)]
        if missing:
            raise ConfigError(f"{self.kind} {name!r} lacks metadata: {', '.join(missing)}")
        if self.defaults is not None:
            known = sorted({*self.defaults, *self.required, "summary", "paper"})
            unknown = sorted(set(meta) - set(known))
            if unknown:
                raise ConfigError(f"{self.kind} {name!r}: unknown metadata {unknown[0]!r}; "
                                  f"known: {', '.join(known)}")
            meta = {**self.defaults, **meta}
        for key, allowed in self.choices.items():
            if meta[key] not in allowed:
                raise ConfigError(f"{self.kind} {name!r}: {key} must be one of "
                                  f"{', '.join(allowed)}; got {meta[key]!r}")

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

    def options(self, name: str) -> tuple[str, ...]:
        """The options the factory of ``name`` takes: its parameters but a head's shape, out
        and later (what the rule, not the user, gives it)."""
        params = inspect.signature(self.get(name).factory).parameters
        return tuple(p for p in params if p not in ("shape", "out", "later"))

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """The factory of ``name`` called with ``args`` and the ``options`` it takes."""
        takes = self.options(name)
        return self.get(name).factory(*args, **{k: v for k, v in options.items() if k in takes})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)
