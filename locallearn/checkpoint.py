"""Checkpoints: the whole training state at the end of an epoch, safe to load.

A checkpoint is a folder ``epoch0003/``: ``model.safetensors`` (every parameter
and buffer, through safetensors, so loading weights runs no code), ``state.pt``
(the optimizer, scheduler and fp16 scaler states of the parts still training, and
the RNG states, read with ``torch.load(weights_only=True)``) and ``meta.json``
(the run's id, the epoch, the run's identity, the seconds, history and observers'
results so far). A pipelined run's stages each write ``stage{s}.safetensors`` and
``stage{s}.pt`` instead (replica 0 of a stage, with every replica's RNG states),
and ``meta.json`` holds the stage cut; every process must see the one folder.
docs/reliability.md describes the files and what a resume checks.

It is written under a temporary name and renamed when complete, so a kill
while saving leaves the previous checkpoint intact. A checkpoint folder belongs
to one run: a run holds the folder's lock while it writes there
(:func:`lock_folder`), and pruning only removes the run's own older checkpoints.
Accelerate's ``save_state`` is not used because its RNG states are pickles,
which only unrestricted ``torch.load`` reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .errors import LocallearnError
from .observers import Observer
from .records import Lock, file_mode, write_json

FORMAT = 2  # 2: meta.json names the run (run_id)
PREFIX = "epoch"
LOCK = ".lock"


class CheckpointError(LocallearnError):
    """A checkpoint that is missing, damaged, or from another run."""


class Checkpointer(Observer):
    """Saves the training state after every epoch; resumes from the newest checkpoint.

    Register it after the observers whose state it saves (the information plane)
    and after the record writer, so a checkpoint never holds an epoch the record
    has not shown yet.

    Args:
        directory: where the checkpoints go.
        keep: how many to keep (the newest).
        identity: model, rule, data and settings, stored with each checkpoint; a
            checkpoint is resumed only under the same identity.
        run_id: the run's id, stored with each checkpoint; pruning only removes
            checkpoints with this id.
    """

    def __init__(self, directory: str | Path, keep: int, identity: dict[str, Any],
                 run_id: str):
        self.directory, self.keep, self.identity = Path(directory), keep, identity
        self.run_id = run_id

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        save(trainer, self.directory, entry["epoch"], self.identity, self.keep, self.run_id)

    def resume(self, trainer) -> int:
        """Restore ``trainer`` from the newest complete checkpoint, if any.

        Call it after every observer is registered (their states are restored too).

        Returns:
            The epochs already done (``trainer.start_epoch``).

        Raises:
            CheckpointError: the newest checkpoint is damaged or from another run.
        """
        found = complete(self.directory)
        newest = _from_main(found[-1] if found else None)  # every process reads process 0's
        if newest is not None:
            trainer.start_epoch = load(trainer, newest, self.identity, self.run_id)
        return trainer.start_epoch


def _from_main(value: Any) -> Any:
    """Process 0's ``value``, on every process (of several)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, 0)
    return shared[0]


