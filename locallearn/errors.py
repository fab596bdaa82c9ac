"""User-facing errors.

Every error a user can cause by bad input (a wrong name, a bad option, missing
data, a model that cannot be split) is a :class:`LocallearnError` whose message
is one line naming the problem and the valid choices. The command line prints
that line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LocallearnError(Exception):
    """Base class of errors caused by the user's input, with a one-line message."""


class ConfigError(LocallearnError, ValueError):
    """An unknown or ill-typed option, or an unknown name."""


class DataError(LocallearnError):
    """A data set that cannot be found, read or downloaded."""


class SplitError(LocallearnError):
    """A model that cannot be split into a block stack correctly."""


def unknown_name(kind: str, name: str, choices: Iterable[str], owner: str = "") -> ConfigError:
    """The error for an unknown ``name`` of ``kind`` (of ``owner``), naming close matches,
    else the choices (or a dozen of them)."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    if close:
        hint = "did you mean " + ", ".join(close) + "?"
    elif len(choices) <= 12:
        hint = "choices: " + ", ".join(choices)
    else:
        hint = f"{len(choices)} choices, e.g. " + ", ".join(choices[:12])
    where = f" for {owner}" if owner else ""
    return ConfigError(f"unknown {kind} {name!r}{where}; {hint}")


class OutputError(LocallearnError):
    """A path a run would write that is not writable, in use, or another run's."""
