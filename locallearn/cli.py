"""The ``benchmarks/run.py`` command: train a timm backbone by a rule, write a run record.

Every check of the user's input runs before anything heavy or any output
happens, and each failure is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

from .config import config_dict, parse_assignments
from .errors import ConfigError, LocallearnError, unknown_name

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise ConfigError so they print as one line."""

    def error(self, message: str):
        raise ConfigError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite; got {text!r}")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers; got {text!r}") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be fractions of the epochs in (0, 1); got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    p = _Parser(
        prog="run.py",
        description="Train a timm backbone by a local-learning rule and write a JSON run record.",
    )
    p.add_argument("--rule", default="e2e", help="training rule (see --list-rules)")
    p.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="rule option, typed by the rule's config; repeatable")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="load rules from a Python file or module; repeatable")
    p.add_argument("--list-rules", action="store_true", help="list the registered rules and exit")
    p.add_argument("--preset", metavar="NAME",
                   help="defaults from benchmarks/presets/NAME.json (its flags and those for "
                        "--rule); flags given here override them")
    p.add_argument("--model", default="resnet18_cifar", help="timm model name")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for timm.create_model, e.g. img_size=32; repeatable")
    p.add_argument("--granularity", choices=["stage", "block"], default="stage",
                   help="split at stages (default) or at every block")
    p.add_argument("--blocks", type=_positive_int, metavar="K",
                   help="group the fine blocks into K parts balanced by activation memory")
    p.add_argument("--dataset", default="cifar10", help="one of: " + ", ".join(DATASETS))
    p.add_argument("--data-root", default="data", help="where torchvision data sets live")
    p.add_argument("--cache-dir", help="decoded-image cache (default ~/.cache/locallearn)")
    p.add_argument("--train-subset", type=_positive_int, metavar="N",
                   help="train on a fixed, seeded, class-balanced subset of N images")
    p.add_argument("--test-subset", type=_positive_int, metavar="N",
                   help="test on a fixed, seeded, class-balanced subset of N images")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--eval-batch-size", type=_positive_int)
    p.add_argument("--lr", type=_number, default=0.1)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--momentum", type=_number, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=_number, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "multistep", "constant"], default="cosine")
    p.add_argument("--milestones", type=_fractions, default=(0.5, 0.75),
                   help="multistep: fractions of the epochs, e.g. 0.5,0.75")
    p.add_argument("--gamma", type=_number, default=0.1, help="multistep decay factor")
    p.add_argument("--plane-every", type=_positive_int, default=1, metavar="N",
                   help="information plane: before training, every N epochs and after the last")
    p.add_argument("--probe-size", type=_positive_int, default=1000, metavar="M",
                   help="samples in the information-plane probe set")
    p.add_argument("--probe-split", choices=["train", "test"], default="train",
                   help="where the probe set comes from (un-augmented)")
    p.add_argument("--no-plane", action="store_true", help="skip the information plane")
    p.add_argument("--max-loss", type=_number, default=0.0, metavar="X",
                   help="stop as diverged when a part's mean loss exceeds X (0: off)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (same results on GPUs too; slower)")
    p.add_argument("--output", default="runs", help="folder for the run record")
    p.add_argument("--name", help="record file name (default: rule__model__dataset__seedN.json)")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save the full training state here after every epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --checkpoint-dir")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=2, metavar="N",
                   help="how many checkpoints to keep (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help="check the arguments (names, options, data path) and exit without training")
    return p


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check(args: argparse.Namespace):
    """Validate everything cheap to validate; returns the rule, model options and observers."""
    import timm

    from . import create_rule
    from .analysis import InformationPlane
    from .data import check_dataset

    rule = create_rule(args.rule, **parse_assignments(args.rule_opt))
    if not timm.is_model(args.model):
        raise unknown_name("model", args.model, timm.list_models())
    model_opts = parse_assignments(args.model_opt, "--model-opt")
    model_opts = {k: _literal(v) for k, v in model_opts.items()}
    check_dataset(args.dataset, args.data_root)
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir DIR")
    if args.name is not None and (not args.name or "/" in args.name):
        raise ConfigError(f"--name must be a plain file name; got {args.name!r}")
    plane = None if args.no_plane else InformationPlane(
        probe_size=args.probe_size, every=args.plane_every, split=args.probe_split,
        seed=0,
    )
    return rule, model_opts, plane


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` say and write the record; returns the record."""
    rule, model_opts, plane = _check(args)

    import timm
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from . import split
    from .data import load_dataset
    from .records import RECORD_VERSION, record_name, versions, write_json
    from .rules.base import RULES
    from .trainer import Diverged, TrainConfig, Trainer

    # Without a GPU, CPU mode: under torchrun that is Accelerate's multi-CPU (gloo) mode.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not _has_gpu())
    data = load_dataset(
        args.dataset, args.data_root, train_subset=args.train_subset,
        test_subset=args.test_subset, seed=args.seed, cache_dir=args.cache_dir,
    )
    set_seed(args.seed, deterministic=args.deterministic)
    try:
        model = timm.create_model(args.model, num_classes=data.num_classes, **model_opts)
    except TypeError as err:
        raise ConfigError(f"model {args.model!r} rejected --model-opt: {err}") from None
    stack = split(model, args.granularity, args.blocks, input_size=data.image_size)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size or 0,
        lr=args.lr, optimizer=args.optimizer, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, schedule=args.schedule, milestones=args.milestones,
        gamma=args.gamma, seed=args.seed, progress=not args.no_progress,
        max_loss=args.max_loss,
    )
    observers = (plane,) if plane is not None else ()
    trainer = Trainer(stack, rule, data, config, accelerator, observers)
    backbone = sum(p.numel() for p in stack.parameters())
    in_stack = {id(p) for p in stack.parameters()}
    auxiliary = sum(p.numel() for part in trainer.parts for p in part.parameters()
                    if id(p) not in in_stack)
    record = {
        "version": RECORD_VERSION,
        "status": "running",
        "rule": args.rule,
        "rule_paper": RULES.get(args.rule).meta["paper"],
        "model": args.model,
        "dataset": args.dataset,
        "seed": args.seed,
        "deterministic": args.deterministic,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in _NOT_CONFIG},
            "plugins": list(args.plugin),
            "milestones": list(args.milestones),
            "rule_options": rule.describe(),
            "model_options": model_opts,
            "train": config_dict(config),
        },
        "versions": versions(),
        "hardware": {
            "device": str(accelerator.device),
            "device_name": _device_name(accelerator.device),
            "num_processes": accelerator.num_processes,
        },
        "stack": {
            "blocks": stack.names, "granularity": args.granularity, "num_blocks": args.blocks
        },
        "parts": [
            {"name": p.part_name, "blocks": p.block_ids,
             "params": sum(q.numel() for q in p.parameters())}
            for p in trainer.parts
        ],
        "params": {"backbone": backbone, "auxiliary": auxiliary},
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "history": trainer.history,
        "test_acc": None,
        "block_acc": None,
        "seconds": None,
    }
    path = Path(args.output) / (args.name or record_name(args.rule, args.model, args.dataset,
                                                         args.seed))

    def write(status: str, **fields: Any) -> None:
        record.update(status=status, **fields, **_measurements(trainer.history))
        if plane is not None:
            record["plane_config"] = plane.describe()
            record["plane"] = plane.entries
        if accelerator.is_main_process:
            record["path"] = str(write_json(path, record))

    trainer.observers = (*observers, _RecordWriter(write))
    if args.checkpoint_dir:
        identity = {
            "model": args.model, "model_options": model_opts, "rule": args.rule,
            "rule_options": rule.describe(), "dataset": args.dataset,
            "train_subset": args.train_subset, "test_subset": args.test_subset,
            "granularity": args.granularity, "num_blocks": args.blocks,
            "train": config_dict(config) | {"progress": None},
        }
        trainer.save_checkpoints(args.checkpoint_dir, args.keep_checkpoints, identity)
        if args.resume and trainer.resume() and accelerator.is_main_process:
            print(f"resuming after epoch {trainer.start_epoch} from {args.checkpoint_dir}")
    try:
        result = trainer.fit()
    except Diverged as err:
        write("diverged", error=str(err))
        accelerator.wait_for_everyone()
        raise
    except KeyboardInterrupt:
        write("interrupted")
        raise
    write("complete", test_acc=result["test_acc"], block_acc=result["block_acc"],
          seconds=result["seconds"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # under several processes: tear the process group down
    return record


_NOT_CONFIG = ("list_rules", "rule_opt", "model_opt", "plugin", "check")


class _RecordWriter:
    """Observer that rewrites the record after every epoch, marked ``running``."""

    def __init__(self, write):
        self.write = write

    def on_fit_start(self, trainer) -> None:
        self.write("running")

    def on_epoch_end(self, trainer, entry) -> None:
        self.write("running")

    def on_fit_end(self, trainer, result) -> None: ...


def _with_preset(argv: list[str] | None) -> list[str]:
    """``argv`` with its ``--preset``'s flags (for its ``--rule``) put first: given flags win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = _Parser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--rule", default="e2e")
    known, _ = pre.parse_known_args(argv)
    if known.preset is None:
        return argv
    from .presets import load_preset

    return load_preset(known.preset).flags_for(known.rule) + argv


def _measurements(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Activation memory (max over epochs) and mean seconds per epoch, for the record."""
    def peak(key: str) -> int | None:
        return max((e[key] for e in history if key in e), default=None)

    seconds = [e["seconds"] for e in history]
    return {
        "memory": {"saved_bytes_peak": peak("saved_bytes_peak"),
                   "cuda_max_memory": peak("cuda_max_memory")},
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None,
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    ) or torch.backends.mps.is_available()


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def summary(record: dict[str, Any]) -> str:
    """A short table of what a run gave."""
    names = record["stack"]["blocks"]
    depth = " | ".join(
        f"{n} {a:.3f}"
        for n, a in zip(names, record["block_acc"], strict=True)
        if a is not None
    )
    rows = [
        ("rule", "model", "dataset", "epochs", "test acc", "seconds"),
        (record["rule"], record["model"], record["dataset"], str(record["config"]["epochs"]),
         f"{record['test_acc']:.4f}", f"{record['seconds']:.1f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"accuracy at each depth: {depth}")
    if "path" in record:
        lines.append(f"record: {record['path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    prog = "run.py"
    try:
        args = build_parser().parse_args(_with_preset(argv))
        from .plugins import load_plugins

        load_plugins(args.plugin)
        if args.list_rules:
            from .rules.base import RULES

            for entry in RULES:
                print(f"{entry.name:12s} {entry.meta.get('summary', '')}  [{entry.meta['paper']}]")
            return 0
        if args.check:
            _check(args)
            print("arguments ok")
            return 0
        started = time.perf_counter()
        record = run(args)
    except LocallearnError as err:
        from .trainer import Diverged

        line = " ".join(str(err).splitlines())  # user text may hold line breaks
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, Diverged) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print(summary(record))
        print(f"wall time {time.perf_counter() - started:.1f}s")
    return 0
