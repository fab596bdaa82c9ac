"""Run records: one JSON file per run, the single source of every table and figure.

One writer: :func:`build_record` lays a record out and :class:`RecordWriter`, an
observer, writes it (atomically) as the run goes. One reader: :func:`read_record`
reads a record and checks the fields every reader relies on (:data:`FIELDS`), so the
leaderboard, the figures, ``run.py`` and the tests meet a bad record with the same
one-line error naming the file and the field.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DataError, OutputError
from .observers import Observer
from .version import __version__

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not kept apart there
    fcntl = None

RECORD_VERSION = 1
# What a record's ``status`` may say (docs/records.md explains each).
STATUSES = ("running", "complete", "diverged", "interrupted")
# The measures every ``plane`` entry stores (docs/information_plane.md).
PLANE_FORMS = ("nhsic_x", "nhsic_y", "nhsic_x_scaled", "nhsic_y_scaled", "cka_x", "cka_y")
# No number in a record comes near this (every form of the plane is at most the probe
# size, or 1; bytes stay far below): a larger one is corrupt, and one near the largest
# float overflows a figure's axes.
LARGEST = 1e15


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shaped a result, and the git commit if any."""
    import accelerate
    import timm
    import torch

    return {"locallearn": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}


def hardware(accelerator) -> dict[str, Any]:
    """The device, its name (the GPU's, or the CPU's) and the number of processes."""
    import torch

    device = accelerator.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name,
            "num_processes": accelerator.num_processes}


def git_commit(checkout: str | Path | None = None) -> str:
    """The commit of locallearn's own checkout (``checkout``: default, the folder above this
    package), with ``+dirty`` if it has local changes.

    ``"unknown"`` when that folder is not the top of a git checkout: an installed copy, or a
    copy inside another repository (whose commit would say nothing about this code).
    """
    checkout = Path(checkout or Path(__file__).parent.parent).resolve()

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != checkout:
            return "unknown"
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or no such folder
        return "unknown"
    return "unknown" if sha is None else sha + ("+dirty" if dirty else "")


