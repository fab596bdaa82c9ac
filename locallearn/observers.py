"""What the trainer tells the rest of the program: fit start, epoch end, fit end.

The base class sits below the trainer, so the information plane, checkpoints
and the run record can be observers without importing the loop they observe.
"""

from __future__ import annotations

from typing import Any

# The trainer sits above this module and is not imported, not even for annotations:
# each hook's ``trainer`` is the :class:`~locallearn.trainer.Trainer` that calls it.
Trainer = Any


class Observer:
    """Hooks the trainer calls; subclass and override what you need.

    Observers are called in order, so one that reads another's results (the
    run record reads the plane's) comes after it.
    """

    #: Whether it runs a probe through the blocks (the information plane): an executor
    #: whose stages cannot measure every block (parts that share or skip one) refuses it.
    probes_blocks = False

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None: ...

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None: ...
