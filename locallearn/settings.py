"""Every flag of ``benchmarks/run.py``, declared once: :data:`FLAGS`.

A dataclass field with flag metadata (:func:`_flag`) is one setting *and* one
flag: its type gives the flag's kind (``bool``: a switch; ``Literal[...]``: its
choices), its metadata the help, the value parser and the flag's role. The
loop's settings are :class:`TrainConfig`, the information plane's
:class:`PlaneSettings`; the other flags are one :class:`Flag` line each in
:data:`FLAGS`. The parser, the presets' checks, the leaderboard's rows, the
record's config and the checkpoint identity are all read from :data:`FLAGS`
(docs/architecture.md, "The command line's flags").
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
#   flag is the same (run_identity).
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
    ``run.py`` (``--no-plane`` is one of :data:`FLAGS`)."""

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


@dataclass
class ProbeSettings(Flagged):
    """The linear probe's flags (:class:`~locallearn.analysis.probe.LinearProbe`): what it
    records is the accuracy of a label-free rule, so they are identity flags."""

    probe: Literal["none", "linear"] = _identity(
        "none", "linear: before training (the random network's floor) and after every epoch, "
        "train a linear classifier on each block's frozen, pooled output and record its test "
        "accuracy (a label-free rule's accuracy; docs/records.md)")
    probe_images: int = _identity(
        5000, "--probe linear: class-balanced, un-augmented training images its classifiers "
        "learn from", positive_int, metavar="N")
    probe_epochs: int = _identity(
        30, "--probe linear: epochs of each classifier (AdamW, batch 256)", positive_int,
        metavar="E")


#: The linear probe's flags, in ProbeSettings' field order.
PROBE_FLAGS: tuple[Flag, ...] = ProbeSettings.flags()


def block_names(text: str) -> list[str]:
    """argparse type: comma-separated block names, e.g. ``layer1.4,layer2.3``.

    A list, as JSON gives it back: a checkpoint's stored identity compares equal.
    """
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated block names; got {text!r}")
    return names


def per_channel(positive: bool = False):
    """argparse type: one finite number per image channel (``R,G,B``), above 0 if ``positive``.

    The count is checked against the data set's channels once it is loaded. A
    list, as JSON gives it back: a checkpoint's stored identity compares equal.
    """
    noun = "comma-separated finite numbers, one per channel (R,G,B)" + (
        ", above 0" if positive else "")
    return lambda text: _parsed(text, lambda t: [float(v) for v in t.split(",")], noun,
                                lambda vs: all(abs(v) < float("inf") for v in vs)
                                and not (positive and min(vs) <= 0))


def _datasets_help() -> str:
    from .data import DATASETS  # data loads torch: only when a parser is built

    return "one of: " + ", ".join(DATASETS)


def _trackers_help() -> str:
    from accelerate.utils import LoggerType  # only when a parser is built

    names = ", ".join(t.value for t in LoggerType if t.value != "all")
    return (f"also log every epoch to this experiment tracker through Accelerate: {names} "
            "(its package must be installed)")


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
         "CIFAR; ssl: Barlow Twins' views)", choices=("crop_flip", "crop", "flip", "ssl", "none")),
    Flag("norm-mean", IDENTITY, "normalisation mean in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(), metavar="R,G,B"),
    Flag("norm-std", IDENTITY, "normalisation std in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(positive=True), metavar="R,G,B"),
    *TRAIN_FLAGS,  # the loop's: TrainConfig's fields
    *PLANE_FLAGS,  # the information plane's: PlaneSettings' fields
    *PROBE_FLAGS,  # the linear probe's: ProbeSettings' fields
    Flag("no-plane", SETTING, "skip the information plane", kind="switch", row=False),
    Flag("mixed-precision", SETTING, "autocast precision, through Accelerate (fp16: a "
         "gradient scaler per part; needs a GPU)", "no", choices=("no", "fp16", "bf16")),
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
    """The parser of ``run.py`` (without ``defaults``, a flag not given is left out)."""
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
    identity key; ``resolved`` replaces the parsed values by key (the rule's and the model's
    resolved options, and ``"train"``: the loop's resolved settings)."""
    identity: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.role in (IDENTITY, SETTING):
            key = flag.identity_key or flag.dest
            identity[key] = resolved[key] if key in resolved else getattr(args, flag.dest)
    return identity
