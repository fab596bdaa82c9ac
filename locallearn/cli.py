"""The ``benchmarks/run.py`` command: train a timm backbone by a rule, write a run record.

Every check of the user's input runs before anything heavy or any output
happens, and each failure is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any

from . import flags
from .config import config_dict, parse_assignments
from .errors import ConfigError, LocallearnError, unknown_name

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``run.py``, built from the one declaration of its flags."""
    return flags.build_parser()


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check(args: argparse.Namespace):
    """Validate everything cheap to validate; returns the rule, model options and observers."""
    import timm

    from .analysis import InformationPlane
    from .data import check_dataset
    from .rules import create_rule

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

    from .blocks import split
    from .checkpoint import Checkpointer
    from .data import load_dataset
    from .records import RecordWriter, build_record, hardware, record_name
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
    record = build_record(
        flags.recorded_values(args), plugins=args.plugin,
        rule_paper=RULES.get(args.rule).meta["paper"], rule_options=rule.describe(),
        model_options=model_opts, train=config_dict(config), stack=stack, parts=trainer.parts,
        hardware=hardware(accelerator), history=trainer.history,
    )
    path = Path(args.output) / (args.name or record_name(args.rule, args.model, args.dataset,
                                                         args.seed))
    writer = RecordWriter(record, path, plane, accelerator.is_main_process)
    trainer.observers = (*observers, writer)  # the record shows the plane's epoch
    if args.checkpoint_dir:
        identity = flags.run_identity(args, {
            "rule_options": rule.describe(), "model_options": model_opts,
            "train": config_dict(config) | {"progress": None},
        })
        checkpointer = Checkpointer(args.checkpoint_dir, args.keep_checkpoints, identity)
        trainer.observers += (checkpointer,)  # saved after the record shows the epoch
        if args.resume and checkpointer.resume(trainer) and accelerator.is_main_process:
            print(f"resuming after epoch {trainer.start_epoch} from {args.checkpoint_dir}")
    try:
        result = trainer.fit()
    except Diverged as err:
        writer.write("diverged", error=str(err))
        accelerator.wait_for_everyone()
        raise
    except KeyboardInterrupt:
        writer.write("interrupted")
        raise
    writer.write("complete", test_acc=result["test_acc"], block_acc=result["block_acc"],
                 seconds=result["seconds"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # under several processes: tear the process group down
    return record


def _with_preset(argv: list[str] | None) -> list[str]:
    """``argv`` with its ``--preset``'s flags (for its ``--rule``) put first: given flags win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = flags.Parser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--rule", default="e2e")
    known, _ = pre.parse_known_args(argv)
    if known.preset is None:
        return argv
    from .presets import load_preset

    return load_preset(known.preset).flags_for(known.rule) + argv


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    ) or torch.backends.mps.is_available()


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


def _print_registries(kinds: list[str]) -> None:
    """One line per registered rule, head or loss: its name, summary and paper."""
    from .heads import HEADS
    from .losses import LOSSES
    from .rules.base import RULES

    registries = {"rules": RULES, "heads": HEADS, "losses": LOSSES}
    for kind in kinds:
        if len(kinds) > 1:
            print(f"{kind}:")
        for entry in registries[kind]:
            paper = f"  [{entry.meta['paper']}]" if entry.meta.get("paper") else ""
            print(f"{entry.name:15s} {entry.meta.get('summary', '')}{paper}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    prog = "run.py"
    try:
        args = build_parser().parse_args(_with_preset(argv))
        from .plugins import load_plugins

        load_plugins(args.plugin)
        listed = [kind for kind in ("rules", "heads", "losses") if getattr(args, f"list_{kind}")]
        if listed:
            _print_registries(listed)
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