class Lock:
    """An exclusive advisory lock on the file ``path`` (its folder must exist), held until
    :meth:`release` or the process ends; ``what`` it guards names it in the OutputError
    raised when another process holds it.

    The lock file keeps the holder's pid, for the message of whoever is refused,
    and is deleted on release (while still locked), so finished runs leave no
    lock files; a killed run's stays behind, unlocked and harmless.
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
        if remove and not self._file.closed:
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


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temp file next to ``path`` (its folder created if needed), renamed over ``path``
    when the block ends and deleted when it raises: a failure leaves no partial file.

    The file gets the mode ``open`` would give it (the umask's), not the temp file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(file_mode())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (:func:`replacing`), synced to the disk first."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


class Field(NamedTuple):
    """A field the reader checks: its type as docs/records.md writes it, when it must be
    there and the range of its value (a number's or an integer's)."""

    path: str  # "a.b": b in object a; "a[]": each item of list a
    type: str
    # "always"; "complete": in a complete record with a test accuracy; "result": there,
    # and not null; "": checked where present. A field whose parent is absent or null is
    # not looked for (the parent's line says whether it may be).
    when: str = ""
    low: float = -LARGEST
    high: float = LARGEST


# What a reader of records relies on: the fields the tables, the figures and run.py read.
# tests/test_record_format.py holds docs/records.md to these types.
FIELDS = (
    Field("status", "string", "always"), Field("rule", "string", "always"),
    Field("model", "string", "always"), Field("dataset", "string", "complete"),
    Field("seed", "integer"), Field("run_id", "string or null"),
    Field("argv", "list of strings or null"), Field("argv[]", "string", "always"),
    Field("config", "object", "complete"), Field("config.epochs", "integer", "complete", 1),
    Field("config.train_subset", "integer or null", "", 1),
    Field("config.test_subset", "integer or null", "", 1), Field("config.rule_options", "map"),
    Field("stack", "object", "complete"),
    Field("stack.num_blocks", "integer or null", "complete", 1),
    Field("hardware", "object", "complete"), Field("hardware.device", "string", "complete"),
    Field("hardware.device_name", "string", "complete"),
    Field("hardware.num_processes", "integer", "complete", 1),
    Field("params", "object", "complete"), Field("params.backbone", "integer"),
    Field("params.auxiliary", "integer"),  # below 0 where a rule leaves the model's head out
    Field("history", "list of objects", "complete"), Field("history[]", "object", "always"),
    Field("history[].seconds", "number"), Field("history[].images_per_s", "number"),
    Field("test_acc", "number or null", "result", 0, 1),
    Field("block_acc", "list of (number or null) or null", "result"),
    Field("block_acc[]", "number or null", "always", 0, 1),
    Field("memory", "object", "complete"),
    Field("memory.saved_bytes_peak", "integer or null", "complete"),
    Field("memory.cuda_max_memory", "integer or null", "complete"),
    Field("seconds_per_epoch", "number or null", "complete"),
    Field("plane_config", "object"), Field("plane_config.m", "integer", "", 2),
    Field("plane", "list of objects"),
    Field("plane[]", "object", "always"), Field("plane[].epoch", "integer", "always", 0),
    Field("plane[].block", "integer", "always", 0), Field("plane[].name", "string"),
    *(Field(f"plane[].{key}", "number", "always") for key in PLANE_FORMS),
    # Older records lack the adjusted form: the figures compute it (plots.with_adjusted)
    # from the self terms and traces.
    Field("plane[].nhsic_x_adj", "number"), Field("plane[].nhsic_y_adj", "number"),
    Field("plane[].nhsic_self", "number", "", 0), Field("plane[].rank", "number", "", 0),
    *(Field(f"plane_config.{key}", "number", "", 0) for key in ("nhsic_xx", "nhsic_yy",
                                                                 "rank_x", "rank_y")),
    Field("history[].probe_acc", "list of (number or null)"),
    Field("history[].probe_acc[]", "number or null", "always", 0, 1),
    Field("probe_config", "object"), Field("probe_config.train_images", "integer", "", 1),
    Field("probe", "list of objects"), Field("probe[]", "object", "always"),
    Field("probe[].epoch", "integer", "always", 0), Field("probe[].block", "integer", "always", 0),
    Field("probe[].acc", "number", "always", 0, 1),
    Field("probe[].train_acc", "number", "always", 0, 1),
)


class RecordError(DataError):
    """A file that cannot be read as a run record; ``record`` holds what was read when it is
    a record of this version with a field of the wrong type (None: no run record at all)."""

    def __init__(self, message: str, record: dict[str, Any] | None = None):
        super().__init__(message)
        self.record = record


def read_record(path: str | Path) -> dict[str, Any]:
    """Read a run record and check every field of :data:`FIELDS` that it has (or must have).

    Raises:
        RecordError: in one line naming the file and the problem: the file is missing, a
            folder, unreadable, truncated or not JSON, not a run record, of a record version
            this locallearn does not read, or a field is missing or of the wrong type
            (``PATH: plane[3].nhsic_x: expected a finite number, got 'x'``).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as err:  # missing, a folder, not readable
        raise RecordError(f"{path}: cannot read: {err.strerror or err}") from None
    except (ValueError, RecursionError) as err:  # not UTF-8 or not JSON, truncated, too deep
        raise RecordError(f"{path}: not a JSON run record, or truncated ({err})") from None
    if not isinstance(record, dict) or "version" not in record:
        raise RecordError(f"{path}: not a run record (no version)")
    if record["version"] != RECORD_VERSION:
        raise RecordError(f"{path}: record version {record['version']!r}; this locallearn "
                          f"reads version {RECORD_VERSION}")
    why = problem(record)
    if why:
        raise RecordError(f"{path}: {why}", record)
    return record


def problem(record: dict[str, Any]) -> str | None:
    """The first field of ``record`` that :data:`FIELDS` refuses, as ``NAME: what is wrong``;
    None if there is none."""
    complete = record.get("status") == "complete" and record.get("test_acc") is not None
    for field in FIELDS:
        required = field.when == "always" or (complete and field.when in ("complete", "result"))
        for name, value in _places(record, field.path.split(".")):
            if value is _ABSENT:
                if required:
                    return f"{name}: missing"
            elif value is None and complete and field.when == "result":
                return f"{name}: null in a complete record"
            elif not _fits(value, field):
                return f"{name}: expected {_expected(field)}, got {value!r:.40}"
    if record["status"] not in STATUSES:
        return f"status: expected one of {', '.join(STATUSES)}, got {record['status']!r:.40}"
    return None


_ABSENT = object()


