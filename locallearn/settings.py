"""Settings declared once: dataclass fields that are also flags of ``run.py``.

A field with flag metadata (:func:`_flag`) is one setting *and* one flag: its
type gives the flag's kind (``bool``: a switch; ``Literal[...]``: its choices),
its metadata the help, the value parser and the flag's role. The loop's
settings are :class:`TrainConfig` (:data:`TRAIN_FLAGS`), the information
plane's :class:`PlaneSettings` (:data:`PLANE_FLAGS`); :mod:`locallearn.flags`
puts them beside the other flags, the command line fills both from the parsed
flags without naming them (:meth:`Flagged.from_flags`), and the checkpoint
identity and the record hold the resolved TrainConfig as a dict. So adding a
setting is adding one field.

This module sits low (it imports only :mod:`locallearn.errors`), so the
trainer takes its config from here and a rule's declared training defaults
are checked against :data:`TRAIN_FLAGS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

# A flag's role says what it is:
# - IDENTITY: what is trained (model, rule, data, split, the loop's settings).
# - SETTING: how it is trained or looked at (precision, speed, the information plane).
#   Both change results, so a checkpoint resumes only when every identity and setting
#   flag is the same (flags.run_identity).
# - OUTPUT: where things are read from or written to, and what is shown.
# - COMMAND: what run.py does rather than what it trains.
IDENTITY, SETTING, OUTPUT, COMMAND = "identity", "setting", "output", "command"
# Where a loop setting sits in the checkpoint identity: the resolved TrainConfig, under this key.
TRAIN = "train"


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise ConfigError so they print as one line."""

    def error(self, message: str):
        raise ConfigError(message)


def _parsed(text: str, kind: Callable[[str], Any], noun: str,
            ok: Callable[[Any], bool] = lambda value: True, bad: str | None = None) -> Any:
    """``kind(text)``, or the argparse error "must be NOUN" (or "must be BAD" where the
    value is not ``ok``)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {noun}; got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bad or noun}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer above zero."""
    return _parsed(text, int, "a positive integer", lambda v: v > 0)


def number(text: str) -> float:
    """argparse type: a finite float."""
    return _parsed(text, float, "a number", math.isfinite, "finite")


def bounded(low: float, high: float | None = None, *, low_open: bool = False
            ) -> Callable[[str], float]:
    """argparse type: a finite float from ``low`` (left out if ``low_open``) to below ``high``
    (None: no bound)."""
    span = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"

    def inside(v: float) -> bool:
        return (v > low if low_open else v >= low) and (high is None or v < high)

    return lambda text: _parsed(text, number, "a number", inside, f"in {span}")


def seed_value(text: str) -> int:
    """argparse type: an integer seed in [0, 2**32), what NumPy's seeding takes."""
    return _parsed(text, int, "an integer", lambda v: 0 <= v < 2**32, "in [0, 2**32)")