def _tensors(trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, each stored once even when several modules share it
    (on a pipeline's stage: those of its own parts)."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in trainer.executor.saved_modules():
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                named[f"{prefix}.{name}"] = t.detach()
    return named


def _rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _meta(trainer, epoch: int, identity: dict[str, Any], run_id: str) -> dict[str, Any]:
    meta = {
        "format": FORMAT, "run_id": run_id, "epoch": epoch, "identity": identity,
        "seconds": trainer.fit_seconds(), "history": trainer.history,
        "observers": [o.state_dict() if hasattr(o, "state_dict") else None
                      for o in trainer.observers],
    }
    if trainer.executor.stage_parts is not None:  # pipelined
        meta["stages"], meta["replicas"] = trainer.executor.stage_parts, trainer.executor.replicas
    return meta


def _write_state(trainer, folder: Path) -> None:
    """This process's weights file and state file, into ``folder`` (a pipeline's replicas
    of a stage hold replica 0's weights: only it writes, with every replica's RNG)."""
    ex = trainer.executor
    weights, state = ex.files
    rngs = None
    if ex.stage_parts is not None and ex.replicas > 1:
        rngs = [None] * ex.replicas
        dist.all_gather_object(rngs, _rng_state(), group=ex.group)
    if not ex.writes:
        return
    save_file({k: v.contiguous() for k, v in _tensors(trainer).items()}, str(folder / weights))
    os.chmod(folder / weights, file_mode())  # safetensors writes it 0600
    # The parts still training (a part drops its optimizer after its last epoch).
    torch.save({
        "optimizers": {i: o.state_dict() for i, o in enumerate(trainer.optimizers) if o},
        "schedulers": {i: s.state_dict() for i, s in enumerate(trainer.schedulers) if s},
        "scalers": {i: s.state_dict() for i, s in enumerate(trainer.scalers) if s},  # fp16
        "rng": _rng_state(),
        **({"replica_rng": rngs} if rngs else {}),
    }, folder / state)


def save(trainer, directory: str | Path, epoch: int, identity: dict[str, Any], keep: int,
         run_id: str) -> Path:
    """Write the state after ``epoch`` (1-based) into ``directory``; keep the newest ``keep``
    of run ``run_id``'s checkpoints (other runs' are never touched).

    Every process calls it: process 0 makes the temporary folder, each process that
    writes files (the serial run's first; a pipeline's every stage) writes its own into
    it, then process 0 writes ``meta.json``, renames the folder into place and prunes;
    it returns on every process once the checkpoint is in place.
    """
    directory = Path(directory)
    final = directory / f"{PREFIX}{epoch:04d}"
    several = trainer.accelerator.num_processes > 1
    main = trainer.accelerator.is_main_process
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        tmp = Path(_from_main(str(tmp)))  # made before any process writes into it
        _write_state(trainer, tmp)
        if several:
            dist.barrier()  # every process's files are written
        if main:
            write_json(tmp / "meta.json", _meta(trainer, epoch, identity, run_id))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:  # an interrupt or a full disk: leave no half-written folder
        if main:  # (a stage that fails alone leaves it to the next run that takes the folder)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        own = [p for p in complete(directory) if run_of(p) == run_id]
        for old in own[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if several:
        dist.barrier()
    return final


def run_of(path: str | Path) -> str | None:
    """The id of the run that wrote the checkpoint at ``path`` (None if unreadable)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("run_id") if isinstance(meta, dict) else None


def lock_folder(directory: str | Path) -> Lock:
    """Take the checkpoint folder for this process (made if missing): returns the lock,
    held while the run writes there. Half-written checkpoints left by a killed run
    are removed (holding the lock, no one else is writing them).

    Raises:
        OutputError: another running run holds the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = Lock(directory / LOCK, f"checkpoint folder {str(directory)!r}")
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return lock


def complete(directory: str | Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (half-written ones are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f"{PREFIX}[0-9][0-9][0-9][0-9]"
    found = [p for p in directory.glob(pattern) if (p / "meta.json").is_file()]
    return sorted(found)


def differences(ours: Any, theirs: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, theirs, ours)`` for every leaf where two identities differ (dotted keys)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(ours) | set(theirs), key=str)
                for d in differences(ours.get(k), theirs.get(k), f"{key}.{k}" if key else k)]
    return [] if ours == theirs else [(key, theirs, ours)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _executor(stages: int, replicas: Any) -> str:
    return f"pipelined, {stages} stages x {replicas} replicas" if stages else "serial"


def read_meta(path: str | Path, identity: dict[str, Any], run_id: str | None = None,
              stages: int = 0, replicas: int = 1) -> dict[str, Any]:
    """The ``meta.json`` of the checkpoint at ``path``, checked to be this run's: the same
    identity and executor (serial: ``stages`` 0; else pipelined in ``stages`` stages of
    ``replicas`` replicas), the same run id when ``run_id`` is given, and the epoch of its
    folder, with that many epochs of history.

    Raises:
        CheckpointError: unreadable, damaged, another format, or another run's.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is damaged: meta.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {_short(meta.get('format'))}; "
                              f"this locallearn reads format {FORMAT}")
    epoch, history, cut = meta.get("epoch"), meta.get("history"), meta.get("stages", [])
    bad = next((key for key, ok in (
        ("run_id", isinstance(meta.get("run_id"), str)),
        ("identity", isinstance(meta.get("identity"), dict)),
        ("seconds", isinstance(meta.get("seconds"), (int, float))),
        ("observers", isinstance(meta.get("observers"), list)),
        ("epoch", isinstance(epoch, int) and path.name == f"{PREFIX}{epoch:04d}"),
        ("history", isinstance(history, list) and len(history) == epoch),
        ("stages", isinstance(cut, list) and all(isinstance(s, list) for s in cut)),
    ) if not ok), None)
    if bad:
        raise CheckpointError(f"{where} is damaged: meta.json has a bad or missing {bad!r} "
                              f"({_short(meta.get(bad), 40)})")
    saved = _executor(len(cut), meta.get("replicas", 1))
    differs = differences(identity | {"executor": _executor(stages, replicas)},
                          meta["identity"] | {"executor": saved})
    if run_id is not None and meta["run_id"] != run_id:
        differs.insert(0, ("run", meta["run_id"], run_id))
    if differs:
        shown = "; ".join(f"{k} is {_short(t)} there, {_short(o)} here" for k, t, o in differs[:4])
        more = f"; and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise CheckpointError(f"{where} is from another run: {shown}{more}")
    return meta


def saved_stages(directory: str | Path, identity: dict[str, Any], stages: int,
                 replicas: int = 1) -> list[list[int]] | None:
    """The stage cut of the newest checkpoint in ``directory`` (None if there is none), as
    process 0 reads it, on every process of a pipelined run of ``stages`` stages of
    ``replicas`` replicas: a resumed run cuts its parts as the run it continues did
    (:class:`~locallearn.pipeline.PipelineExecutor` refuses a cut that is not one).

    Raises:
        CheckpointError: on every process, when the newest checkpoint is damaged, another
            run's, or not of a pipelined run of as many stages and replicas.
    """
    answer: tuple[str, Any] = ("cut", None)
    if dist.get_rank() == 0:
        found = complete(directory)
        try:
            if found:
                answer = ("cut", read_meta(found[-1], identity, stages=stages,
                                           replicas=replicas)["stages"])
        except CheckpointError as err:
            answer = ("error", str(err))
    kind, value = _from_main(answer)
    if kind == "error":
        raise CheckpointError(value)
    return value


def _read(file: Path, reader: Callable[[Path], Any], where: str) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{where} has no {file.name}: every process must see the one "
                              "checkpoint folder (one machine, or a shared file system)")
    try:
        with warnings.catch_warnings():  # a hostile file's warnings are not the user's news
            warnings.simplefilter("ignore")
            return reader(file)
    except Exception as err:  # noqa: BLE001 - any failure to read a file is damage
        # Not the loader's own text: torch's advice to load with weights_only=False
        # (running arbitrary code) must not be shown next to a file that may be hostile.
        raise CheckpointError(f"{where} is damaged: {file.name} cannot be read safely "
                              f"({type(err).__name__})") from None


def load(trainer, path: str | Path, identity: dict[str, Any], run_id: str | None = None) -> int:
    """Restore ``trainer`` from the checkpoint at ``path``; returns the epoch it ends.

    Under several processes every process calls it, each restoring its own parts; if
    any fails, all raise its error (a run that fails to resume stops, so a state
    restored in part is never trained on).

    Raises:
        CheckpointError: a damaged file, another format, or another run's checkpoint.
    """
    if trainer.accelerator.num_processes == 1:
        return _load(trainer, Path(path), identity, run_id)
    try:
        epoch, error = _load(trainer, Path(path), identity, run_id), None
    except CheckpointError as err:
        epoch, error = 0, str(err)
    errors: list[str | None] = [None] * trainer.accelerator.num_processes
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise CheckpointError(first)
    return epoch


def _load(trainer, path: Path, identity: dict[str, Any], run_id: str | None) -> int:
    where = f"checkpoint {str(path)!r}"
    ex = trainer.executor
    staged = ex.stage_parts is not None
    meta = read_meta(path, identity, run_id, len(ex.stage_parts) if staged else 0,
                     ex.replicas if staged else 1)
    weights_file, state_file = ex.files
    weights = _read(path / weights_file, lambda f: load_file(str(f)), where)
    state = _read(path / state_file, lambda f: torch.load(f, weights_only=True), where)
    own = _tensors(trainer)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{where} holds other weights than this "
                              f"{'stage' if staged else 'model'}'s")
    try:
        optimizers, schedulers = state["optimizers"], state["schedulers"]
        rng = state["replica_rng"][ex.replica] if staged and ex.replicas > 1 else state["rng"]
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(weights[name])
        for i in trainer.owned:  # the parts that were training when it was saved train on
            if i in optimizers:
                trainer.activate(i)
                trainer.optimizers[i].load_state_dict(optimizers[i])
                trainer.schedulers[i].load_state_dict(schedulers[i])
                if trainer.scalers[i] is not None:
                    trainer.scalers[i].load_state_dict(state["scalers"][i])
            else:
                trainer.deactivate(i)
        _set_rng_state(rng)
        for obs, obs_state in zip(trainer.observers, meta["observers"], strict=False):
            if obs_state is not None and hasattr(obs, "load_state_dict"):
                obs.load_state_dict(obs_state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{where} is damaged: its saved state does not fit this run "
                              f"({_short(err, 100)})") from None
    trainer.history[:] = meta["history"]
    trainer.elapsed = float(meta["seconds"])
    return meta["epoch"]
