"""Every flag of ``benchmarks/run.py``, declared once.

The command line's parser, the presets' checks, the leaderboard's idea of a
setting and the identity a checkpoint must match are all read from
:data:`FLAGS`. A flag's role says what it is:

- ``IDENTITY``: what is trained (model, rule, data, split, the loop's
  settings).
- ``SETTING``: how it is trained or looked at (precision, determinism, the
  information plane).
  Both change results, so a checkpoint resumes only when every identity
  and setting flag is the same (:func:`run_identity`).
- ``OUTPUT``: where things are read from or written to, and what is shown.
- ``COMMAND``: what ``run.py`` does rather than what it trains.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = [
    "COMMAND", "FLAGS", "IDENTITY", "OUTPUT", "SETTING", "Flag", "Parser", "build_parser",
    "given", "recorded_values", "run_identity",
]

IDENTITY, SETTING, OUTPUT, COMMAND = "identity", "setting", "output", "command"
# Where a loop setting sits in the identity: the resolved TrainConfig, under this key.
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


def seed(text: str) -> int:
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


def block_names(text: str) -> list[str]:
    """argparse type: comma-separated block names, e.g. ``layer1.4,layer2.3``.

    A list, as JSON gives it back: a checkpoint's stored identity compares equal.
    """
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated block names; got {text!r}")
    return names


def per_channel(positive: bool = False) -> Callable[[str], list[float]]:
    """argparse type: one finite number per image channel (``R,G,B``), above 0 if ``positive``.

    The count is checked against the data set's channels once it is loaded. A
    list, as JSON gives it back: a checkpoint's stored identity compares equal.
    """
    noun = "comma-separated finite numbers, one per channel (R,G,B)" + (
        ", above 0" if positive else "")

    def parse(text: str) -> list[float]:
        values = _parsed(text, lambda t: [float(v) for v in t.split(",")], noun)
        if not all(abs(v) < float("inf") for v in values) or (positive and min(values) <= 0):
            raise argparse.ArgumentTypeError(f"must be {noun}; got {text!r}")
        return values

    return parse


def _datasets_help() -> str:
    from .data import DATASETS  # data loads torch: only when a parser is built

    return "one of: " + ", ".join(DATASETS)


def _trackers_help() -> str:
    from accelerate.utils import LoggerType  # only when a parser is built

    names = ", ".join(t.value for t in LoggerType if t.value != "all")
    return (f"also log every epoch to this experiment tracker through Accelerate: {names} "
            "(its package must be installed)")


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


def _loop(name: str, **kw: Any) -> Flag:
    """A setting of the training loop: in the identity through the resolved TrainConfig."""
    return Flag(name, IDENTITY, identity_key=TRAIN, **kw)


def _speed(name: str, **kw: Any) -> Flag:
    """How the loop runs (speed, memory; a setting), held in the resolved TrainConfig."""
    return Flag(name, SETTING, identity_key=TRAIN, **kw)


FLAGS: tuple[Flag, ...] = (
    Flag("rule", IDENTITY, "training rule (see --list-rules)", "e2e",
         presettable=False),  # a preset's runs give the rule
    Flag("rule-opt", IDENTITY, "rule option, typed by the rule's config; repeatable",
         metavar="KEY=VALUE", kind="options", identity_key="rule_options", recorded=False),
    Flag("plugin", COMMAND, "load rules, heads and losses from a Python file or module; "
         "repeatable",
         metavar="FILE.py|MODULE", kind="list", recorded=False),
    Flag("list-rules", COMMAND, "list the registered rules and exit", kind="switch",
         recorded=False, presettable=False),
    Flag("list-heads", COMMAND, "list the registered auxiliary heads and exit", kind="switch",
         recorded=False, presettable=False),
    Flag("list-losses", COMMAND, "list the registered loss terms and exit", kind="switch",
         recorded=False, presettable=False),
    Flag("preset", COMMAND, "defaults from benchmarks/presets/NAME.json (its flags and those "
         "for --rule); flags given here override them", metavar="NAME", presettable=False),
    Flag("model", IDENTITY, "timm model name", "resnet18_cifar", row=False),
    Flag("model-opt", IDENTITY, "keyword for timm.create_model, e.g. img_size=32; repeatable",
         metavar="KEY=VALUE", kind="options", identity_key="model_options", recorded=False),
    Flag("granularity", IDENTITY, "split at stages or at every block", "stage",
         choices=("stage", "block")),
    Flag("blocks", IDENTITY, "group the fine blocks into K parts balanced by activation memory",
         type=positive_int, metavar="K", identity_key="num_blocks"),
    Flag("split-after", IDENTITY, "cut the fine blocks into parts that end after these blocks "
         "(e.g. layer1.4,layer2.3: three parts; InfoPro's fixed split points); not with --blocks",
         type=block_names, metavar="NAME,..."),
    Flag("dataset", IDENTITY, _datasets_help, "cifar10", row=False),
    Flag("data-root", OUTPUT, "where torchvision data sets live", "data"),
    Flag("cache-dir", OUTPUT, "decoded-image cache (default ~/.cache/locallearn)"),
    Flag("train-subset", IDENTITY, "train on a fixed, seeded, class-balanced subset of N images",
         type=positive_int, metavar="N", row=False),
    Flag("test-subset", IDENTITY, "test on a fixed, seeded, class-balanced subset of N images",
         type=positive_int, metavar="N", row=False),
    Flag("augment", IDENTITY, "training augmentation (default: the data set's, crop_flip for "
         "CIFAR)", choices=("crop_flip", "crop", "flip", "none")),
    Flag("norm-mean", IDENTITY, "normalisation mean in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(), metavar="R,G,B"),
    Flag("norm-std", IDENTITY, "normalisation std in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(positive=True), metavar="R,G,B"),
    _loop("epochs", help="training epochs", default=10, type=positive_int, row=False),
    _loop("batch-size", help="training batch size (per process)", default=128, type=positive_int),
    _loop("eval-batch-size", help="evaluation batch size (default: twice --batch-size)",
          type=positive_int, row=False),
    _loop("lr", help="peak learning rate", default=0.1, type=bounded(0, low_open=True)),
    _loop("optimizer", help="sgd (with --momentum, --nesterov) or adamw", default="sgd",
          choices=("sgd", "adamw")),
    _loop("momentum", help="SGD momentum", default=0.9, type=bounded(0, 1)),
    _loop("nesterov", help="Nesterov momentum (SGD)", kind="switch"),
    _loop("weight-decay", help="weight decay (decoupled under adamw)", default=5e-4,
          type=bounded(0)),
    _loop("schedule", help="learning-rate schedule (cosine per batch, multistep per epoch)",
          default="cosine", choices=("cosine", "multistep", "constant")),
    _loop("milestones", help="multistep: fractions of the epochs, e.g. 0.5,0.75",
          default=(0.5, 0.75), type=fractions),
    _loop("gamma", help="multistep decay factor", default=0.1, type=bounded(0, low_open=True)),
    Flag("plane-every", SETTING, "information plane: before training, every N epochs and after "
         "the last", 1, type=positive_int, metavar="N", row=False),
    Flag("probe-size", SETTING, "samples in the information-plane probe set", 1000,
         type=positive_int, metavar="M", row=False),
    Flag("probe-split", SETTING, "where the probe set comes from (un-augmented)", "train",
         choices=("train", "test"), row=False),
    Flag("plane-distance", SETTING, "information plane: the Gaussian kernel of the squared "
         "distance (sqeuclidean, as the HSIC-bottleneck code) or of the distance (euclidean, "
         "as the seed paper's code)", "sqeuclidean", choices=("sqeuclidean", "euclidean"),
         row=False),
    Flag("no-plane", SETTING, "skip the information plane", kind="switch", row=False),
    _loop("max-loss", help="stop as diverged when a part's mean loss exceeds X (0: off)",
          default=0.0, type=bounded(0), metavar="X"),
    Flag("mixed-precision", SETTING, "autocast precision, through Accelerate (fp16: a "
         "gradient scaler per part; needs a GPU)", "no", choices=("no", "fp16", "bf16")),
    _speed("channels-last", help="channels-last memory format for 4-D weights and inputs "
           "(faster convolutions on recent GPUs)", kind="switch"),
    _speed("compile", help="torch.compile each trained part with its objective, in this "
           "inductor mode (no: eager)", default="no",
           choices=("no", "default", "reduce-overhead", "max-autotune")),
    _speed("recompute-blocks", help="keep only each block's input for backward and run the "
           "block again there: less activation memory for one more forward of each part",
           kind="switch"),
    _speed("optimizer-impl", help="the optimizer's kernels: auto (torch's choice, foreach on "
           "GPUs), foreach, fused (one kernel per step) or loop (one parameter at a time)",
           default="auto",
           choices=("auto", "foreach", "fused", "loop")),
    _loop("seed", help="seeds the weights, the subsets and the batches", default=0, type=seed,
          row=False,
          presettable=False),  # a preset's seeds give it
    Flag("deterministic", SETTING,
         "torch.use_deterministic_algorithms (same results on GPUs too; slower)", kind="switch"),
    Flag("output", OUTPUT, "folder for the run record", "runs",
         presettable=False),  # the grid runner gives it
    Flag("name", OUTPUT, "record file name (default: rule__model__dataset__seedN.json, with a "
         "NAME-VALUE tag before the seed for each identity flag or option that is not its "
         "default; docs/records.md)",
         presettable=False),  # the grid runner gives it
    Flag("overwrite", OUTPUT, "replace the record of another, finished run at the same "
         "--output/--name", kind="switch", recorded=False, presettable=False),
    Flag("checkpoint-dir", OUTPUT, "save the full training state here after every epoch",
         metavar="DIR"),
    Flag("resume", COMMAND, "continue from the newest complete checkpoint in --checkpoint-dir",
         kind="switch", presettable=False),
    Flag("keep-checkpoints", OUTPUT, "how many checkpoints to keep (default 2)", 2,
         type=positive_int, metavar="N"),
    Flag("no-progress", OUTPUT, "no progress bars", kind="switch"),
    Flag("log-with", OUTPUT, _trackers_help, metavar="NAME"),
    Flag("project-dir", OUTPUT, "the tracker's folder (TensorBoard: its event files go to "
         "DIR/<record name>/; default: --output)", metavar="DIR"),
    # How the run executes, not what it trains: the weights are the serial run's.
    # Rows of their own on the leaderboard: they change the speed and memory columns.
    Flag("parallel", OUTPUT, "none: every part in this process; parts: the rule's parts cut "
         "into one pipelined stage per process (torchrun --nproc_per_node P; docs/parallel.md)",
         "none", choices=("none", "parts"), row=True),
    Flag("stage-balance", OUTPUT, "--parallel parts: cut the stages by each part's measured "
         "step time, or by its activation memory (what --blocks balances)", "time",
         choices=("time", "memory"), row=True),
    Flag("stages", OUTPUT, "--parallel parts: S stages, each with P / S data-parallel "
         "replicas, on P processes (default: one stage per process)", type=positive_int,
         metavar="S", row=True),
    # Asynchronous stages change what is trained: identity flags, in the record's name.
    Flag("replay-buffer", IDENTITY, "--parallel parts: run the stages asynchronously, each "
         "after the first stepping on samples drawn from the last M batches it received "
         "(DGL's replay buffer, Belilovsky et al. 2020; docs/parallel.md)", type=positive_int,
         metavar="M"),
    Flag("max-reuse", IDENTITY, "--replay-buffer: draw each sample at most K times (default: "
         "no cap)", type=positive_int, metavar="K"),
    Flag("check", COMMAND, "check the arguments (names, options, data path) and exit without "
         "training", kind="switch", recorded=False, presettable=False),
)
BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}


def build_parser(defaults: bool = True) -> Parser:
    """The parser of ``run.py``, every flag from :data:`FLAGS` (with its default, if
    ``defaults``; else a flag not given is absent from the namespace)."""
    parser = Parser(
        prog="run.py",
        description="Train a timm backbone by a local-learning rule and write a JSON run record.",
        epilog="Where a flag is not given, its value comes from the --preset, else from the "
               "rule's own training defaults (--list-rules shows them), else from the default "
               "shown here; the record's config_sources says which.",
    )
    for flag in FLAGS:
        flag.add_to(parser, defaults)
    return parser


def given(argv: list[str]) -> set[str]:
    """The dests of the flags that ``argv`` sets."""
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def recorded_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags recorded as given, by dest, in declaration order."""
    return {f.dest: getattr(args, f.dest) for f in FLAGS if f.recorded}


def run_identity(args: argparse.Namespace, resolved: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every IDENTITY and SETTING flag, by its
    identity key.

    Args:
        args: the parsed command line.
        resolved: values that replace the given ones, by identity key: the rule's and
            the model's resolved options and ``"train"``, the loop's resolved settings.
    """
    identity: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.role in (IDENTITY, SETTING):
            key = flag.identity_key or flag.dest
            identity[key] = resolved[key] if key in resolved else getattr(args, flag.dest)
    return identity