def _places(value: Any, parts: list[str], name: str = "") -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of each place the path ``parts`` names in ``value`` (``_ABSENT`` if
    absent); nothing below a parent that is absent or null (its own line checks it)."""
    if not parts:
        yield name, value
    elif isinstance(value, dict):
        key = parts[0].removesuffix("[]")
        child, name = value.get(key, _ABSENT), f"{name}.{key}" if name else key
        if parts[0] == key:
            yield from _places(child, parts[1:], name)
        elif isinstance(child, list):
            for i, item in enumerate(child):
                yield from _places(item, parts[1:], f"{name}[{i}]")


_TYPES = {"integer": int, "number": (int, float), "string": str, "object": dict, "map": dict}


def _fits(value: Any, field: Field) -> bool:
    kind = field.type.removesuffix(" or null")
    if value is None:
        return kind != field.type
    if isinstance(value, bool) or not isinstance(value, _TYPES.get(kind, list)):
        return False  # a list type: "list of ...", its items checked by their own lines
    return not isinstance(value, (int, float)) or field.low <= value <= field.high  # NaN fails


def _expected(field: Field) -> str:
    text = field.type
    if field.type.startswith("number") and field.low == -LARGEST:
        text = "finite " + text
    text = ("an " if text[0] in "aeiou" else "a ") + text
    if field.high < LARGEST:
        return f"{text} in [{field.low:g}, {field.high:g}]"
    return f"{text} >= {field.low:g}" if field.low > -LARGEST else text


def build_record(values: dict[str, Any], *, run_id: str | None, plugins: list[str],
                 rule_paper: str, rule_options: dict[str, Any], model_options: dict[str, Any],
                 train: dict[str, Any], sources: dict[str, str], stack, parts: list,
                 hardware: dict[str, Any], history: list[dict[str, Any]],
                 argv: list[str] | None = None) -> dict[str, Any]:
    """A new run record, status ``running``, with no results yet (docs/records.md says
    what each field holds).

    Args:
        values: the command line's flags recorded as given, by dest
            (:func:`locallearn.settings.recorded_values`).
        run_id: the run's id, shared with its checkpoints (None on processes other than
            the main one, which write nothing).
        sources: where each set flag of ``values`` got its value, by dest
            (``"command line"``, ``"preset NAME"``, ``"rule NAME"``).
        history: the trainer's history list (the record keeps this very list, so it
            grows with the run).
        argv: ``run.py``'s command line as given (None: not started from one).
    """
    backbone = sum(p.numel() for p in stack.parameters())
    in_stack = {id(p) for p in stack.parameters()}
    auxiliary = sum(p.numel() for part in parts for p in part.parameters()
                    if id(p) not in in_stack)
    return {
        "version": RECORD_VERSION, "status": "running", "run_id": run_id,
        "rule": values["rule"], "rule_paper": rule_paper, "model": values["model"],
        "dataset": values["dataset"], "seed": values["seed"],
        "deterministic": values["deterministic"],
        "config": {**values, "plugins": list(plugins), "milestones": list(values["milestones"]),
                   "rule_options": rule_options, "model_options": model_options,
                   "train": train},
        "config_sources": dict(sources), "argv": None if argv is None else list(argv),
        "versions": versions(), "hardware": hardware,
        "stack": {
            "blocks": stack.names, "granularity": values["granularity"],
            "num_blocks": values["blocks"] or (len(stack) if values.get("split_after") else None),
        },
        "parts": [{"name": p.part_name, "blocks": p.block_ids,
                   "params": sum(q.numel() for q in p.parameters())} for p in parts],
        "params": {"backbone": backbone, "auxiliary": auxiliary},
        "started": _now(), "history": history, "test_acc": None, "block_acc": None,
        "seconds": None,
    }


def measurements(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Activation memory (max over epochs) and mean seconds per epoch, for the record."""
    def peak(key: str) -> int | None:
        return max((e[key] for e in history if key in e), default=None)

    seconds = [e["seconds"] for e in history]
    return {"memory": {"saved_bytes_peak": peak("saved_bytes_peak"),
                       "cuda_max_memory": peak("cuda_max_memory")},
            "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def side_file(path: str | Path) -> Path:
    """Where a run that replaces the record at ``path`` writes its own until it finishes."""
    path = Path(path)
    return path.parent / f".{path.name}.new"


class RecordWriter(Observer):
    """Writes the run record at fit start and after every epoch (status ``running``).

    Put it after the observers whose results it records (the information plane),
    so each epoch's record holds that epoch's results. Its state (when the run
    started, when it was resumed) goes into checkpoints, so a resumed run's
    record keeps its first start and lists every resume.

    A run that replaces another run's record (``replaces``: ``--overwrite``) writes its
    own to :func:`side_file` and renames it over ``path`` only when it has finished
    (complete or diverged): until then, the record it replaces stays as it was.
    ``record`` (from :func:`build_record`) is updated in place; ``plane`` and ``probe`` are
    the information-plane and linear-probe observers whose entries go into it, if any; only
    the main process writes.
    """

    def __init__(self, record: dict[str, Any], path: str | Path, plane=None,
                 main_process: bool = True, replaces: bool = False, probe=None):
        self.record, self.path, self.plane, self.probe = record, Path(path), plane, probe
        self.main_process, self.replaces = main_process, replaces

    def write(self, status: str, **fields: Any) -> None:
        """Set ``status`` and ``fields``, refresh the measurements and plane, write the file."""
        record = self.record
        record.update(status=status, **fields, **measurements(record["history"]))
        if self.plane is not None:
            record["plane_config"] = self.plane.describe()
            record["plane"] = self.plane.entries
        if self.probe is not None:
            record["probe_config"] = self.probe.describe()
            record["probe"] = self.probe.entries
        record["path"] = str(self.path)
        if self.main_process and not self.replaces:
            write_json(self.path, record)
        elif self.main_process:
            write_json(side_file(self.path), record)
            if status in ("complete", "diverged"):  # finished: now it replaces the old record
                os.replace(side_file(self.path), self.path)

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
