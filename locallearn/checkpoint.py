"""Checkpoints: the whole training state at the end of an epoch, safe to load.

A checkpoint is a folder ``epoch0003/`` holding

- ``model.safetensors``: every parameter and buffer of the stack and of every
  part's objective (auxiliary heads, decoders), through safetensors, so
  loading weights runs no code;
- ``state.pt``: optimizer and scheduler states of the parts that were
  training, and the RNG states, loaded with ``torch.load(weights_only=True)``;
- ``meta.json``: the format version, the run's id, the epoch, what was
  trained (model, rule and its options, data, loop settings, the settings
  that change results), the seconds of fitting so far, the history so far
  and the observers' results.

It is written under a temporary name and renamed when complete, so a kill
while saving leaves the previous checkpoint intact (an interrupt removes the
half-written folder). A checkpoint folder belongs to one run: each checkpoint
names its run's id, a run holds the folder's lock while it writes there
(:func:`lock_folder`), and pruning only ever removes the run's own older checkpoints.
:class:`Checkpointer` is the observer that saves one after every epoch and
resumes from the newest.
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
        acc = trainer.accelerator
        if acc.is_main_process:
            save(trainer, self.directory, entry["epoch"], self.identity, self.keep,
                 self.run_id)
        acc.wait_for_everyone()

    def resume(self, trainer) -> int:
        """Restore ``trainer`` from the newest complete checkpoint, if any.

        Call it after every observer is registered (their states are restored too).

        Returns:
            The epochs already done (``trainer.start_epoch``).

        Raises:
            CheckpointError: the newest checkpoint is damaged or from another run.
        """
        found = complete(self.directory)
        if found:
            trainer.start_epoch = load(trainer, found[-1], self.identity, self.run_id)
        return trainer.start_epoch


def _tensors(trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, each stored once even when several modules share it."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in [("stack", trainer.stack)] + [
        (f"part{i}", p) for i, p in enumerate(trainer.parts)
    ]:
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
    of run ``run_id``'s checkpoints (other runs' are never touched)."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{epoch:04d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in _tensors(trainer).items()},
                  str(tmp / "model.safetensors"))
        os.chmod(tmp / "model.safetensors", file_mode())  # safetensors writes it 0600
        torch.save({
            "optimizers": {i: o.state_dict() for i, o in enumerate(trainer.optimizers) if o},
            "schedulers": {i: s.state_dict() for i, s in enumerate(trainer.schedulers) if s},
            "scalers": {i: s.state_dict() for i, s in enumerate(trainer.scalers) if s},  # fp16
            "rng": _rng_state(),
        }, tmp / "state.pt")
        write_json(tmp / "meta.json", {
            "format": FORMAT, "run_id": run_id, "epoch": epoch, "identity": identity,
            "seconds": trainer.fit_seconds(), "history": trainer.history,
            "observers": [o.state_dict() if hasattr(o, "state_dict") else None
                          for o in trainer.observers],
        })
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:  # an interrupt or a full disk: leave no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    own = [p for p in complete(directory) if run_of(p) == run_id]
    for old in own[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
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


def read_meta(path: str | Path, identity: dict[str, Any], run_id: str | None = None
              ) -> dict[str, Any]:
    """The validated ``meta.json`` of the checkpoint at ``path``.

    It must be well formed, consistent with itself (its folder's epoch, the
    history's length and epochs, the run's epochs) and of this run: the same
    identity, and the same run id when ``run_id`` is given.

    Raises:
        CheckpointError: unreadable, damaged, another format, or another run's.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where} is damaged: unreadable meta.json "
                              f"({' '.join(str(err).split())[:120]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is damaged: meta.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {_short(meta.get('format'))}; "
                              f"this locallearn reads format {FORMAT}")
    kinds: dict[str, Callable[[Any], bool]] = {
        "run_id": lambda v: isinstance(v, str) and bool(v),
        "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "identity": lambda v: isinstance(v, dict),
        "seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "history": lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
        "observers": lambda v: isinstance(v, list) and all(
            e is None or isinstance(e, dict) for e in v),
    }
    for key, ok in kinds.items():
        if not ok(meta.get(key)):
            raise CheckpointError(f"{where} is damaged: meta.json has a bad or missing "
                                  f"{key!r} ({_short(meta.get(key), 40)})")
    differs = differences(identity, meta["identity"])
    if differs:
        shown = "; ".join(f"{k} is {_short(t)} there, {_short(o)} here" for k, t, o in differs[:4])
        more = f"; and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise CheckpointError(f"{where} is from another run: {shown}{more}")
    if run_id is not None and meta["run_id"] != run_id:
        raise CheckpointError(f"{where} is from another run: run {meta['run_id']!r} there, "
                              f"{run_id!r} here")
    epoch, history = meta["epoch"], meta["history"]
    epochs = (identity.get("train") or {}).get("epochs")
    problem = None
    if path.name != f"{PREFIX}{epoch:04d}":
        problem = f"it says epoch {epoch} in folder {path.name}"
    elif isinstance(epochs, int) and epoch > epochs:
        problem = f"it says epoch {epoch} of a {epochs}-epoch run"
    elif [e.get("epoch") for e in history] != list(range(1, epoch + 1)):
        problem = f"it says epoch {epoch} but holds the history of {len(history)} epoch(s)"
    if problem:
        raise CheckpointError(f"{where} is damaged: {problem}")
    return meta


