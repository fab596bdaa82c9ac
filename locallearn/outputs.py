"""What a run writes, checked and taken before any work: the record and the checkpoints.

Every path is checked with the arguments (``run.py --check`` too); then a run takes
its files (:func:`claim`): the record and the checkpoint folder belong to one run,
named by its ``run_id``. Which files a run refuses, and why: docs/reliability.md
("A record and a checkpoint folder belong to one run").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from . import settings
from .checkpoint import LOCK, complete, lock_folder, read_meta
from .config import parse_assignments
from .errors import OutputError
from .records import Lock, RecordError, read_record, record_name, side_file

# Leaves room for the temp files written next to it (".NAME.XXXXXXXX.tmp") within
# the 255 bytes most file systems allow.
MAX_NAME_BYTES = 200
UNFINISHED = ("running", "interrupted")  # "running" here: killed, as no lock is held
IN_NAME = ("rule", "model", "dataset", "seed")  # the default name's fixed parts
# Past this, a default name's tags become one hash (well within MAX_NAME_BYTES).
MAX_DEFAULT_NAME = 120


def record_path(args: argparse.Namespace) -> Path:
    """Where the run's record goes: ``--output``/``--name`` (or :func:`default_name`)."""
    return Path(args.output) / (args.name or default_name(args))


def default_name(args: argparse.Namespace) -> str:
    """``rule__model__dataset[__TAG...]__seedN.json``, a tag for each identity setting that
    is not its default (:func:`identity_tags`), so runs that train differently get different
    names; one ``cfg-HASH`` tag stands for them when they would make the name long."""
    tags = identity_tags(args)
    name = record_name(args.rule, args.model, args.dataset, args.seed, tags)
    if len(name) > MAX_DEFAULT_NAME:
        digest = hashlib.sha256(json.dumps(tags).encode()).hexdigest()[:8]
        name = record_name(args.rule, args.model, args.dataset, args.seed, [f"cfg-{digest}"])
    return name


def identity_tags(args: argparse.Namespace) -> list[str]:
    """``NAME-VALUE`` for each identity flag (besides rule, model, data set and seed) whose
    value is not what the rule would run with, in ``run.py --help`` order; a rule option
    or model option given appears as ``KEY-VALUE``, a switch as its name alone.

    The defaults are the flags' own, or the rule's ``training_defaults``
    (``args.defaults``, set by :func:`locallearn.cli.parse_args`).
    """
    defaults = getattr(args, "defaults", None) or vars(settings.build_parser().parse_args([]))
    tags: list[str] = []
    for flag in settings.FLAGS:
        if flag.role != settings.IDENTITY or flag.dest in IN_NAME:
            continue
        if flag.dest == "rule_opt":
            tags += [_tag(k, v) for k, v in _rule_options(args).items()]
        elif flag.dest == "model_opt":
            tags += [_tag(k, v) for k, v in parse_assignments(args.model_opt).items()]
        elif getattr(args, flag.dest) != defaults.get(flag.dest):
            tags.append(_tag(flag.name, getattr(args, flag.dest)))
    return tags


def _rule_options(args: argparse.Namespace) -> dict[str, object]:
    """The rule's resolved options that differ from its defaults."""
    from .rules import create_rule

    given = parse_assignments(args.rule_opt)
    if not given:
        return {}
    ours, default = create_rule(args.rule, **given).describe(), create_rule(args.rule).describe()
    return {k: v for k, v in ours.items() if k not in default or default[k] != v}


def flag_tags(argv: list[str]) -> list[str]:
    """``NAME-VALUE`` for each identity or setting flag that ``argv`` gives, in ``run.py
    --help`` order: what a grid's extra flags change in every run of it."""
    given = vars(settings.build_parser(defaults=False).parse_args(argv))
    return [_tag(f.name, given[f.dest]) for f in settings.FLAGS
            if f.dest in given and f.role in (settings.IDENTITY, settings.SETTING)]


def _tag(name: str, value: object) -> str:
    if value is True:
        return name
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{name}-{value}"


def _lock_of(record: Path) -> Path:
    return record.parent / f".{record.name}.lock"


