"""Checkpoints: the whole training state at the end of an epoch, safe to load.

A folder ``epoch0003/`` of the executor's ``files`` (weights through safetensors, the
trainer's state and RNG states for ``torch.load(weights_only=True)``) and a
``meta.json``; written under a temporary name and renamed when complete. The files,
what a resume checks and why no pickle is loaded (so not Accelerate's ``save_state``):
docs/reliability.md.
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
META = ("history", "seconds", "observers")  # the trainer's state kept in meta.json
# meta.json's fields and their types ("stages": pipelined runs only)
_FIELDS = {"run_id": str, "epoch": int, "identity": dict, "seconds": (int, float),
           "observers": list, "history": list, "stages": list}


class CheckpointError(LocallearnError):
    """A checkpoint that is missing, damaged, or from another run."""


class Checkpointer(Observer):
    """Saves the training state after every epoch (the newest ``keep`` checkpoints of run
    ``run_id``, each with the run's ``identity``: model, rule, data and settings, which a
    resumed run must match); resumes from the newest checkpoint.

    Register it after the observers whose state it saves (the information plane) and
    after the record writer, so a checkpoint never holds an epoch the record has not shown.
    """

    def __init__(self, directory: str | Path, keep: int, identity: dict[str, Any],
                 run_id: str):
        self.directory, self.keep, self.identity = Path(directory), keep, identity
        self.run_id = run_id

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        save(trainer, self.directory, entry["epoch"], self.identity, self.keep, self.run_id)

    def resume(self, trainer) -> int:
        """Restore ``trainer`` from the newest checkpoint, if any (call it once every
        observer is registered: their states are restored too); returns the epochs done.

        Raises:
            CheckpointError: the newest checkpoint is damaged or from another run.
        """
        newest = _newest(self.directory)
        if newest is not None:
            load(trainer, newest, self.identity, self.run_id)
        return trainer.start_epoch


def _world() -> tuple[int, int]:
    """This process's rank and the number of processes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_main(value: Any) -> Any:
    """Process 0's ``value``, on every process."""
    shared = [value]
    if _world()[1] > 1:
        dist.broadcast_object_list(shared, 0)
    return shared[0]