def _check_state(trainer, state: Any, epoch: int, where: str) -> None:
    """``state.pt`` must hold the optimizers of exactly the parts still training after
    ``epoch``, each having taken that many epochs' steps."""
    if not (isinstance(state, dict) and {"optimizers", "schedulers", "rng"} <= state.keys()
            and isinstance(state["optimizers"], dict) and isinstance(state["schedulers"], dict)
            and isinstance(state["rng"], dict)):
        raise CheckpointError(f"{where} is damaged: state.pt lacks the optimizer, scheduler "
                              "or RNG states")
    done, later = trainer.schedule[:epoch], trainer.schedule[epoch:]
    expected = {i for i, part in enumerate(trainer.parts)
                if any(p.requires_grad for p in part.parameters())
                and any(i in s for s in done) and any(i in s for s in later)}
    if set(state["optimizers"]) != expected or set(state["schedulers"]) != expected:
        raise CheckpointError(f"{where} is damaged: its optimizer states are of parts "
                              f"{sorted(state['optimizers'], key=str)}, but after epoch {epoch} "
                              f"parts {sorted(expected)} are training")
    steps = len(trainer.train_loader)
    for i in expected:
        taken = state["schedulers"][i].get("last_epoch") if isinstance(
            state["schedulers"][i], dict) else None
        epochs = sum(i in s for s in done)
        if not isinstance(taken, int) or not steps * (epochs - 1) < taken <= steps * epochs:
            raise CheckpointError(
                f"{where} is damaged: part {trainer.parts[i].part_name!r} has taken "
                f"{_short(taken, 20)} steps, not the {steps * epochs} of its {epochs} epoch(s) "
                f"up to epoch {epoch}")


def _read(file: Path, reader: Callable[[Path], Any], where: str) -> Any:
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

    Everything is validated (:func:`read_meta`, the saved state against the
    epoch) before anything is restored.

    Raises:
        CheckpointError: a damaged file, another format, or another run's checkpoint.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    meta = read_meta(path, identity, run_id)
    epoch = meta["epoch"]
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f)), where)
    state = _read(path / "state.pt", lambda f: torch.load(f, weights_only=True), where)
    own = _tensors(trainer)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{where} holds other weights than this model's")
    _check_state(trainer, state, epoch, where)
    try:
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(weights[name])
        for i in range(len(trainer.parts)):  # the parts that were training when it was saved
            if i in state["optimizers"]:
                trainer.activate(i)
                trainer.optimizers[i].load_state_dict(state["optimizers"][i])
                trainer.schedulers[i].load_state_dict(state["schedulers"][i])
                if trainer.scalers[i] is not None:
                    trainer.scalers[i].load_state_dict(state["scalers"][i])
            else:
                trainer.deactivate(i)
        _set_rng_state(state["rng"])
        for obs, obs_state in zip(trainer.observers, meta["observers"], strict=False):
            if obs_state is not None and hasattr(obs, "load_state_dict"):
                obs.load_state_dict(obs_state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{where} is damaged: its saved state does not fit this run "
                              f"({type(err).__name__}: {_short(str(err), 80)})") from None
    trainer.history[:] = meta["history"]
    trainer.elapsed = float(meta["seconds"])
    return epoch
