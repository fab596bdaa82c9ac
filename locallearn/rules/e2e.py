"""End-to-end backpropagation: the baseline every local rule is measured against."""

from __future__ import annotations

from ..objectives import classifier
from .base import LocalPart, Rule, register_rule


@register_rule(
    "e2e",
    paper="Rumelhart, Hinton & Williams 1986, Learning representations by back-propagating errors",
    summary="one part: the whole network trained by backprop on the final cross-entropy",
)
class EndToEnd(Rule):
    """Backprop through the whole network: one part holding every block and the model's head."""

    def parts(self, stack, num_classes, example):
        ids = list(range(len(stack.blocks)))
        return [LocalPart("e2e", list(stack.blocks), ids, classifier(stack.head))]
