"""Every flag of ``benchmarks/run.py``, declared once in :data:`FLAGS`.

The loop's and the information plane's flags are fields of
:class:`~locallearn.settings.TrainConfig` and
:class:`~locallearn.settings.PlaneSettings`; the others (what is trained besides
the loop, outputs, commands) are declared here. The command line's parser, the
presets' checks, the leaderboard's idea of a setting, the record's config and
the identity a checkpoint must match are all read from :data:`FLAGS`. A flag's
role (``IDENTITY``, ``SETTING``, ``OUTPUT``, ``COMMAND``) says what it is; see
:mod:`locallearn.settings`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .settings import (  # noqa: F401 - the flags' vocabulary, re-exported
    COMMAND,
    IDENTITY,
    OUTPUT,
    PLANE_FLAGS,
    SETTING,
    TRAIN,
    TRAIN_FLAGS,
    Flag,
    Parser,
    _parsed,
    positive_int,
)


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
         "CIFAR)", choices=("crop_flip", "crop", "flip", "none")),
    Flag("norm-mean", IDENTITY, "normalisation mean in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(), metavar="R,G,B"),
    Flag("norm-std", IDENTITY, "normalisation std in [0, 1] units (default: measured on the "
         "training split)", type=per_channel(positive=True), metavar="R,G,B"),
    *TRAIN_FLAGS,  # the loop's: TrainConfig's fields (locallearn/settings.py)
    *PLANE_FLAGS,  # the information plane's: PlaneSettings' fields (settings.py)
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
