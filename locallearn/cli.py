"""The ``benchmarks/run.py`` command: train a timm backbone by a rule, write a run record.

Every check of the user's input runs before anything heavy or any output
happens, and each failure is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any

from . import settings
from .config import config_dict, parse_assignments
from .errors import ConfigError, LocallearnError, unknown_name
from .settings import build_parser

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), handled like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    # Every SIGTERM raises: ignoring later ones would leave a process that no SIGTERM stops
    # if the first were ever swallowed (an exception raised inside a finaliser is dropped).
    raise Terminated


def _literal(text: str) -> Any:
    """A ``--model-opt`` value: a Python literal, ``true``/``false`` (as presets write
    switches), or else the text itself."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclasses.dataclass
class Checked:
    """What :func:`_check` built from the arguments."""

    rule: Any
    built: Any  # preflight.Built: the run's stack, built and split once
    plane: Any
    config: Any  # the loop's TrainConfig
    identity: dict[str, Any]  # what a checkpoint must match


def _check(args: argparse.Namespace) -> Checked:
    """Validate everything a run can check before training: names, options, the data (there
    or downloadable), paths, then build and split the model (once: the run trains it), check
    the files other runs own, and last try the setup itself on a probe batch
    (:func:`~locallearn.preflight.check_setup`)."""
    import timm

    from .analysis import InformationPlane
    from .data import check_subset, check_transform, dataset_info
    from .outputs import check_paths, check_record, resumed_run
    from .preflight import build_stack, check_setup
    from .rules import create_rule
    from .settings import PlaneSettings, TrainConfig

    rule = create_rule(args.rule, **parse_assignments(args.rule_opt))
    if rule.label_free and args.probe == "none":
        raise ConfigError(f"rule {args.rule!r} learns without labels: its accuracy is the "
                          "linear probe's; give --probe linear, not none")
    if not timm.is_model(args.model):
        raise unknown_name("model", args.model, timm.list_models())
    model_opts = parse_assignments(args.model_opt, "--model-opt")
    model_opts = {k: _literal(v) for k, v in model_opts.items()}
    info = dataset_info(args.dataset, args.data_root)  # there, or downloadable
    check_subset("train", args.train_subset, info.train_size, info.name)
    check_subset("test", args.test_subset, info.test_size, info.name)
    check_transform(args.augment, args.norm_mean, args.norm_std, info.image_size[0])
    if args.blocks and args.split_after:
        raise ConfigError("--blocks K and --split-after NAMES both cut the stack into parts; "
                          "give one")
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir DIR")
    check_paths(args)
    if args.mixed_precision == "fp16" and not _has_gpu():  # Accelerate would ignore it
        raise ConfigError("--mixed-precision fp16 needs a GPU (its gradient scaling is the "
                          "GPU's); on a CPU use bf16 or no")
    if args.log_with:
        from .trackers import check_tracker

        check_tracker(args.log_with)
    if args.project_dir and not args.log_with:
        raise ConfigError("--project-dir is the tracker's folder; give --log-with NAME too")
    plane = None if args.no_plane else InformationPlane(
        **dataclasses.asdict(PlaneSettings.from_flags(args)))
    config = TrainConfig.from_flags(args)
    if args.parallel == "parts":
        from .pipeline import check_args

        check_args(args, rule)
    else:
        for flag, given in (("stage-balance", args.stage_balance != "time"),
                            ("stages", args.stages is not None),
                            ("replay-buffer", args.replay_buffer is not None),
                            ("max-reuse", args.max_reuse is not None)):
            if given:
                raise ConfigError(f"--{flag} sets the stages of --parallel parts; add "
                                  "--parallel parts or drop it")
    # The model the run trains, built once; before the identity, which holds its options.
    built = build_stack(args.model, model_opts, info, granularity=args.granularity,
                        num_blocks=args.blocks, split_after=args.split_after, seed=args.seed)
    identity = settings.run_identity(args, {
        "rule_options": rule.describe(), "model_options": built.model_options,
        "train": config_dict(config) | {"progress": None},
    })
    if os.environ.get("RANK", "0") == "0":  # the main process (torchrun's RANK; Accelerate
        # is not set up yet): the others would see the main process's own files
        check_record(args, resumed_run(args, identity))
    # Last, as the dearest check: the rule's parts on the stack, on a probe batch.
    check_setup(rule, built.stack, info, epochs=args.epochs, batch_size=args.batch_size,
                train_size=args.train_subset or info.train_size, mean=args.norm_mean,
                std=args.norm_std, model=args.model)
    return Checked(rule, built, plane, config, identity)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` say and write the record; returns the record."""
    checked = _check(args)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import load_dataset
    from .outputs import claim
    from .pipeline import PipelineExecutor
    from .rules.base import Rule
    from .trainer import Trainer

    # Without a GPU, CPU mode: under torchrun that is Accelerate's multi-CPU (gloo) mode.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not _has_gpu(),
                              log_with=args.log_with,
                              project_dir=(args.project_dir or args.output) if args.log_with
                              else None)
    data = load_dataset(
        args.dataset, args.data_root, train_subset=args.train_subset,
        test_subset=args.test_subset, seed=args.seed, cache_dir=args.cache_dir,
    ).with_transform(args.augment, args.norm_mean, args.norm_std)
    set_seed(args.seed, deterministic=args.deterministic)
    # The stack _check built under this seed; the random state goes on from where building
    # it left off, as if it had been built here.
    torch.set_rng_state(checked.built.rng)
    stack = checked.built.stack
    observers = (checked.plane,) if checked.plane is not None else ()
    if args.probe == "linear":
        from .analysis.probe import LinearProbe

        observers += (LinearProbe(images=args.probe_images, epochs=args.probe_epochs),)
    if type(checked.rule).gradient_probe is not Rule.gradient_probe:  # fa, dfa, ...
        from .analysis.gradients import GradientProbe

        observers += (GradientProbe(),)
    executor = None  # serial
    if args.parallel == "parts":
        cut = None  # a resumed run cuts its stages as the run it continues did
        if args.resume:
            from .checkpoint import saved_stages

            stages = args.stages or accelerator.num_processes
            cut = saved_stages(args.checkpoint_dir, checked.identity, stages,
                               accelerator.num_processes // stages)
        executor = PipelineExecutor(args.stage_balance, cut, args.stages, args.replay_buffer,
                                    args.max_reuse)
    trainer = Trainer(stack, checked.rule, data, checked.config, accelerator, observers,
                      executor)
    # The files are taken (and checked again, now under their locks) just before the
    # first is written, so a run that fails to start leaves nothing behind.
    run_id, replaces, locks = claim(args, checked.identity) if accelerator.is_main_process \
        else (None, False, [])
    try:
        return _fit(args, checked, trainer, run_id, replaces)
    finally:
        for lock in locks:
            lock.release()


def _fit(args: argparse.Namespace, checked: Checked, trainer, run_id: str | None,
         replaces: bool) -> dict[str, Any]:
    """Write the record and the checkpoints around ``trainer.fit()`` (``run_id``, ``replaces``:
    as :func:`~locallearn.outputs.claim` took the files; None, False on other processes)."""
    from .checkpoint import Checkpointer
    from .outputs import record_path
    from .records import RecordWriter, build_record, hardware
    from .rules.base import RULES
    from .trainer import Diverged

    accelerator, plane = trainer.accelerator, checked.plane
    data = trainer.data  # the augmentation and normalisation used, defaults resolved
    values = settings.recorded_values(args) | {
        "augment": data.augment, "norm_mean": list(data.mean), "norm_std": list(data.std)}
    record = build_record(
        values, run_id=run_id, plugins=args.plugin,
        rule_paper=RULES.get(args.rule).meta["paper"], rule_options=checked.rule.describe(),
        model_options=checked.built.model_options, train=config_dict(checked.config),
        sources=getattr(args, "config_sources", {}), argv=getattr(args, "argv", None),
        stack=trainer.stack, parts=trainer.parts, hardware=hardware(accelerator),
        history=trainer.history,
    )
    probe = next((o for o in trainer.observers if type(o).__name__ == "LinearProbe"), None)
    writer = RecordWriter(record, record_path(args), plane, accelerator.is_main_process,
                          replaces=replaces, probe=probe)
    trainer.observers = (*trainer.observers, writer)  # the record shows the plane's epoch
    if args.checkpoint_dir:
        checkpointer = Checkpointer(args.checkpoint_dir, args.keep_checkpoints,
                                    checked.identity, run_id)
        trainer.observers += (checkpointer,)  # saved after the record shows the epoch
    if args.log_with:  # last: it logs what the record shows, and keeps no state
        from .trackers import TrackerLog

        trainer.observers += (TrackerLog(record, record_path(args).stem),)
    if args.checkpoint_dir and args.resume and checkpointer.resume(trainer):
        writer.resumed(trainer.start_epoch)  # after the checkpoint restored earlier resumes
        if accelerator.is_main_process:
            print(f"resuming after epoch {trainer.start_epoch} from {args.checkpoint_dir}")
    try:
        result = trainer.fit()
    except (Diverged, KeyboardInterrupt) as err:  # KeyboardInterrupt: Ctrl-C, or SIGTERM
        fields = {"error": str(err)} if isinstance(err, Diverged) else {}
        writer.write("diverged" if fields else "interrupted", **fields)
        for tracker in accelerator.trackers:  # end_training does it for a finished run
            tracker.finish()
        if fields:
            accelerator.wait_for_everyone()
        raise
    writer.write("complete", test_acc=result["test_acc"], block_acc=result["block_acc"],
                 seconds=result["seconds"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # under several processes: tear the process group down
    return record


def rule_flags(rule: str) -> list[str]:
    """The flags of ``rule``'s ``training_defaults`` (none for a rule not registered).

    Raises:
        ConfigError: a declared value that ``run.py`` would refuse, naming the rule.
    """
    from .presets import to_flags
    from .rules.base import RULES

    if rule not in RULES:
        return []  # the checks name the unknown rule
    out = to_flags(RULES.get(rule).factory.training_defaults)
    try:
        build_parser().parse_args(out)
    except ConfigError as err:
        raise ConfigError(f"rule {rule!r} declares a bad training default: {err}") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``run.py``'s arguments, each flag from the first that sets it: the command line, its
    ``--preset``, the rule's ``training_defaults``, else the flag's own default.

    Loads the ``--plugin``s first, so a plugin rule's defaults count too. The namespace's
    ``argv`` is the command line as given; its ``config_sources`` maps each recorded
    identity or setting flag that was set (by dest) to where its value came from:
    ``"command line"``, ``"preset NAME"`` or ``"rule NAME"``.
    """
    from .plugins import load_plugins
    from .presets import load_preset

    argv = sys.argv[1:] if argv is None else list(argv)
    alone = build_parser().parse_args(argv)  # a preset sets neither --preset nor --rule
    preset = load_preset(alone.preset).flags_for(alone.rule) if alone.preset else []
    load_plugins(build_parser().parse_args(preset + argv).plugin)  # a preset's plugins too
    rule = rule_flags(alone.rule)
    args = build_parser().parse_args(rule + preset + argv)
    args.argv = argv  # the record keeps the command (the leaderboard shows it)
    args.defaults = vars(build_parser().parse_args(rule))  # what the rule runs with; names
    sources: dict[str, str] = {}
    for layer, source in ((rule, f"rule {args.rule}"), (preset, f"preset {args.preset}"),
                          (argv, "command line")):  # lowest first: a later layer wins
        sources.update(dict.fromkeys(settings.given(layer), source))
    args.config_sources = {f.dest: sources[f.dest] for f in settings.FLAGS if f.dest in sources
                           and f.recorded and f.role in (settings.IDENTITY, settings.SETTING)}
    return args


def _from_rule_and_preset(args: argparse.Namespace) -> list[str]:
    """What ``--check`` adds: one line per rule or preset that gave values (``from rule R:
    --lr 0.001 ...``), and the rule's declared defaults that something else overrode."""
    from .presets import to_flags
    from .rules.base import RULES

    groups: dict[str, dict[str, Any]] = {}
    for dest, source in args.config_sources.items():
        if source != "command line":
            groups.setdefault(source, {})[dest.replace("_", "-")] = getattr(args, dest)
    lines = [f"from {source}: {' '.join(to_flags(given))}" for source, given in groups.items()]
    overridden = [f"--{name} (by the {args.config_sources[name.replace('-', '_')]})"
                  for name in RULES.get(args.rule).factory.training_defaults
                  if args.config_sources.get(name.replace("-", "_"), f"rule {args.rule}")
                  != f"rule {args.rule}"]  # not given: the rule's own default
    if overridden:
        lines.append(f"rule {args.rule}'s defaults overridden: {', '.join(overridden)}")
    return lines


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    ) or torch.backends.mps.is_available()


def summary(record: dict[str, Any]) -> str:
    """A short table of what a run gave.

    ``final-head acc`` is the record's ``test_acc``: the network's prediction, the last
    part's (the model's own head, trained on the last block's output under a local rule).
    Under a local rule it can sit below every auxiliary head, so the best depth is shown
    beside it.
    """
    named = [(n, a) for n, a in zip(record["stack"]["blocks"], record["block_acc"], strict=True)
             if a is not None]
    best = max(named, key=lambda depth: depth[1], default=None)
    rows = [
        ("rule", "model", "dataset", "epochs", "final-head acc", "best depth", "seconds"),
        (record["rule"], record["model"], record["dataset"], str(record["config"]["epochs"]),
         "-" if record["test_acc"] is None else f"{record['test_acc']:.4f}",
         f"{best[0]} {best[1]:.4f}" if best else "-",
         f"{record['seconds']:.1f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("accuracy at each depth: " + " | ".join(f"{n} {a:.3f}" for n, a in named))
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
        entries = list(registries[kind])
        width = max((len(e.name) for e in entries), default=0)  # plugins' long names too
        for entry in entries:
            paper = f"  [{entry.meta['paper']}]" if entry.meta.get("paper") else ""
            print(f"{entry.name:{width}s}  {entry.meta.get('summary', '')}{paper}")
            if kind == "rules" and entry.factory.training_defaults:
                print(f"{'':{width}s}  defaults: {' '.join(rule_flags(entry.name))}")


def _say(line: str) -> None:
    """One line to stderr in one write: ``print`` writes the text and its newline apart, and
    stderr writes through, so the stages of a pipelined run could splice their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    SIGTERM is handled like Ctrl-C: the record says ``interrupted``, the exit
    status is 143 (130 for Ctrl-C), and one line says why.
    """
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parse_args(argv)
        listed = [kind for kind in ("rules", "heads", "losses") if getattr(args, f"list_{kind}")]
        if listed:
            _print_registries(listed)
            return 0
        if args.check:
            _check(args)
            print("arguments ok", *_from_rule_and_preset(args), sep="\n")
            return 0
        started = time.perf_counter()
        record = run(args)
        from accelerate.state import PartialState

        if PartialState().is_main_process:
            print(summary(record))
            print(f"wall time {time.perf_counter() - started:.1f}s")
        return 0
    except LocallearnError as err:
        from .trainer import Diverged

        line = " ".join(str(err).splitlines())  # user text may hold line breaks
        _say(f"run.py: error: {line}")
        return EXIT_DIVERGED if isinstance(err, Diverged) else EXIT_BAD_INPUT
    except Terminated:
        _say("run.py: terminated")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _say("run.py: interrupted")
        return EXIT_INTERRUPTED
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
