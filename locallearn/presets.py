"""Presets: named grids of ``run.py`` runs, one small JSON file each in ``benchmarks/presets/``.

A preset gives the flags every run shares (``args``), a per-rule table of flags
(``rule_args``), the runs (a rule, a ``tag`` and its own ``args``; rule ``"*"`` is
every registered rule) and the ``seeds``. The file format, and why each preset
sets what it does, are in docs/presets.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, unknown_name
from .settings import BY_NAME, build_parser

__all__ = ["Preset", "PresetRun", "list_presets", "load_preset", "preset_dir"]

ALL_RULES = "*"
_KEYS = {"about", "notes", "args", "rule_args", "runs", "seeds"}
_RUN_KEYS = {"rule", "tag", "args"}
_REPEATABLE = ("list", "options")  # kinds of flag given once per list item
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


def preset_dir() -> Path:
    """Where named presets live: ``$LOCALLEARN_PRESETS``, else the checkout's benchmarks/presets."""
    env = os.environ.get("LOCALLEARN_PRESETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks" / "presets"


def list_presets() -> list[str]:
    """Names of the presets in :func:`preset_dir`, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.json"))


@dataclass(frozen=True)
class PresetRun:
    """One entry of a preset's grid (before seeds): ``tag`` tells it apart from other runs
    of its rule, ``args`` are its own flags (on top of the preset's ``args`` and
    ``rule_args``)."""

    rule: str
    tag: str = ""
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """``rule`` or ``rule-tag``: the first part of the record's file name."""
        return f"{self.rule}-{self.tag}" if self.tag else self.rule


@dataclass(frozen=True)
class Preset:
    """A loaded, validated preset; see the module docstring for the file format."""

    name: str
    path: Path
    about: str
    args: dict[str, Any]
    rule_args: dict[str, dict[str, Any]]
    entries: tuple[PresetRun, ...]
    seeds: tuple[int, ...]

    def flags_for(self, rule: str) -> list[str]:
        """The flags ``run.py --preset`` puts before its own: ``args``, then ``rule_args[rule]``."""
        return to_flags(self.args) + to_flags(self.rule_args.get(rule, {}))

    def runs(self, registered: list[str]) -> tuple[list[PresetRun], list[str]]:
        """The runs, ``"*"`` expanded over ``registered``; and why any were left out.

        A run whose rule is not registered is left out with a message, so a
        preset can name rules that are still being written.
        """
        runs: list[PresetRun] = []
        skipped: list[str] = []
        for entry in self.entries:
            if entry.rule == ALL_RULES:
                runs += [PresetRun(r, entry.tag, entry.args) for r in sorted(registered)]
            elif entry.rule in registered:
                runs.append(entry)
            else:
                skipped.append(f"{entry.run_id}: rule {entry.rule!r} is not registered; skipped")
        ids = [run.run_id for run in runs]
        for run_id in ids:
            if ids.count(run_id) > 1:
                raise ConfigError(f"preset {self.name!r}: two runs named {run_id!r}; give one "
                                  "of them a 'tag'")
        return runs, skipped

    def argv(self, run: PresetRun, ref: str | None = None) -> list[str]:
        """``run.py`` arguments of ``run``: ``--preset``, ``--rule`` and the run's own flags."""
        return ["--preset", ref or self.name, "--rule", run.rule, *to_flags(run.args)]


def to_flags(args: dict[str, Any]) -> list[str]:
    """``{"epochs": 5, "no-plane": True, "rule-opt": {"a": 1}}`` -> ``--epochs 5 ...``."""
    out: list[str] = []
    for key, value in args.items():
        flag = f"--{key}"
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):
            for k, v in value.items():
                out += [flag, f"{k}={_text(v)}"]
        elif isinstance(value, list) and key in BY_NAME and BY_NAME[key].kind in _REPEATABLE:
            for v in value:
                out += [flag, _text(v)]
        else:
            out += [flag, _text(value)]
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def load_preset(ref: str) -> Preset:
    """Load and validate preset ``ref``: a name in :func:`preset_dir`, or a path to a
    ``.json`` file.

    Raises:
        ConfigError: unknown preset (the choices named), malformed JSON, an unknown
            key, or a flag ``run.py`` does not take or would reject.
    """
    if ref.endswith(".json") or os.sep in ref:
        path = Path(ref)
        if not path.is_file():
            raise ConfigError(f"preset file {ref!r} not found")
    else:
        path = preset_dir() / f"{ref}.json"
        if not path.is_file():
            raise unknown_name("preset", ref, list_presets())
    name = path.stem
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"preset {name!r} ({path}): not readable JSON: {err}") from None
    where = f"preset {name!r}"
    if not isinstance(data, dict) or not {"args", "runs", "seeds"} <= data.keys():
        raise ConfigError(f"{where}: needs an object with 'args', 'runs' and 'seeds'")
    _no_unknown(data, _KEYS, where)
    args = _check_args(data["args"], f"{where}, args")
    rule_args = data.get("rule_args", {})
    if not isinstance(rule_args, dict):
        raise ConfigError(f"{where}: 'rule_args' must map rule names to flags")
    rule_args = {r: _check_args(a, f"{where}, rule_args[{r!r}]") for r, a in rule_args.items()}
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in seeds
    ) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of distinct integers")
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise ConfigError(f"{where}: 'runs' must be a non-empty list")
    entries = tuple(_entry(e, i, where) for i, e in enumerate(data["runs"]))
    preset = Preset(name, path, str(data.get("about", "")), args, rule_args, entries, tuple(seeds))
    # Every run's flags must parse as run.py's (types, choices); names are checked at run time.
    every = sorted(set(preset.rule_args) | {ALL_RULES})  # "*" alone: no rule_args
    for entry in preset.entries:
        for rule in every if entry.rule == ALL_RULES else [entry.rule]:
            try:
                build_parser().parse_args(
                    [*preset.flags_for(rule), "--rule", rule, *to_flags(entry.args)])
            except ConfigError as err:
                raise ConfigError(f"preset {name!r}, run {entry.run_id!r}: {err}") from None
    return preset


def _no_unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        allowed_keys = ", ".join(sorted(allowed))
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; allowed: {allowed_keys}")


def _check_args(args: Any, where: str) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: must be an object of run.py flags")
    for key, value in args.items():
        flag = BY_NAME.get(key)
        if flag is None and key != "help":
            raise unknown_name("run.py flag", key, [*BY_NAME, "help"], where)
        if flag is None or not flag.presettable:  # the runs, seeds and grid runner give these
            raise ConfigError(f"{where}: {key!r} cannot be set in a preset")
        switch, options = flag.kind == "switch", flag.kind == "options"
        if switch != isinstance(value, bool) or (options and not isinstance(value, dict)):
            kind = "true or false" if switch else (
                "an object of KEY: VALUE" if options else "a value")
            raise ConfigError(f"{where}: {key!r} must be {kind}; got {value!r}")
    return dict(args)


def _entry(entry: Any, index: int, where: str) -> PresetRun:
    where = f"{where}, runs[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("rule"), str):
        raise ConfigError(f"{where}: needs a 'rule' (a rule name, or \"*\" for every rule)")
    _no_unknown(entry, _RUN_KEYS, where)
    tag = entry.get("tag", "")
    if not isinstance(tag, str) or (tag and not _TAG.match(tag)):
        raise ConfigError(f"{where}: 'tag' must be letters, digits, '_', '.', '-'; got {tag!r}")
    return PresetRun(entry["rule"], tag, _check_args(entry.get("args", {}), where))
