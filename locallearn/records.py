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

from .errors import OutputError
from .observers import Observer
from .version import __version__

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not kept apart there
    fcntl = None

RECORD_VERSION = 1
# What a record's ``status`` may say (docs/records.md explains each).
STATUSES = ("running", "complete", "diverged", "interrupted")


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


def _is_locallearn(folder: Path) -> bool:
    """Whether ``folder`` is locallearn's project root (its pyproject.toml names it)."""
    try:
        text = (folder / "pyproject.toml").read_text()
    except OSError:
        return False
    return re.search(r'^name\s*=\s*"locallearn"', text, re.MULTILINE) is not None


def git_commit(checkout: str | Path | None = None) -> str:
    """The commit of locallearn's own checkout, with ``+dirty`` if it has local changes.

    ``"unknown"`` when the package is not in a git checkout of its own: an
    installed copy, or a copy inside another repository (whose commit would say
    nothing about this code).

    Args:
        checkout: the folder holding the package (default: this package's).
    """
    checkout = Path(checkout or Path(__file__).parent.parent).resolve()

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != checkout or not _is_locallearn(checkout):
            return "unknown"
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha is None:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


class Lock:
    """An exclusive advisory lock on ``path``, held until :meth:`release` or the process ends.

    The lock file keeps the holder's pid, for the message of whoever is refused,
    and is deleted on release (while still locked), so finished runs leave no
    lock files; a killed run's stays behind, unlocked and harmless.

    Args:
        path: the lock file (created if missing; its folder must exist).
        what: what it guards, for the message ("checkpoint folder 'ckpt'").

    Raises:
        OutputError: another process holds it.
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            pid = self._file.read().strip() or "?"
            self._file.close()
            raise OutputError(f"{what} is in use by a running run (pid {pid})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self, remove: bool = True) -> None:
        """Let go of the lock (and delete its file, unless ``remove`` is false)."""
        if self._file.closed:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._file.close()

    @staticmethod
    def probe(path: str | Path, what: str) -> None:
        """Raise OutputError if a process holds the lock at ``path`` (take nothing)."""
        if Path(path).is_file():
            Lock(path, what).release(remove=False)


def record_name(rule: str, model: str, dataset: str, seed: int, tags: list[str] = ()) -> str:
    """A file name that says what ran: ``layerwise__resnet18__cifar10__seed0.json``, with
    ``tags`` before the seed (``layerwise__resnet18__cifar10__loss-predsim__seed0.json``)."""
    parts = [rule, model, dataset.split(":")[0], *tags, f"seed{seed}"]
    return "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p) for p in parts) + ".json"


def file_mode() -> int:
    """The mode a new file gets from ``open``: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically: a temp file in the same folder, then a rename.

    The file gets the mode ``open`` would give it (the umask's), not the temp file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(fd, file_mode())
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
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a run record file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a JSON run record, or truncated ({err})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a run record") from None
    if not isinstance(record, dict) or not {"rule", "model", "status"} <= record.keys():
        raise DataError(f"{path}: not a run record (needs rule, model, status)")
    if record.get("version") != RECORD_VERSION:
        raise DataError(f"{path}: record version {record.get('version')!r}; this locallearn "
                        f"reads version {RECORD_VERSION}")
    return record


def build_record(
    values: dict[str, Any],
    *,
    run_id: str | None,
    plugins: list[str],
    rule_paper: str,
    rule_options: dict[str, Any],
    model_options: dict[str, Any],
    train: dict[str, Any],
    sources: dict[str, str],
    stack,
    parts: list,
    hardware: dict[str, Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """A new run record, status ``running``, with no results yet.

    Args:
        values: the command line's flags recorded as given, by dest
            (:func:`locallearn.flags.recorded_values`).
        run_id: the run's id, shared with its checkpoints (None where not known:
            processes other than the main one, which write nothing).
        plugins: the ``--plugin`` files and modules loaded.
        rule_paper: the paper of the rule, from its registry entry.
        rule_options: the rule's resolved options (``Rule.describe()``).
        model_options: the keywords given to ``timm.create_model``.
        train: the loop's resolved settings (the TrainConfig as a dict).
        sources: where the value of each identity or setting flag of ``values`` that was
            set came from, by dest: ``"command line"``, ``"preset NAME"`` or ``"rule NAME"``
            (the rule's ``training_defaults``); one not in it has ``run.py``'s own default.
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
        "run_id": run_id,
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
        "config_sources": dict(sources),
        "versions": versions(),
        "hardware": hardware,
        "stack": {
            "blocks": stack.names, "granularity": values["granularity"],
            "num_blocks": values["blocks"] or (len(stack) if values.get("split_after") else None),
        },
        "parts": [
            {"name": p.part_name, "blocks": p.block_ids,
             "params": sum(q.numel() for q in p.parameters())}
            for p in parts
        ],
        "params": {"backbone": backbone, "auxiliary": auxiliary},
        "started": _now(),
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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RecordWriter(Observer):
    """Writes the run record at fit start and after every epoch (status ``running``).

    Put it after the observers whose results it records (the information plane),
    so each epoch's record holds that epoch's results. Its state (when the run
    started, when it was resumed) goes into checkpoints, so a resumed run's
    record keeps its first start and lists every resume.

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
        if status not in STATUSES:
            raise ValueError(f"record status {status!r} is not one of {STATUSES}")
        record = self.record
        record.update(status=status, **fields, **measurements(record["history"]))
        if self.plane is not None:
            record["plane_config"] = self.plane.describe()
            record["plane"] = self.plane.entries
        if self.main_process:
            record["path"] = str(write_json(self.path, record))

    def resumed(self, after_epoch: int) -> None:
        """Note that the run continues from its checkpoint of epoch ``after_epoch``."""
        self.record.setdefault("resumed", []).append({"after_epoch": after_epoch, "at": _now()})

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the first start and the resumes so far."""
        return {"started": self.record["started"], "resumed": self.record.get("resumed", [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record["started"] = state["started"]
        if state["resumed"]:
            self.record["resumed"] = list(state["resumed"])

    def on_fit_start(self, trainer) -> None:
        self.write("running")

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        self.write("running")
