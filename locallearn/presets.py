"""Presets: named grids of ``run.py`` runs, one small JSON file each in ``benchmarks/presets/``.

A preset gives the flags every run shares, a per-rule table of flags (a rule
that needs its own backbone, such as ``forward_forward``), the runs (a rule
and its own flags; rule ``"*"`` is every registered rule) and the seeds::

    {
      "about": "one line: what the preset is for (docs/presets.md says why)",
      "args": {"model": "resnet18", "epochs": 5, "rule-opt": {"aux_hidden": 0}},
      "rule_args": {"forward_forward": {"model": "ff_mlp", "optimizer": "adamw"}},
      "runs": [{"rule": "*"}, {"rule": "layerwise", "tag": "K4", "args": {"blocks": 4}}],
      "seeds": [0, 1]
    }

Keys of ``args`` are ``run.py``'s long flags without the dashes. A value is a
number or string, ``true`` for a switch (``"no-plane": true``), a list for a
comma-separated value (``"milestones": [0.5, 0.75]``) or a repeatable flag
(``"plugin"``), and an object for ``rule-opt`` / ``model-opt``. The flags a
run gets are, later ones winning: ``args``, ``rule_args[rule]``, the run's
``args``. ``run.py --preset NAME --rule R`` takes the first two as defaults
that the flags given on its command line override, and that override the
rule's own ``training_defaults``.

JSON, not TOML: ``tomllib`` needs Python 3.11 and the project supports 3.10
without a TOML dependency; JSON is in every Python, and is strict. ``about``
is one line, which ``suite.py --dry-run`` prints; the prose on why a preset
sets what it does lives in docs/presets.md, a section per preset.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, unknown_name
from .flags import BY_NAME, build_parser

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
    """One entry of a preset's grid (before seeds).

    Attributes:
        rule: the rule's registered name.
        tag: what tells this run apart from other runs of the rule ("" if none).
        args: the run's own flags (on top of the preset's ``args`` and ``rule_args``).
    """

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
        seen: dict[str, PresetRun] = {}
        for run in runs:
            if run.run_id in seen:
                raise ConfigError(f"preset {self.name!r}: two runs named {run.run_id!r}; give one "
                                  "of them a 'tag'")
            seen[run.run_id] = run
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


def find_preset(ref: str) -> Path:
    """The file of preset ``ref``: a name in :func:`preset_dir`, or a path to a ``.json`` file."""
    if ref.endswith(".json") or os.sep in ref:
        path = Path(ref)
        if not path.is_file():
            raise ConfigError(f"preset file {ref!r} not found")
        return path
    path = preset_dir() / f"{ref}.json"
    if not path.is_file():
        raise unknown_name("preset", ref, list_presets())
    return path


def load_preset(ref: str) -> Preset:
    """Load and validate preset ``ref`` (a name or a path to a ``.json`` file).

    Raises:
        ConfigError: unknown preset (the choices named), malformed JSON, an unknown
            key, or a flag ``run.py`` does not take or would reject.
    """
    path = find_preset(ref)
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
    _check_parses(preset)
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


def _check_parses(preset: Preset) -> None:
    """Every run's flags must parse as run.py's (types, choices); names are checked at run time."""
    every = sorted(set(preset.rule_args) | {ALL_RULES})  # "*" alone: no rule_args
    for entry in preset.entries:
        for rule in every if entry.rule == ALL_RULES else [entry.rule]:
            argv = preset.flags_for(rule) + ["--rule", rule, *to_flags(entry.args)]
            try:
                build_parser().parse_args(argv)
            except ConfigError as err:
                raise ConfigError(f"preset {preset.name!r}, run {entry.run_id!r}: {err}") from None
