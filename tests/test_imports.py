"""Imports run downhill (DESIGN principle 12): no circle, and no module imports a higher floor.

Every module of the package is parsed with ``ast``; an import anywhere in it
counts (module level or inside a function), except under ``if TYPE_CHECKING:``.
A module may import modules on floors strictly below its own, and modules of
its own package on its own floor (rules' files import each other; a package's
``__init__`` imports its files). Every module must be on a floor, so a new
module forces a decision; names of modules still being written are skipped.
"""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGE = "locallearn"
# Lowest first. "x.*" is every module of package x.
FLOORS: list[tuple[str, ...]] = [
    # maths and basics
    ("errors",),
    ("version", "registry", "config", "measure", "hsic", "optim", "recompute", "step", "views",
     "observers"),
    ("losses", "heads", "models", "models.*", "data", "transport"),
    ("adapters", "objectives", "settings"),  # adapters lay out the models' families for blocks;
    # settings: every flag, the loop's settings among them (its --dataset help names data's)
    ("blocks",),
    # rules
    ("rules", "rules.*"),
    # the loop and its observers
    ("trainer", "analysis", "analysis.plane", "analysis.gradients",
     "analysis.probe"),
    ("pipeline",),  # the pipelined executor plugs into the loop (trainer.Trainer)
    # records and the command line
    ("records", "bench", "plugins", "trackers", "preflight"),  # preflight probes parts
    ("checkpoint", "presets", "analysis.plots", "analysis.probe_report"),  # checkpoint writes
    # with records.write_json; the figures read records
    ("outputs",),  # a run's record and checkpoints, checked and taken
    ("cli",),
    ("leaderboard",),  # draws with analysis.plots; parses a record's command as cli does
    ("",),  # the package itself
]


def module_files() -> dict[str, tuple[str, bool]]:
    """Every module of the package: dotted name (without the package) -> (file, is a package)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT / PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (str(path), is_package)
    return out


def floor_of(name: str) -> int | None:
    for floor, names in enumerate(FLOORS):
        for entry in names:
            if name == entry or (entry.endswith(".*") and name.startswith(entry[:-1])):
                return floor
    return None


def package_of(name: str, is_package: bool) -> str:
    return name if is_package else name.rpartition(".")[0]


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that the module ``name`` imports ("" is the package itself)."""
    found: set[str] = set()

    def target(base: str, item: str | None) -> str:
        # ``from base import item``: the submodule if item is one, else base itself.
        sub = f"{base}.{item}" if base else item
        return sub if sub in modules else base

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(name, is_package)
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base_name = ".".join(parts + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                base_name = node.module[len(PACKAGE) + 1:]
            else:
                base_name = None
            if base_name is not None:
                for alias in node.names:
                    found.add(target(base_name, alias.name))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {
        name: imported(open(path).read(), name, is_package, set(files))
        for name, (path, is_package) in files.items()
    }


def label(name: str) -> str:
    return f"{PACKAGE}.{name}" if name else PACKAGE


def test_every_module_is_on_a_floor():
    missing = sorted(label(n) for n in module_files() if floor_of(n) is None)
    assert not missing, f"put these modules on a floor in tests/test_imports.py: {missing}"


def test_imports_run_downhill():
    files = module_files()
    bad = []
    for name, targets in import_graph().items():
        own = package_of(name, files[name][1])
        for other in sorted(targets):
            mine, theirs = floor_of(name), floor_of(other)
            if mine is None or theirs is None or theirs < mine:
                continue
            if theirs == mine and own and (other == own or other.startswith(own + ".")):
                continue  # a module of its own package, on its own floor
            bad.append(f"{label(name)} (floor {mine}) imports {label(other)} (floor {theirs})")
    assert not bad, "upward or sideways imports: " + "; ".join(bad)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := walk(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := walk(start)):
            pytest.fail("import circle: " + " -> ".join(label(n) for n in circle))


def test_the_checker_sees_function_imports_and_skips_type_checking_ones():
    source = """
from typing import TYPE_CHECKING
from ..errors import ConfigError
if TYPE_CHECKING:
    from ..trainer import Trainer
else:
    from .. import data

def f():
    from ..rules.base import RULES
    from . import plane
    import locallearn.cli
    from .. import version, split
"""
    modules = {"errors", "trainer", "data", "rules", "rules.base", "cli", "version", "analysis",
               "analysis.plane", "analysis.x"}
    assert imported(source, "analysis.x", False, modules) == {
        "errors", "data", "rules.base", "analysis.plane", "cli", "version", ""}
    # In a package's __init__, "." is the package; a name that is no module is the package.
    assert imported("from . import plane, y\n", "analysis", True, modules) == {"analysis.plane"}
