"""Checkpoints: the whole training state at the end of an epoch, safe to load.

A checkpoint is a folder ``epoch0003/`` holding

- ``model.safetensors``: every parameter and buffer of the stack and of every
  part's objective (auxiliary heads, decoders), through safetensors, so
  loading weights runs no code;
- ``state.pt``: optimizer and scheduler states of the parts that were
  training, and the RNG states, loaded with ``torch.load(weights_only=True)``;
- ``meta.json``: the format version, the epoch, what was trained (model,
  rule and its options, data, loop settings), the history so far and the
  observers' results.

It is written under a temporary name and renamed when complete, so a kill
while saving leaves the previous checkpoint intact; old ones are pruned.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LocallearnError
from .observers import Observer
from .records import write_json

FORMAT = 1
PREFIX = "epoch"


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
    """

    def __init__(self, directory: str | Path, keep: int, identity: dict[str, Any]):
        self.directory, self.keep, self.identity = Path(directory), keep, identity

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        acc = trainer.accelerator
        if acc.is_main_process:
            save(trainer, self.directory, entry["epoch"], self.identity, self.keep)
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
            trainer.start_epoch = load(trainer, found[-1], self.identity)
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


def save(trainer, directory: str | Path, epoch: int, identity: dict[str, Any], keep: int) -> Path:
    """Write the state after ``epoch`` (1-based) into ``directory``; keep the newest ``keep``."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{epoch:04d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in _tensors(trainer).items()},
              str(tmp / "model.safetensors"))
    torch.save({
        "optimizers": {i: o.state_dict() for i, o in enumerate(trainer.optimizers) if o},
        "schedulers": {i: s.state_dict() for i, s in enumerate(trainer.schedulers) if s},
        "rng": _rng_state(),
    }, tmp / "state.pt")
    write_json(tmp / "meta.json", {
        "format": FORMAT, "epoch": epoch, "identity": identity, "history": trainer.history,
        "observers": [o.state_dict() if hasattr(o, "state_dict") else None
                      for o in trainer.observers],
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: str | Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (half-written ones are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f"{PREFIX}[0-9][0-9][0-9][0-9]"
    found = [p for p in directory.glob(pattern) if (p / "meta.json").is_file()]
    return sorted(found)


def load(trainer, path: str | Path, identity: dict[str, Any]) -> int:
    """Restore ``trainer`` from the checkpoint at ``path``; returns the epoch it ends.

    Raises:
        CheckpointError: a damaged file, another format, or another run's checkpoint.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}; "
                              f"this locallearn reads format {FORMAT}")
    theirs = meta.get("identity", {})
    differs = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
    if differs:
        key = differs[0]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from another run: {key} is {theirs.get(key)!r} there, "
            f"{identity.get(key)!r} here"
        )
    epoch = int(meta["epoch"])
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: "
                              f"{' '.join(str(err).split())[:200]}") from None
    own = _tensors(trainer)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"checkpoint {str(path)!r} holds other weights than this model's")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(weights[name])
    for i in range(len(trainer.parts)):  # the parts that were training when it was saved
        if i in state["optimizers"]:
            trainer.activate(i)
            trainer.optimizers[i].load_state_dict(state["optimizers"][i])
            trainer.schedulers[i].load_state_dict(state["schedulers"][i])
        else:
            trainer.deactivate(i)
    _set_rng_state(state["rng"])
    trainer.history[:] = meta["history"]
    for obs, obs_state in zip(trainer.observers, meta.get("observers", []), strict=False):
        if obs_state is not None and hasattr(obs, "load_state_dict"):
            obs.load_state_dict(obs_state)
    return epoch
