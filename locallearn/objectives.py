"""Objectives: a weighted sum of registered loss terms over auxiliary heads
(docs/architecture.md, "Composition").

An :class:`Objective` owns its heads (named slots, e.g. ``"aux"``, ``"decoder"``)
and sums its terms, each a registered loss scoring one head's output (or the part's
output) with a weight. Its forward returns a :class:`~locallearn.step.Scored`: the
loss, the logits at this depth (from the first term whose loss predicts) and the
terms' metrics. Terms that only train (reconstruction, nHSIC) are skipped at
evaluation. With ``recompute``, each head runs again in backward, one at a time
(:func:`~locallearn.recompute.recomputed`); its output then gives no logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .losses import LOSSES, LossInput, build_loss
from .recompute import recomputed
from .step import Scored, Step, zero_loss


@dataclass(frozen=True)
class Term:
    """One weighted loss term of an objective.

    Attributes:
        loss: a registered loss name.
        weight: its weight in the sum.
        head: the slot of the head whose output it scores (None: the part's output).
        similarity: the slot of the similarity head, for losses that need one.
        options: the loss's options (those it does not take are not passed).
    """

    loss: str
    weight: float = 1.0
    head: str | None = None
    similarity: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module):
    """A part's local objective: ``sum(weight * loss(head(h)))`` over its terms.

    Args:
        heads: slot name -> head module (parameters learned with the part).
        terms: the weighted loss terms, in the order they are summed.
        recompute: rebuild each head's graph in backward instead of keeping it
            (only where nothing else needs its output).
        front: a module every head reads through (MAN's momentum block,
            :class:`~locallearn.rules.local.Momentum`); terms without a head score ``h``.
    """

    def __init__(self, heads: dict[str, nn.Module], terms: list[Term], recompute: bool = False,
                 front: nn.Module | None = None):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.front = front
        self.terms = list(terms)
        for term in self.terms:
            for slot in (term.head, term.similarity):
                if slot is not None and slot not in self.heads:
                    raise ValueError(f"term {term.loss!r} scores head {slot!r}, which the "
                                     f"objective lacks (it has {', '.join(self.heads)})")
        self.fns = [build_loss(t.loss, **t.options) for t in self.terms]
        self.metas = [LOSSES.get(t.loss).meta for t in self.terms]  # train_only, logits, ...
        self.recompute = recompute

    def forward(self, h: torch.Tensor, step: Step, part_input: torch.Tensor) -> Scored:
        value, logits, metrics = None, None, {}
        outputs: dict[str, torch.Tensor] = {}
        z = h if self.front is None else self.front(h)  # what the heads read
        for term, fn, meta in zip(self.terms, self.fns, self.metas, strict=True):
            if meta["train_only"] and not step.train:
                continue
            sim = None if term.similarity is None else self._output(term.similarity, z, outputs)
            if term.head is None:
                scored = fn(LossInput(None, h, part_input, step, sim))
            elif self.recompute and step.train and sim is None:
                head = self.heads[term.head]
                scored = recomputed(
                    lambda a, head=head, fn=fn: fn(LossInput(head(a), a, part_input, step)),
                    head, z)
            else:
                out = self._output(term.head, z, outputs)
                scored = fn(LossInput(out, z, part_input, step, sim))
                if meta["logits"] and logits is None:
                    logits = out[: len(step.labels)]
            if isinstance(scored, Scored):
                logits = scored.logits if logits is None else logits
                metrics.update(scored.metrics)
                scored = scored.loss
            v = scored if term.weight == 1 else term.weight * scored
            value = v if value is None else value + v
        return Scored(zero_loss(h) if value is None else value, logits, metrics)

    def after_backward(self) -> None:
        """Called by the loop once the part's backward ran: the front's update (MAN's EMA)."""
        if self.front is not None:
            self.front.after_backward()

    def _output(self, slot: str, h: torch.Tensor, outputs: dict[str, torch.Tensor]):
        """A head's output on ``h``, computed once per step however many terms read it."""
        if slot not in outputs:
            outputs[slot] = self.heads[slot](h)
        return outputs[slot]


def classifier(head: nn.Module) -> Objective:
    """Cross-entropy of ``head``'s class scores: the objective of e2e and of a model's head."""
    return Objective({"head": head}, [Term("ce", head="head")])


def no_objective() -> Objective:
    """The objective of a part that never learns (a frozen feature extractor): loss 0, no logits."""
    return Objective({}, [])
