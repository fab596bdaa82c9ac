"""Rules, heads and losses from outside the package: plugin files, modules, entry points.

A plugin is ordinary Python that registers rules, heads or losses with the
decorators the built-in ones use (:func:`~locallearn.register_rule`,
:func:`~locallearn.register_head`, :func:`~locallearn.register_loss`). It is
loaded by path (``--plugin my_rules.py``), by module name (``--plugin
mypkg.rules``), or through the ``locallearn.rules`` entry-point group of an
installed package. Every failure is one line: the plugin's own error is
summarised, not dumped.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import ConfigError, LocallearnError
from .heads import HEADS
from .losses import LOSSES
from .rules.base import RULES

REGISTRIES = (RULES, HEADS, LOSSES)

ENTRY_POINT_GROUP = "locallearn.rules"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_file(path: Path) -> None:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"locallearn_plugin_{path.stem}_{digest}"
    if name in sys.modules:  # the same file twice: already registered
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_plugin(spec: str) -> None:
    """Import the plugin ``spec`` (a ``.py`` path or a module name); loading it again is
    harmless. A plugin that registers nothing is not refused: its rule is an unknown name.

    Raises:
        ConfigError: a missing file or module, an error while importing, or a name clash
            with a registered rule, head or loss.
    """
    try:
        if _is_path(spec):
            if not Path(spec).is_file():
                raise ConfigError(f"plugin file {spec!r} not found")
            _import_file(Path(spec))
        elif importlib.util.find_spec(spec.split(".")[0]) is None:
            raise ConfigError(f"plugin module {spec!r} not found; give a .py path or an "
                              "importable module name")
        else:
            importlib.import_module(spec)
    except LocallearnError as err:
        if str(err).startswith(f"plugin {spec!r}"):
            raise
        raise ConfigError(f"plugin {spec!r}: {err}") from None
    except (Exception, SystemExit) as err:
        raise ConfigError(f"plugin {spec!r} failed to import: {_one_line(err)}") from None


def load_plugins(specs: list[str]) -> None:
    """Load the installed entry points (the ``locallearn.rules`` group), then every plugin in
    ``specs``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except LocallearnError as err:
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}): {err}") from None
        except Exception as err:
            raise ConfigError(
                f"entry point {ep.name!r} ({ep.value}) failed to import: {_one_line(err)}"
            ) from None
    for spec in dict.fromkeys(specs):
        load_plugin(spec)