def fractions(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated fractions in (0, 1)."""
    return _parsed(text, lambda t: tuple(float(v) for v in t.split(",") if v.strip()),
                   "comma-separated numbers", lambda vs: all(0 < v < 1 for v in vs),
                   "fractions of the epochs in (0, 1)")


@dataclass(frozen=True)
class Flag:
    """One flag of ``run.py``: ``name`` is the long flag without its dashes, ``type``
    argparse's, ``help`` a text or a function giving it when the parser is built.

    Attributes:
        kind: ``"value"``; ``"switch"`` (no value, true when given); ``"list"``
            (repeatable, collected in a list); ``"options"`` (repeatable ``KEY=VALUE``).
        identity_key: its key in the checkpoint identity (default: its dest); ``"train"``
            for a loop setting, held there by the resolved TrainConfig.
        recorded: whether its value goes into the run record's ``config`` as given
            (options are recorded resolved, by the rule and the model).
        row: whether runs that differ in it are different rows of a leaderboard table
            (default: identity and setting flags); the table, the seed (averaged over)
            and what changes no trained number are not.
        presettable: whether a preset may set it.
    """

    name: str
    role: str
    help: str | Callable[[], str] | None = None
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    kind: str = "value"
    identity_key: str | None = None
    recorded: bool = True
    row: bool | None = None
    presettable: bool = True

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace (and the key of the record's config)."""
        return self.name.replace("-", "_")

    @property
    def in_row(self) -> bool:
        """Whether runs that differ in it are different rows of a leaderboard table."""
        return self.role in (IDENTITY, SETTING) if self.row is None else self.row

    def add_to(self, parser: argparse.ArgumentParser, defaults: bool = True) -> None:
        """Add this flag to ``parser`` (without a default, if not ``defaults``)."""
        text = self.help() if callable(self.help) else self.help
        if self.kind == "value" and self.default is not None and "default" not in (text or ""):
            shown = self.default
            if isinstance(shown, (list, tuple)):
                shown = ",".join(map(str, shown))
            text = f"{text} (default: {shown})"
        kw: dict[str, Any] = {"help": text}
        if self.kind == "switch":
            kw["action"] = "store_true"
        elif self.kind in ("list", "options"):
            kw.update(action="append", default=list(self.default or ()), metavar=self.metavar)
        else:
            kw.update(default=self.default, type=self.type, metavar=self.metavar)
            if self.choices is not None:
                kw["choices"] = list(self.choices)
        if not defaults:  # a flag not given stays out of the namespace
            kw["default"] = argparse.SUPPRESS
        parser.add_argument(f"--{self.name}", **kw)


def _flag(role: str, default: Any, help: str, parse: Callable[[str], Any] | None = None,
          **kw: Any) -> Any:
    """A dataclass field that is also a flag of ``run.py`` (see :class:`Flagged`).

    ``kw`` are :class:`Flag` attributes, plus ``name`` (the flag's name where it is not
    the field's) and ``run_default`` (the flag's default where it differs from the
    field's: a Python caller's quick default against a real run's).
    """
    return field(default=default, metadata={"flag": dict(role=role, help=help, type=parse, **kw)})


_identity = functools.partial(_flag, IDENTITY)  # what is trained
_setting = functools.partial(_flag, SETTING)  # how it is trained or looked at


class Flagged:
    """A dataclass whose fields with flag metadata are flags of ``run.py``: a ``bool``
    field is a switch, a ``Literal`` field's values are its choices."""

    @classmethod
    def flags(cls, identity_key: str | None = None) -> tuple[Flag, ...]:
        """The fields' flags, in field order (``identity_key``: see :attr:`Flag.identity_key`)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata:
                meta, hint = dict(f.metadata["flag"]), hints[f.name]
                literal = typing.get_origin(hint) is Literal
                out.append(Flag(meta.pop("name", f.name.replace("_", "-")),
                                default=meta.pop("run_default", f.default),
                                choices=typing.get_args(hint) if literal else None,
                                kind="switch" if hint is bool else "value",
                                identity_key=identity_key, **meta))
        return tuple(out)

    @classmethod
    def from_flags(cls, args: argparse.Namespace, **rest: Any):
        """``cls`` from ``run.py``'s parsed flags, each flag field from its flag."""
        names = [f.name for f in dataclasses.fields(cls) if "flag" in f.metadata]
        return cls(**{name: getattr(args, flag.dest)
                      for name, flag in zip(names, cls.flags(), strict=True)}, **rest)


@dataclass
class TrainConfig(Flagged):
    """Options of the loop shared by every rule; each field with a help text is a flag of
    ``run.py`` (``--batch-size`` for ``batch_size``), the rest are Python's only.

    Attributes:
        progress: progress bars and per-epoch lines (``--no-progress``).
        log_every: steps between progress updates and divergence checks (each costs a
            device sync).
        compile_backend: the backend of ``torch.compile`` where ``compile`` is not "no".
    """

    epochs: int = _identity(1, "training epochs", positive_int, row=False, run_default=10)
    batch_size: int = _identity(128, "training batch size (per process)", positive_int)
    eval_batch_size: int | None = _identity(
        None, "evaluation batch size (default: twice --batch-size)", positive_int, row=False)
    lr: float = _identity(0.1, "peak learning rate", bounded(0, low_open=True))
    optimizer: Literal["sgd", "adamw"] = _identity(
        "sgd", "sgd (with --momentum, --nesterov) or adamw")
    momentum: float = _identity(0.9, "SGD momentum", bounded(0, 1))
    nesterov: bool = _identity(False, "Nesterov momentum (SGD)")
    weight_decay: float = _identity(5e-4, "weight decay (decoupled under adamw)", bounded(0))
    schedule: Literal["cosine", "multistep", "constant"] = _identity(
        "cosine", "learning-rate schedule (cosine per batch, multistep per epoch)")
    milestones: tuple[float, ...] = _identity(
        (0.5, 0.75), "multistep: fractions of the epochs, e.g. 0.5,0.75", fractions)
    gamma: float = _identity(0.1, "multistep decay factor", bounded(0, low_open=True))
    max_loss: float = _identity(
        0.0, "stop as diverged when a part's mean loss exceeds X (0: off)", bounded(0),
        metavar="X")
    seed: int = _identity(0, "seeds the weights, the subsets and the batches", seed_value,
                          row=False, presettable=False)  # a preset's seeds give it
    channels_last: bool = _setting(False, "channels-last memory format for 4-D weights and "
                                   "inputs (faster convolutions on recent GPUs)")
    compile: Literal["no", "default", "reduce-overhead", "max-autotune"] = _setting(
        "no", "torch.compile each trained part with its objective, in this inductor mode "
        "(no: eager)")
    recompute_blocks: bool = _setting(False, "keep only each block's input for backward and "
                                      "run the block again there: less activation memory for "
                                      "one more forward of each part")
    optimizer_impl: Literal["auto", "foreach", "fused", "loop"] = _setting(
        "auto", "the optimizer's kernels: auto (torch's choice, foreach on GPUs), foreach, "
        "fused (one kernel per step) or loop (one parameter at a time)")
    progress: bool = True
    log_every: int = 10
    compile_backend: str = "inductor"

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> TrainConfig:
        return super().from_flags(args, progress=not args.no_progress)


#: The loop's flags, in TrainConfig's field order.
TRAIN_FLAGS: tuple[Flag, ...] = TrainConfig.flags(identity_key=TRAIN)


@dataclass
class PlaneSettings(Flagged):
    """The keywords of :class:`~locallearn.analysis.InformationPlane` that are flags of
    ``run.py`` (``--no-plane`` is one of :mod:`locallearn.flags`)."""

    every: int = _setting(1, "information plane: before training, every N epochs and after "
                          "the last", positive_int, name="plane-every", metavar="N", row=False)
    probe_size: int = _setting(1000, "samples in the information-plane probe set", positive_int,
                               metavar="M", row=False)
    split: Literal["train", "test"] = _setting(
        "train", "where the probe set comes from (un-augmented)", name="probe-split", row=False)
    distance: Literal["sqeuclidean", "euclidean"] = _setting(
        "sqeuclidean", "information plane: the Gaussian kernel of the squared distance "
        "(sqeuclidean, as the HSIC-bottleneck code) or of the distance (euclidean, as the seed "
        "paper's code)", name="plane-distance", row=False)


#: The information plane's flags, in PlaneSettings' field order.
PLANE_FLAGS: tuple[Flag, ...] = PlaneSettings.flags()