def check_folder(path: str | Path, flag: str) -> None:
    """``path`` is a folder the run can create or write into: tried, not guessed (as root,
    ``os.access`` says yes to ``/proc``), in a temporary folder of its own made in the
    nearest folder that exists (never removing a folder another process may be making):
    the folders still to be made are made there, then it is removed.

    Raises:
        OutputError: it is a file, or it cannot be made or written into (the system's why).
    """
    path = Path(path).expanduser()
    try:
        if path.is_file():
            raise OutputError(f"{flag} {str(path)!r} is a file; give a folder")
        there = next(p for p in (path, *path.parents) if p.exists())
        tmp = tempfile.mkdtemp(prefix=".locallearn-check-", dir=there)
        try:
            Path(tmp, path.relative_to(there)).mkdir(parents=True, exist_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        why = getattr(err, "strerror", None) or str(err)
        raise OutputError(f"{flag} {str(path)!r} cannot be made or written: {why}") from None


def check_paths(args: argparse.Namespace) -> None:
    """Every path the run will write: the record's folder and name, the checkpoint folder,
    the tracker's folder.

    Raises:
        OutputError: a bad ``--name``, or a folder that cannot be written.
    """
    name = args.name
    if name is not None:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise OutputError(f"--name must be a plain file name; got {name!r}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise OutputError(f"--name is {len(name.encode())} bytes long; at most "
                              f"{MAX_NAME_BYTES}")
    check_folder(args.output, "--output")
    if record_path(args).is_dir():
        raise OutputError(f"the record {str(record_path(args))!r} would replace a folder; "
                          "give another --name")
    if args.checkpoint_dir:
        check_folder(args.checkpoint_dir, "--checkpoint-dir")
    if args.project_dir:
        check_folder(args.project_dir, "--project-dir")


def resumed_run(args: argparse.Namespace, identity: dict[str, Any], probe: bool = True
                ) -> str | None:
    """The id of the run ``--resume`` continues (None: a new run); checks the checkpoint
    folder is free (``probe``: not when this process holds its lock) and, unless resuming,
    empty of checkpoints.

    Raises:
        OutputError, CheckpointError: in use, another run's, or not resumable.
    """
    if not args.checkpoint_dir:
        return None
    folder = Path(args.checkpoint_dir)
    if probe:
        Lock.probe(folder / LOCK, f"checkpoint folder {str(folder)!r}")
    found = complete(folder)
    if not found:
        return None
    if not args.resume:
        raise OutputError(
            f"checkpoint folder {str(folder)!r} holds another run's checkpoints "
            f"({', '.join(p.name for p in found[-3:])}); pass --resume to continue that run, "
            "or choose an empty --checkpoint-dir")
    # A pipelined run resumes a pipelined checkpoint of as many processes, a serial run a
    # serial one (torchrun's WORLD_SIZE: read before any process group exists).
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    stages = (args.stages or processes) if args.parallel == "parts" else 0
    replicas = processes // stages if stages else 1
    return read_meta(found[-1], identity, stages=stages, replicas=replicas)["run_id"]


def check_record(args: argparse.Namespace, resumes: str | None, probe: bool = True) -> bool:
    """Whether the run (continuing the run ``resumes``, if any) replaces another run's
    record, or another file, by ``--overwrite``; then it writes its own beside it until it
    finishes (:class:`~locallearn.records.RecordWriter`). ``probe``: as :func:`resumed_run`.

    Raises:
        OutputError: the record is another run's (see the module's docstring).
    """
    path = record_path(args)
    if not path.exists():
        return False
    if probe:
        Lock.probe(_lock_of(path), f"the record {str(path)!r}")
    try:
        record = read_record(path)
    except RecordError as err:
        record = err.record  # a record with a field of the wrong type still says whose
    status = record.get("status") if record else None
    if resumes is not None and record and record.get("run_id") == resumes:
        return False  # the run's own record
    if args.overwrite:
        return True
    if args.resume and resumes is None and status in UNFINISHED:
        return False  # nothing saved to resume from: the unfinished run starts again
    what = (f"another run's record ({status})" if isinstance(status, str)
            else "a file that is not a run record")
    raise OutputError(f"{str(path)!r} holds {what}; pass --overwrite to replace it, or choose "
                      "another --name or --output")


def claim(args: argparse.Namespace, identity: dict[str, Any]
          ) -> tuple[str, bool, list[Lock]]:
    """Take the record and the checkpoint folder for this run (the main process only):
    its run id, whether it replaces another run's record, and the locks it holds.

    Locks first, then checks again under the locks, so two runs started at
    once cannot both pass. A record left beside this one by a replacing run that
    never finished (:func:`~locallearn.records.side_file`) is removed.
    """
    path = record_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    locks = [Lock(_lock_of(path), f"the record {str(path)!r}")]
    try:
        if args.checkpoint_dir:
            locks.append(lock_folder(args.checkpoint_dir))
        resumes = resumed_run(args, identity, probe=False)
        replaces = check_record(args, resumes, probe=False)
        side_file(path).unlink(missing_ok=True)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return resumes or uuid.uuid4().hex[:16], replaces, locks
