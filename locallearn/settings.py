"""The training loop's settings, declared once: :class:`TrainConfig`.

Each field of TrainConfig that carries flag metadata is one setting of the loop
*and* one flag of ``run.py``: its type gives the flag's kind (``bool``: a
switch; ``Literal[...]``: its choices), its metadata the help, the value
parser and the flag's role. :mod:`locallearn.flags` turns the fields into
:class:`Flag`\\ s (:data:`TRAIN_FLAGS`) beside the flags that are not the
loop's, the command line builds a TrainConfig from the parsed flags without
naming them (:meth:`TrainConfig.from_flags`), and the checkpoint identity and
the record hold the resolved TrainConfig as a dict. So adding a loop setting
is adding one field here.

This module sits low (it imports only :mod:`locallearn.errors`), so the
trainer takes its config from here and a rule's declared training defaults
are checked against :data:`TRAIN_FLAGS`.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _parsed(text: str, kind: Callable[[str], Any], noun: str) -> Any:
    """``kind(text)``, or the argparse error "must be NOUN"."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {noun}; got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer above zero."""
    value = _parsed(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def number(text: str) -> float:
    """argparse type: a finite float."""
    value = _parsed(text, float, "a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite; got {text!r}")
    return value


def bounded(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float in the interval from ``low`` to ``high`` (None: no bound)."""
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    span = f"{left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        value = number(text)
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be in {span}; got {text!r}")
        return value

    return parse


def seed_value(text: str) -> int:
    """argparse type: an integer seed in [0, 2**32), what NumPy's seeding takes."""
    value = _parsed(text, int, "an integer")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32); got {text!r}")
    return value


def fractions(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated fractions in (0, 1)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers; got {text!r}") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be fractions of the epochs in (0, 1); got {text!r}")
    return values


@dataclass(frozen=True)
class Flag:
    """One flag of ``run.py``.

    Attributes:
        name: the long flag without its dashes, e.g. ``"train-subset"``.
        role: ``IDENTITY``, ``SETTING``, ``OUTPUT`` or ``COMMAND``.
        help: the help text, or a function giving it when the parser is built.
        default: the value when the flag is not given.
        type: turns the text into the value (argparse ``type``).
        choices: the allowed values.
        metavar: the value's name in the help.
        kind: ``"value"``; ``"switch"`` (no value, true when given); ``"list"``
            (repeatable, collected in a list); ``"options"`` (repeatable ``KEY=VALUE``).
        identity_key: its key in the checkpoint identity (IDENTITY flags; default: its
            dest); ``"train"`` for a loop setting, held there by the resolved TrainConfig.
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
            text = f"{text} (default: {_shown(self.default)})"
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


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _flag(role: str, default: Any, help: str, parse: Callable[[str], Any] | None = None,
          **kw: Any) -> Any:
    """A TrainConfig field that is also a flag of ``run.py`` (see :data:`TRAIN_FLAGS`).

    ``kw`` are :class:`Flag` attributes; ``run_default`` is the flag's default where it
    differs from the field's (a Python caller's quick default against a real run's).
    """
    return field(default=default, metadata={"flag": dict(role=role, help=help, type=parse, **kw)})


def _loop(default: Any, help: str, parse: Callable[[str], Any] | None = None, **kw: Any) -> Any:
    """A setting of what the loop trains (an identity flag)."""
    return _flag(IDENTITY, default, help, parse, **kw)


def _speed(default: Any, help: str, **kw: Any) -> Any:
    """How the loop runs, not what it computes (speed, memory: a setting flag)."""
    return _flag(SETTING, default, help, **kw)


@dataclass
class TrainConfig:
    """Options of the loop shared by every rule; each field with a help text is a flag of
    ``run.py`` (``--batch-size`` for ``batch_size``), the rest are Python's only.

    Attributes:
        progress: progress bars and per-epoch lines (``--no-progress``).
        log_every: steps between progress updates and divergence checks (each costs a
            device sync).
        compile_backend: the backend of ``torch.compile`` where ``compile`` is not "no".
    """

    epochs: int = _loop(1, "training epochs", positive_int, row=False, run_default=10)
    batch_size: int = _loop(128, "training batch size (per process)", positive_int)
    eval_batch_size: int | None = _loop(
        None, "evaluation batch size (default: twice --batch-size)", positive_int, row=False)
    lr: float = _loop(0.1, "peak learning rate", bounded(0, low_open=True))
    optimizer: Literal["sgd", "adamw"] = _loop(
        "sgd", "sgd (with --momentum, --nesterov) or adamw")
    momentum: float = _loop(0.9, "SGD momentum", bounded(0, 1))
    nesterov: bool = _loop(False, "Nesterov momentum (SGD)")
    weight_decay: float = _loop(5e-4, "weight decay (decoupled under adamw)", bounded(0))
    schedule: Literal["cosine", "multistep", "constant"] = _loop(
        "cosine", "learning-rate schedule (cosine per batch, multistep per epoch)")
    milestones: tuple[float, ...] = _loop(
        (0.5, 0.75), "multistep: fractions of the epochs, e.g. 0.5,0.75", fractions)
    gamma: float = _loop(0.1, "multistep decay factor", bounded(0, low_open=True))
    max_loss: float = _loop(0.0, "stop as diverged when a part's mean loss exceeds X (0: off)",
                            bounded(0), metavar="X")
    seed: int = _loop(0, "seeds the weights, the subsets and the batches", seed_value,
                      row=False, presettable=False)  # a preset's seeds give it
    channels_last: bool = _speed(False, "channels-last memory format for 4-D weights and "
                                 "inputs (faster convolutions on recent GPUs)")
    compile: Literal["no", "default", "reduce-overhead", "max-autotune"] = _speed(
        "no", "torch.compile each trained part with its objective, in this inductor mode "
        "(no: eager)")
    recompute_blocks: bool = _speed(False, "keep only each block's input for backward and run "
                                    "the block again there: less activation memory for one "
                                    "more forward of each part")
    optimizer_impl: Literal["auto", "foreach", "fused", "loop"] = _speed(
        "auto", "the optimizer's kernels: auto (torch's choice, foreach on GPUs), foreach, "
        "fused (one kernel per step) or loop (one parameter at a time)")
    progress: bool = True
    log_every: int = 10
    compile_backend: str = "inductor"

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> TrainConfig:
        """The loop's settings from ``run.py``'s parsed flags: each flag field by its name."""
        return cls(**{f.dest: getattr(args, f.dest) for f in TRAIN_FLAGS},
                   progress=not args.no_progress)


def _train_flags() -> tuple[Flag, ...]:
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if "flag" not in f.metadata:
            continue
        meta, hint = dict(f.metadata["flag"]), hints[f.name]
        literal = typing.get_origin(hint) is Literal
        out.append(Flag(f.name.replace("_", "-"), default=meta.pop("run_default", f.default),
                        choices=typing.get_args(hint) if literal else None,
                        kind="switch" if hint is bool else "value", identity_key=TRAIN,
                        **meta))
    return tuple(out)


#: The loop's flags, in TrainConfig's field order.
TRAIN_FLAGS: tuple[Flag, ...] = _train_flags()
