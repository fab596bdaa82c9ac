"""Simultaneous layer-wise training with auxiliary classifiers."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..heads import Classifier, PoolLinear, channels_of
from .base import LocalPart, Rule, block_outputs, register_rule


@dataclass
class LayerwiseConfig:
    """Options of ``layerwise``.

    Attributes:
        aux_hidden: width of a hidden layer in each auxiliary head; 0 gives
            the seed paper's global-average-pool + linear head.
    """

    aux_hidden: int = 0

    def __post_init__(self):
        if self.aux_hidden < 0:
            raise ConfigError(
                f"option 'aux_hidden' of rule 'layerwise' must be >= 0; got {self.aux_hidden}"
            )


@register_rule(
    "layerwise",
    paper=(
        "Sakamoto & Sato 2024, End-to-End Training Induces Information Bottleneck through "
        "Layer-Role Differentiation (TMLR); Belilovsky, Eickenberg & Oyallon 2019, Greedy "
        "Layerwise Learning Can Scale to ImageNet (ICML)"
    ),
    summary="every block trains on its own auxiliary head's cross-entropy, all at once",
)
class Layerwise(Rule):
    """Layer-wise training as in Sakamoto & Sato (TMLR 2024), all blocks at once.

    Every block of the stack is a part with its own auxiliary classifier
    (global average pool + linear by default) and local cross-entropy; each
    part's input is detached, so no gradient crosses a block boundary, and
    all parts update on every batch. The model's own head is a last part
    trained on the detached output of the final block, so the network's
    prediction is a classifier on features nobody trained for it end to end.
    Grouping blocks with ``--blocks K`` gives K parts.
    """

    Config = LayerwiseConfig

    def parts(self, stack, num_classes, example):
        parts = []
        outputs = block_outputs(stack, example)
        for k, (block, h) in enumerate(zip(stack.blocks, outputs, strict=True)):
            head = PoolLinear(channels_of(h.shape), num_classes, self.config.aux_hidden)
            parts.append(LocalPart(stack.names[k], [block], [k], Classifier(head)))
        parts.append(LocalPart("head", [], [], Classifier(stack.head)))
        return parts
