"""Forward-forward: every layer separates label-embedded positives from negatives by goodness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import ff_loss, goodness
from ..models import rms_normalize
from .base import LocalPart, Rule, block_outputs, register_rule
from .sequential import phase, share_epochs


def embed_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 scale: float = 1.0) -> torch.Tensor:
    """Write each label's one-hot code (times ``scale``) over the first pixels of its image.

    Args:
        x: ``(B, ...)`` images; the first ``num_classes`` values of each flattened
            image are replaced.
        labels: ``(B,)`` the labels to embed.
        num_classes: number of labels.
        scale: value of the hot entry.
    """
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
    entries), which this repeats harmlessly; other MLP backbones need it.
    """

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return super().run_blocks(rms_normalize(x))


class Goodness(nn.Module):
    """A forward-forward layer's objective.

    Training batches hold positives then negatives (``2B`` rows): the loss is
    :func:`~locallearn.losses.ff_loss` of their goodness. Evaluation batches
    hold each image with every label embedded (``B * C`` rows, image-major):
    the logits are the goodness of each label, accumulated over this layer and
    the ones before it except the first (``accumulate``; the first layer's own
    goodness is its logits).
    """

    def __init__(self, theta: float, num_classes: int, memo: dict, first: bool,
                 reduce: str = "sum"):
        super().__init__()
        self.theta, self.num_classes, self.memo, self.first = theta, num_classes, memo, first
        self.reduce = reduce
        self.gap = torch.zeros(())
        self.steps = 0

    def forward(self, h: torch.Tensor, y: torch.Tensor):
        g = goodness(h, self.reduce)
        if self.training:
            g_pos, g_neg = g[: len(y)], g[len(y):]
            self.gap = self.gap.to(g.device) + (g_pos.mean() - g_neg.mean()).detach()
            self.steps += 1
            return ff_loss(g_pos, g_neg, self.theta), None
        g = g.view(-1, self.num_classes)
        if self.first:
            self.memo["goodness"] = torch.zeros_like(g)
            return h.new_zeros(()), g
        self.memo["goodness"] = self.memo["goodness"] + g
        return h.new_zeros(()), self.memo["goodness"]


def _check_flat_outputs(stack: nn.Module, example: torch.Tensor) -> None:
    """Refuse backbones whose layers output feature maps or tokens, not vectors."""
    outputs = block_outputs(stack, example)
    for name, block, h in zip(stack.names, stack.blocks, outputs, strict=True):
        if h.ndim != 2 and any(True for _ in block.parameters()):
            raise ConfigError(
                f"rule 'forward_forward' supports fully connected backbones such as ff_mlp; "
                f"block {name!r} outputs a {h.ndim}-D tensor {tuple(h.shape[1:])} per batch, "
                "not a vector (convolutional backbones are not supported)")


@dataclass
class ForwardForwardConfig:
    """Options of ``forward_forward``.

    Attributes:
        theta: the goodness threshold of the logistic loss.
        goodness: ``mean`` (mean squared activity, so ``theta`` is per unit and
            suits any width) or ``sum`` (the paper's sum of squares).
        embed_scale: value of the hot pixel of the label embedding. The images
            are normalised to unit variance per channel (values within about
            +-2.5), so the default 5 makes the code stand out from the pixels
            around it, as a one-hot of 1 does on MNIST's mostly black corner.
        sequential: train the layers one after another (each then frozen)
            instead of all at once.
        epochs_per_part: with ``sequential``, the epochs of each layer; empty
            shares ``--epochs`` out evenly.
    """

    theta: float = 2.0
    goodness: Literal["mean", "sum"] = "mean"
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

    Positives are images with their true label's one-hot code written over
    the first pixels; negatives are the same images with a random *wrong*
    label. Each layer is a part whose loss pushes goodness (the mean, or the
    paper's sum, of squared activities) above ``theta`` on positives and
    below it on negatives; the
    backbone's layers length-normalise their input (``ff_mlp``), so the next
    layer cannot read this layer's goodness. Prediction: every label is
    embedded in turn and the label with the highest goodness summed over the
    layers except the first wins. The model's head is not used. Made for
    ``ff_mlp``; other fully connected backbones work too (each part's input is
    length-normalised); backbones whose layers output feature maps or tokens
    are refused with a ConfigError. With ``sequential=true`` the layers
    train one after another, each running the whole learning-rate schedule
    over its own epochs, then frozen.
    """

    Config = ForwardForwardConfig

    @property
    def restart_schedule(self) -> bool:
        return self.config.sequential

    def __init__(self, config=None):
        super().__init__(config)
        self.num_classes = 0
        self.objectives: list[Goodness] = []

    def batch(self, images, labels, transform, generator=None, train=True):
        x, c, s = transform(images, generator), self.num_classes, self.config.embed_scale
        if train:
            neg = wrong_labels(labels, c, generator)
            return torch.cat([embed_labels(x, labels, c, s), embed_labels(x, neg, c, s)]), labels
        every = torch.arange(c, device=x.device).repeat(len(x))
        return embed_labels(x.repeat_interleave(c, 0), every, c, s), labels

    def trained_parts(self, epoch, epochs, num_parts):
        if not self.config.sequential:
            return list(range(num_parts))
        return [phase(epoch, share_epochs(epochs, num_parts, self.config.epochs_per_part,
                                          "forward_forward"))]

    def epoch_metrics(self):
        gaps = {}
        for objective, name in zip(self.objectives, self.names, strict=True):
            gaps[name] = objective.gap.item() / objective.steps if objective.steps else None
            objective.gap, objective.steps = torch.zeros(()), 0
        return {"goodness_gap": gaps}

    def parts(self, stack, num_classes, example):
        if num_classes > example[0].numel():
            raise ConfigError("rule 'forward_forward': more labels than input values to embed")
        _check_flat_outputs(stack, example)
        self.num_classes, memo = num_classes, {}
        parts, pending, pending_ids = [], [], []
        self.objectives, self.names = [], []
        for k, block in enumerate(stack.blocks):
            pending.append(block)
            pending_ids.append(k)
            if not any(True for _ in block.parameters()):  # e.g. the flattening stem
                continue
            objective = Goodness(self.config.theta, num_classes, memo, first=not parts,
                                 reduce=self.config.goodness)
            parts.append(NormalizedPart(stack.names[k], pending, pending_ids, objective))
            self.objectives.append(objective)
            self.names.append(stack.names[k])
            pending, pending_ids = [], []
        if pending or len(parts) < 2:
            raise ConfigError("rule 'forward_forward' needs at least two layers with parameters, "
                              "the last block among them")
        return parts
