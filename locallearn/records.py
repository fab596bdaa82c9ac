"""Run records: one JSON file per run, the single source of every table and figure.

:func:`build_record` lays a record out from its pieces and
:class:`RecordWriter`, an observer, rewrites it as the run goes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .observers import Observer
from .version import __version__

RECORD_VERSION = 1


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shaped a result, and the git commit if any."""
    import accelerate
    import timm
    import torch

    return {
        "locallearn": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def hardware(accelerator) -> dict[str, Any]:
    """The device, its name and the number of processes of ``accelerator``."""
    return {
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "num_processes": accelerator.num_processes,
    }


def device_name(device) -> str:
    """The GPU's name, or the CPU's."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the locallearn checkout, with ``+dirty`` if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record_name(rule: str, model: str, dataset: str, seed: int) -> str:
    """A file name that says what ran: ``layerwise__resnet18__cifar10__seed0.json``."""
    parts = [rule, model, dataset.split(":")[0], f"seed{seed}"]
    return "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p) for p in parts) + ".json"


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """Read and validate a run record.

    Raises:
        DataError: the file is missing, unreadable, truncated or not JSON, not a
            run record, or from a record version this locallearn does not read.
    """
    from .errors import DataError

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a JSON run record, or truncated ({err})") from None
    if not isinstance(record, dict) or not {"rule", "model", "status"} <= record.keys():
        raise DataError(f"{path}: not a run record (needs rule, model, status)")
    if record.get("version") != RECORD_VERSION:
        raise DataError(f"{path}: record version {record.get('version')!r}; this locallearn "
                        f"reads version {RECORD_VERSION}")
    return record


def build_record(
    values: dict[str, Any],
    *,
    plugins: list[str],
    rule_paper: str,
    rule_options: dict[str, Any],
    model_options: dict[str, Any],
    train: dict[str, Any],
    stack,
    parts: list,
    hardware: dict[str, Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """A new run record, status ``running``, with no results yet.

    Args:
        values: the command line's flags recorded as given, by dest
            (:func:`locallearn.flags.recorded_values`).
        plugins: the ``--plugin`` files and modules loaded.
        rule_paper: the paper of the rule, from its registry entry.
        rule_options: the rule's resolved options (``Rule.describe()``).
        model_options: the keywords given to ``timm.create_model``.
        train: the loop's resolved settings (the TrainConfig as a dict).
        stack: the BlockStack trained.
        parts: the rule's LocalParts.
        hardware: see :func:`hardware`.
        history: the trainer's history list (the record keeps this very list, so it
            grows with the run).
    """
    backbone = sum(p.numel() for p in stack.parameters())
    in_stack = {id(p) for p in stack.parameters()}
    auxiliary = sum(p.numel() for part in parts for p in part.parameters()
                    if id(p) not in in_stack)
    return {
        "version": RECORD_VERSION,
        "status": "running",
        "rule": values["rule"],
        "rule_paper": rule_paper,
        "model": values["model"],
        "dataset": values["dataset"],
        "seed": values["seed"],
        "deterministic": values["deterministic"],
        "config": {
            **values,
            "plugins": list(plugins),
            "milestones": list(values["milestones"]),
            "rule_options": rule_options,
            "model_options": model_options,
            "train": train,
        },
        "versions": versions(),
        "hardware": hardware,
        "stack": {
            "blocks": stack.names, "granularity": values["granularity"],
            "num_blocks": values["blocks"],
        },
        "parts": [
            {"name": p.part_name, "blocks": p.block_ids,
             "params": sum(q.numel() for q in p.parameters())}
            for p in parts
        ],
        "params": {"backbone": backbone, "auxiliary": auxiliary},
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
        "test_acc": None,
        "block_acc": None,
        "seconds": None,
    }


def measurements(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Activation memory (max over epochs) and mean seconds per epoch, for the record."""
    def peak(key: str) -> int | None:
        return max((e[key] for e in history if key in e), default=None)

    seconds = [e["seconds"] for e in history]
    return {
        "memory": {"saved_bytes_peak": peak("saved_bytes_peak"),
                   "cuda_max_memory": peak("cuda_max_memory")},
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None,
    }


class RecordWriter(Observer):
    """Writes the run record at fit start and after every epoch (status ``running``).

    Put it after the observers whose results it records (the information plane),
    so each epoch's record holds that epoch's results.

    Args:
        record: the record, from :func:`build_record`; updated in place.
        path: the file to write.
        plane: the information-plane observer whose entries go into the record, if any.
        main_process: whether this process writes (only the main process does).
    """

    def __init__(self, record: dict[str, Any], path: str | Path, plane=None,
                 main_process: bool = True):
        self.record, self.path, self.plane = record, Path(path), plane
        self.main_process = main_process

    def write(self, status: str, **fields: Any) -> None:
        """Set ``status`` and ``fields``, refresh the measurements and plane, write the file."""
        record = self.record
        record.update(status=status, **fields, **measurements(record["history"]))
        if self.plane is not None:
            record["plane_config"] = self.plane.describe()
            record["plane"] = self.plane.entries
        if self.main_process:
            record["path"] = str(write_json(self.path, record))

    def on_fit_start(self, trainer) -> None:
        self.write("running")

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        self.write("running")
