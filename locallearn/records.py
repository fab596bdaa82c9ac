"""Run records: one JSON file per run, the single source of every table and figure."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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
