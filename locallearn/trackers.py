"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate, as an observer.

The run record stays the source of truth: :class:`TrackerLog` sends the
tracker what the record holds after each epoch, as flat scalars
(``test_acc``, ``block_acc/layer1``, ``plane/nhsic_y/layer1``), so a tracker's
curves and the record's numbers are the same numbers.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, unknown_name
from .observers import Observer

# History fields that are not measurements (labels, counts of what was left out).
NOT_LOGGED = ("epoch", "trained_parts", "dropped_images")
# Plane-row fields that say where a value belongs rather than what it is.
PLANE_KEYS = ("epoch", "block", "name", "dim")


def tracker_names() -> list[str]:
    """The trackers Accelerate can log to (its ``LoggerType``s, less ``all``)."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def check_tracker(name: str) -> None:
    """Raise ConfigError unless ``name`` is a tracker Accelerate knows, installed."""
    import accelerate.utils.imports as imports

    if name not in tracker_names():
        raise unknown_name("--log-with tracker", name, tracker_names())
    if not getattr(imports, f"is_{name}_available")():
        raise ConfigError(f"--log-with {name} needs the {name} package, which is not "
                          f"installed: pip install {name}")


def flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """``values`` as ``{"a/b": scalar}``: dicts flattened by key, lists joined by commas,
    None left out (trackers take numbers, strings and booleans only)."""
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out |= flat(value, f"{prefix}/{key}" if prefix else str(key))
        return out
    if values is None:
        return {}
    if isinstance(values, (list, tuple)):
        return {prefix: ",".join(map(str, values))}
    return {prefix: values}


def epoch_scalars(record: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``history`` entry and the plane rows of its epoch, flat."""
    names = record["stack"]["blocks"]
    lists = ("block_acc", "probe_acc")  # one number per block: logged under its name
    measured = {k: v for k, v in entry.items() if k not in NOT_LOGGED and k not in lists}
    for key in lists:
        if entry.get(key) is not None:
            measured[key] = dict(zip(names, entry[key], strict=True))
    out = {k: v for k, v in flat(measured).items() if isinstance(v, (int, float))}
    return out | plane_scalars(record, entry["epoch"])


def plane_scalars(record: dict[str, Any], epoch: int) -> dict[str, float]:
    """``plane/FIELD/BLOCK`` for every plane row of ``epoch`` in ``record``."""
    return {f"plane/{key}/{row['name']}": value
            for row in record.get("plane") or () if row["epoch"] == epoch
            for key, value in row.items() if key not in PLANE_KEYS}


class TrackerLog(Observer):
    """Logs every epoch of a run record to the Accelerator's trackers (main process only),
    as the run ``run_name`` (TensorBoard: the folder under the project directory).

    Register it after the :class:`~locallearn.records.RecordWriter` of ``record``,
    so each epoch's record is complete when it is logged. The step is the
    epoch; the plane's measurement before training is step 0.
    """

    def __init__(self, record: dict[str, Any], run_name: str):
        self.record, self.run_name = record, run_name

    def on_fit_start(self, trainer) -> None:
        acc = trainer.accelerator
        acc.init_trackers(self.run_name, config=flat(self.record["config"]))
        if trainer.start_epoch == 0:  # a resumed run's earlier epochs were logged before
            acc.log(plane_scalars(self.record, 0), step=0)

    def on_epoch_end(self, trainer, entry: dict[str, Any]) -> None:
        trainer.accelerator.log(epoch_scalars(self.record, entry), step=entry["epoch"])
