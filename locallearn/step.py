"""The step context: everything a part or an objective may read about one batch, made
once per batch by the rule's input hook and handed to every part and objective on every
path (DESIGN principle 11; docs/architecture.md, "Rules").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Step:
    """One batch, as the parts of a rule see it.

    Attributes:
        labels: ``(B,)`` one label per image of the batch.
        network_input: the first part's input for this batch (``views * B``
            rows when views are stacked; forward-forward's label-embedded images).
        train: whether the batch trains (else it is evaluated).
        views: how many stacked views of each image the part inputs hold
            (2 for supervised contrastive training, else 1).
        num_classes: the number of labels.
        mean: ``(1, C, 1, 1)`` per-channel mean the images were normalised
            with (None if unknown), so a decoder can rebuild them in [0, 1].
        std: the matching standard deviation.
    """

    labels: Tensor
    network_input: Tensor
    train: bool = True
    views: int = 1
    num_classes: int = 0
    mean: Tensor | None = None
    std: Tensor | None = None

    def labels_for(self, rows: int) -> Tensor:
        """The labels of ``rows`` stacked rows: the batch's labels repeated once per view."""
        if rows == len(self.labels):
            return self.labels
        if rows != self.views * len(self.labels):
            raise ValueError(f"{rows} rows do not match {len(self.labels)} labels "
                             f"x {self.views} views")
        return self.labels.repeat(self.views)

    def image(self) -> Tensor:
        """The network input mapped back to [0, 1] (the target of a reconstruction).

        Uses the recorded normalisation; without one, each image is scaled by
        its own minimum and maximum.
        """
        x = self.network_input
        if self.mean is not None and self.std is not None:
            mean, std = (t.to(x.device, x.dtype) for t in (self.mean, self.std))
            return (x * std + mean).clamp(0, 1)
        lo = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
        hi = x.amax(dim=tuple(range(1, x.ndim)), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)


class Scored(NamedTuple):
    """What an objective returns for one part and step.

    Attributes:
        loss: the scalar local loss (zero where nothing learns).
        logits: ``(B, classes)`` the prediction at this part's depth, or None.
        metrics: detached scalars averaged over the epoch into the run record
            (``rule_metrics``), e.g. forward-forward's goodness gap.
    """

    loss: Tensor
    logits: Tensor | None = None
    metrics: dict[str, Tensor] = {}  # noqa: RUF012  (never mutated: a NamedTuple default)


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero on ``like``'s device, the loss of an objective with nothing to learn."""
    return like.new_zeros((), dtype=torch.float32)
