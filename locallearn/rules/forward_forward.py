"""Forward-forward: every layer separates label-embedded positives from negatives by goodness."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..models import rms_normalize
from ..objectives import Objective, Term
from ..step import Step
from .base import LocalPart, Rule, block_outputs, register_rule
from .sequential import phase


def embed_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 scale: float = 1.0) -> torch.Tensor:
    """Write each label's one-hot code (times ``scale``) over the first ``num_classes``
    values of its flattened image."""
    flat = x.flatten(1).clone()
    flat[:, :num_classes] = 0
    flat[torch.arange(len(flat), device=flat.device), labels] = scale
    return flat.view_as(x)


def wrong_labels(labels: torch.Tensor, num_classes: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random label other than the true one, for each sample."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift.to(labels.device)) % num_classes


class NormalizedPart(LocalPart):
    """A part that normalises the length of each sample of its input first (Hinton 2022).

    The next layer so cannot read the previous one's goodness (the length).
    ``ff_mlp``'s layers normalise already, the same way (unit root-mean-square
    entries, as Löwe's reimplementation loeweX/Forward-Forward does), which this
    repeats harmlessly; other MLP backbones need it.
    """

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return super().run_blocks(rms_normalize(x))


@dataclass
class ForwardForwardConfig:
    """Options of ``forward_forward``; docs/rules.md describes each.

    ``embed_scale``: the images are normalised to unit variance per channel (values
    within about +-2.5), so the default 5 makes the label's code stand out from the
    pixels around it, as a one-hot of 1 does on MNIST's mostly black corner.
    ``goodness="mean"`` with ``theta=2`` is what the seed's code (keitaroskmt/E2E-info)
    and Pezeshki's unofficial implementation (mohammadpz/pytorch_forward_forward) use;
    the paper writes the sum (``goodness="sum"``).
    """

    theta: float = 2.0
    goodness: Literal["mean", "sum"] = "mean"  # mean: theta is per unit, for any width
    embed_scale: float = 5.0
    sequential: bool = False
    epochs_per_part: tuple[int, ...] = ()

    def __post_init__(self):
        if self.theta <= 0 or self.embed_scale <= 0:
            raise ConfigError("options 'theta' and 'embed_scale' of rule 'forward_forward' "
                              f"must be > 0; got {self.theta} and {self.embed_scale}")


@register_rule(
    "forward_forward",
    paper="Hinton 2022, The Forward-Forward Algorithm: Some Preliminary Investigations",
    summary="each layer's goodness is high on label-embedded positives, low on wrong labels",
)
class ForwardForward(Rule):
    """Forward-forward (Hinton 2022), all layers at once on detached inputs, or in turn.

    Each layer is a part whose goodness is high on images with their label's code
    written in (positives) and low on wrong labels (negatives); it predicts the label
    whose embedding is best, summed over the layers after the first. docs/rules.md#forward_forward
    has where it departs from the paper, and the measurements behind its training defaults.
    """

    Config = ForwardForwardConfig
    training_defaults = {"model": "ff_mlp", "optimizer": "adamw", "lr": 1e-3,
                         "weight-decay": 0.0, "batch-size": 16, "schedule": "constant"}

    restart_schedule = property(lambda self: self.config.sequential)

    def make_step(self, images, labels, transform, num_classes, generator=None, train=True):
        """Training: positives then negatives; evaluation: each image with every label."""
        x, c, s = transform(images, generator), num_classes, self.config.embed_scale
        if train:
            neg = wrong_labels(labels, c, generator)
            x = torch.cat([embed_labels(x, labels, c, s), embed_labels(x, neg, c, s)])
        else:
            every = torch.arange(c, device=x.device).repeat(len(x))
            x = embed_labels(x.repeat_interleave(c, 0), every, c, s)
        return x, Step(labels, x, train, 1, c, transform.mean, transform.std)

    def predictions(self, logits):
        """Goodness of each label summed over the layers after the first (the first: its own)."""
        return [logits[0], *itertools.accumulate(logits[1:])]

    def trained_parts(self, epoch, epochs, num_parts):
        if not self.config.sequential:
            return list(range(num_parts))
        return [phase(epoch, epochs, num_parts, self.config.epochs_per_part, "forward_forward")]

    def parts(self, stack, num_classes, example):
        if num_classes > example[0].numel():
            raise ConfigError("rule 'forward_forward': more labels than input values to embed")
        options = {"theta": self.config.theta, "reduce": self.config.goodness}
        parts, pending = [], []
        for k, (block, h) in enumerate(zip(stack.blocks, block_outputs(stack, example),
                                           strict=True)):
            pending.append(k)
            if not any(True for _ in block.parameters()):  # e.g. the flattening stem
                continue
            if h.ndim != 2:  # feature maps or tokens: the goodness of a layer is of a vector
                raise ConfigError(
                    f"rule 'forward_forward' supports fully connected backbones such as ff_mlp; "
                    f"block {stack.names[k]!r} outputs a {h.ndim}-D tensor {tuple(h.shape[1:])} "
                    "per batch, not a vector (convolutional backbones are not supported)")
            objective = Objective({}, [Term("goodness", options=options)])
            blocks = [stack.blocks[i] for i in pending]
            parts.append(NormalizedPart(stack.names[k], blocks, pending, objective))
            pending = []
        if pending or len(parts) < 2:
            raise ConfigError("rule 'forward_forward' needs at least two layers with parameters, "
                              "the last block among them")
        return parts