def _newest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` as process 0 sees it, on every process."""
    found = complete(directory)
    return _from_main(found[-1] if found else None)


def _executor(ex) -> tuple[int, int]:
    """(stages, replicas) of the executor ``ex``: (0, 1) when serial."""
    return (0, 1) if ex.stage_parts is None else (len(ex.stage_parts), ex.replicas)


def _tensors(executor) -> dict[str, torch.Tensor]:
    """The parameters and buffers this process saves, each once (the stack and the parts
    share them)."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in executor.saved_modules():
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


def save(trainer, directory: str | Path, epoch: int, identity: dict[str, Any], keep: int,
         run_id: str) -> Path:
    """Write the state after ``epoch`` (1-based) into ``directory``; keep the newest ``keep``
    of run ``run_id``'s checkpoints (never another run's). Every process calls it; each
    that ``writes`` (the serial run's first; replica 0 of each stage, with every replica's
    RNG) writes its files, then process 0 writes ``meta.json`` and renames the folder."""
    rank, processes = _world()
    ex, state = trainer.executor, trainer.state_dict()
    meta = {"format": FORMAT, "run_id": run_id, "epoch": epoch, "identity": identity,
            **{key: state.pop(key) for key in META}}
    state["rng"] = _rng_state()
    stages, replicas = _executor(ex)
    if stages:
        meta["stages"], meta["replicas"] = ex.stage_parts, replicas
    if replicas > 1:
        state["replica_rng"] = [None] * replicas
        dist.all_gather_object(state["replica_rng"], state["rng"], group=ex.group)
    directory = Path(directory)
    final = directory / f"{PREFIX}{epoch:04d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        tmp = Path(_from_main(str(tmp)))  # made before any process writes into it
        if ex.writes:
            weights, states = ex.files
            save_file({k: v.contiguous() for k, v in _tensors(ex).items()}, str(tmp / weights))
            os.chmod(tmp / weights, file_mode())  # safetensors writes it 0600
            torch.save(state, tmp / states)
        if processes > 1:
            dist.barrier()  # every process's files are written
        if rank == 0:
            write_json(tmp / "meta.json", meta)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:  # an interrupt or a full disk: leave no half-written folder
        if rank == 0:  # (a stage that fails alone leaves it to the next run that takes the folder)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        own = [p for p in complete(directory) if run_of(p) == run_id]
        for old in own[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if processes > 1:
        dist.barrier()
    return final


def _meta_json(path: str | Path) -> Any:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def run_of(path: str | Path) -> str | None:
    """The id of the run that wrote the checkpoint at ``path`` (None if unreadable)."""
    meta = _meta_json(path)
    return meta.get("run_id") if isinstance(meta, dict) else None


def lock_folder(directory: str | Path) -> Lock:
    """Take the checkpoint folder (made if missing): its lock, held while the run writes
    there. Half-written checkpoints a killed run left are removed (no one else writes them).

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
    found = Path(directory).glob(f"{PREFIX}[0-9][0-9][0-9][0-9]")  # none if not a folder
    return sorted(p for p in found if (p / "meta.json").is_file())


def differences(ours: Any, theirs: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, theirs, ours)`` for every leaf where two identities differ (dotted keys)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(ours) | set(theirs), key=str)
                for d in differences(ours.get(k), theirs.get(k), f"{key}.{k}" if key else k)]
    return [] if ours == theirs else [(key, theirs, ours)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _described(stages: int, replicas: Any) -> str:
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
    path, meta = Path(path), _meta_json(path)
    where = f"checkpoint {str(path)!r}"
    if isinstance(meta, dict) and meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {_short(meta.get('format'))}; "
                              f"this locallearn reads format {FORMAT}")
    # A damaged or hand-edited meta.json is one line, whichever field is off.
    if not (isinstance(meta, dict) and all(
            isinstance(meta.get(k, [] if k == "stages" else None), kind)
            for k, kind in _FIELDS.items())
            and path.name == f"{PREFIX}{meta['epoch']:04d}"
            and len(meta["history"]) == meta["epoch"]):
        raise CheckpointError(f"{where} is damaged: its meta.json is not one this run wrote")
    cut = meta.get("stages", [])
    identity = json.loads(json.dumps(identity))  # as meta.json holds it (tuples: lists)
    differs = differences(identity | {"executor": _described(stages, replicas)},
                          meta["identity"] | {"executor": _described(len(cut),
                                                                     meta.get("replicas", 1))})
    if run_id is not None and meta["run_id"] != run_id:
        differs.insert(0, ("run", meta["run_id"], run_id))
    if differs:
        shown = "; ".join(f"{k} is {_short(t)} there, {_short(o)} here" for k, t, o in differs[:4])
        more = f"; and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise CheckpointError(f"{where} is from another run: {shown}{more}")
    return meta


def saved_stages(directory: str | Path, identity: dict[str, Any], stages: int,
                 replicas: int = 1) -> list[list[int]] | None:
    """The stage cut of the newest checkpoint in ``directory`` (None if none), which a
    resumed pipelined run of ``stages`` x ``replicas`` processes reuses.

    Raises:
        CheckpointError: on every process: damaged, another run's, or another executor's.
    """
    newest = _newest(directory)
    return _everywhere(lambda: newest and read_meta(newest, identity, stages=stages,
                                                    replicas=replicas)["stages"])


def _everywhere(read: Callable[[], Any]) -> Any:
    """``read()`` on every process; if it fails on any, all raise its error (a run that
    fails to resume stops everywhere, so a state restored in part is never trained on)."""
    try:
        value, error = read(), None
    except CheckpointError as err:
        value, error = None, str(err)
    errors = [error]
    if _world()[1] > 1:
        errors = [None] * _world()[1]
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise CheckpointError(first)
    return value


def load(trainer, path: str | Path, identity: dict[str, Any], run_id: str | None = None) -> int:
    """Restore ``trainer`` from the checkpoint at ``path`` (every process its own parts);
    returns the epoch it ends.

    Raises:
        CheckpointError: on every process, when any finds a damaged file, another format,
            or another run's checkpoint.
    """
    return _everywhere(lambda: _load(trainer, Path(path), identity, run_id))


def _load(trainer, path: Path, identity: dict[str, Any], run_id: str | None) -> int:
    ex = trainer.executor
    stages, replicas = _executor(ex)
    meta = read_meta(path, identity, run_id, stages, replicas)
    weights_file, state_file = ex.files
    own = _tensors(ex)
    try:
        with warnings.catch_warnings():  # a hostile file's warnings are not the user's news
            warnings.simplefilter("ignore")
            weights = load_file(str(path / weights_file))
            state = torch.load(path / state_file, weights_only=True)
        if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
            raise ValueError("other weights")  # copy_ would broadcast a smaller tensor
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(weights[name])
        trainer.load_state_dict(state | {key: meta[key] for key in META})
        _set_rng_state(state["replica_rng"][ex.replica] if replicas > 1 else state["rng"])
    except Exception as err:  # noqa: BLE001 - a file missing, unreadable or not this run's
        # Not the loader's own text: torch's advice to load with weights_only=False
        # (running arbitrary code) must not be shown next to a file that may be hostile.
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its files cannot be "
                              f"loaded safely into this run ({type(err).__name__})") from None
    return meta["epoch"]
