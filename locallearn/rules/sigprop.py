"""Signal propagation: the target travels forward through the same layers as the input.

Kohan, Rietman & Siegelmann, "Signal Propagation: The Framework for Learning and Inference
in a Forward Pass", IEEE TNNLS 2023; reference library amassivek/signalpropagation (commit
b4cbef2, ``sigprop/``). docs/rules.md#sigprop has where this departs from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..objectives import classifier
from ..step import Scored, Step, zero_loss
from .base import LocalPart, Rule, block_outputs, register_rule


def similarities(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: each input row's similarity with each target row, ``h_i . t_j``; for
    feature maps the mean over positions of the per-position (channel) dot products."""
    if h.ndim > 2:
        return (h.flatten(2).permute(2, 0, 1) @ t.flatten(2).permute(2, 1, 0)).mean(0)
    return h @ t.t()


def target_matches(t0: torch.Tensor, kind: str, topk: int) -> torch.Tensor:
    """Which targets each target row should match, from the similarity of the targets as
    they entered the layer (``t0``: the one-hot codes before the first layer): a 0/1
    ``(T, T)`` matrix (``max_rand``: the index of the best match, ``(T,)``)."""
    if t0.ndim == 2:
        yy = t0 @ t0.t()
    else:
        t0 = t0.flatten(2).permute(2, 0, 1)
        yy = (t0 @ t0.transpose(1, 2)).mean(0)
    if kind == "max_rand":  # argmax: the first best match (the reference's v14)
        return yy.argmax(1)
    if kind == "max_all":  # every best match (v9)
        return (yy == yy.max(1, keepdim=True)[0]).float()
    best = yy.topk(min(topk, len(yy)), dim=1)[1]  # the k best matches (v15)
    return F.one_hot(best, len(yy)).sum(1).clamp(0, 1).float()


def sigprop_loss(h1: torch.Tensor, t1: torch.Tensor, t0: torch.Tensor, kind: str = "topk",
                 topk: int = 6) -> torch.Tensor:
    """The reference's input-target loss of a layer: cross-entropy of each input's
    similarities with the batch's targets (:func:`similarities` of the layer's outputs
    ``h1``, ``t1``) against the targets its own target matches (:func:`target_matches` of
    the layer's target input ``t0``). ``kind``: ``topk`` (v15, the examples' default),
    ``max_all`` (v9), ``max_rand`` (v14). The soft targets are not normalised, as there."""
    y = similarities(h1, t1)
    match = target_matches(t0, kind, topk)
    if kind == "max_rand":
        return F.cross_entropy(y, match)
    return -(match * F.log_softmax(y.float(), dim=-1)).sum(-1).mean()


def batch_statistics(blocks: nn.Module):
    """Norm layers normalise by the batch and keep their running statistics (the targets'
    pass: only the inputs' statistics are kept for evaluation). Returns a restore function."""
    norms = [m for m in blocks.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False

    def restore():
        for m, (training, track) in zip(norms, saved, strict=True):
            m.training, m.track_running_stats = training, track

    return restore


class SignalPart(LocalPart):
    """Blocks that carry the batch's input rows and its target rows side by side.

    Its input (and output) stacks ``len(step.labels)`` input rows over the target rows: at
    training one target per image (its label's), at evaluation one per class. The first
    part holds the target embedding (``objective``: a linear map from the one-hot code to
    the input's shape), trained by that part's loss, as the reference's signal is.
    """

    def __init__(self, name, blocks, block_ids, embed: nn.Module | None, kind: str, topk: int):
        super().__init__(name, blocks, block_ids, embed if embed is not None else nn.Identity())
        self.embeds, self.kind, self.topk = embed is not None, kind, topk

    def forward(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, Scored]:
        n = len(step.labels)
        h0, t0 = x[:n], x[n:]
        if self.embeds:  # the codes make_step wrote over the first num_classes values
            t0 = t0.flatten(1)[:, :step.num_classes]
            t = self.objective(t0).view(len(t0), *h0.shape[1:])
        else:
            t = t0
        h = self.run_blocks(h0)
        restore = batch_statistics(self.blocks)
        try:
            t = self.run_blocks(t)
        finally:
            restore()
        y = similarities(h.detach(), t.detach()).float()
        out = torch.cat([h, t])
        if not step.train:  # one target per class: the scores are the class scores
            return out, Scored(zero_loss(h), y)
        loss = sigprop_loss(h, t, t0, self.kind, self.topk)
        # The reference's monitor: the best-matching target in the batch has the input's label.
        match = (step.labels[y.argmax(1)] == step.labels).float().mean()
        return out, Scored(loss, None, {"match": match})


class InputRowsPart(LocalPart):
    """The model's head, trained by cross-entropy on the input rows only (the reference
    trains its last layer normally, on the last hidden layer's detached output)."""

    def forward(self, x, step):
        return super().forward(x[:len(step.labels)], step)


@dataclass
class SigpropConfig:
    """Options of ``sigprop``; docs/rules.md describes each."""

    loss: Literal["topk", "max_all", "max_rand"] = "topk"
    topk: int = 6

    def __post_init__(self):
        if self.topk < 1:
            raise ConfigError(f"option 'topk' of rule 'sigprop' must be >= 1; got {self.topk}")


@register_rule(
    "sigprop",
    paper="Kohan, Rietman & Siegelmann 2023, Signal Propagation: The Framework for Learning "
          "and Inference in a Forward Pass (IEEE TNNLS)",
    summary="a learned label embedding travels forward beside the input; each layer "
            "matches the two signals",
)
class Sigprop(Rule):
    """Signal propagation (Kohan et al. 2023), every layer at once on detached signals.

    The target, a learned linear embedding of the one-hot label shaped like the input,
    goes through the same blocks as the image; each part (a block with parameters, with
    any parameterless blocks before it) learns to make each input most similar to its
    own class's targets (:func:`sigprop_loss`). At evaluation each part scores each class
    by the similarity of the input's representation with that class's target's; the
    model's head learns by cross-entropy on the last block's detached output.
    """

    Config = SigpropConfig
    # The reference's examples: Adam at 5e-4, batches of 128, no weight decay.
    training_defaults = {"optimizer": "adamw", "lr": 5e-4, "weight-decay": 0.0,
                         "batch-size": 128}

    def make_step(self, images, labels, transform, num_classes, generator=None, train=True):
        """The images, then the target rows: each label's one-hot code over the first
        ``num_classes`` values (training: the batch's labels; evaluation: every class)."""
        x = transform(images, generator)
        codes = labels if train else torch.arange(num_classes, device=labels.device)
        targets = x.new_zeros(len(codes), x[0].numel())
        targets[torch.arange(len(codes), device=x.device), codes.to(x.device)] = 1
        x = torch.cat([x, targets.view(len(codes), *x.shape[1:])])
        return x, Step(labels, x, train, 1, num_classes, transform.mean, transform.std)

    def parts(self, stack, num_classes, example):
        if num_classes > example[0].numel():
            raise ConfigError("rule 'sigprop': more labels than input values to hold their codes")
        cfg, parts, pending = self.config, [], []
        for k, (block, h) in enumerate(zip(stack.blocks, block_outputs(stack, example),
                                           strict=True)):
            pending.append(k)
            if not any(True for _ in block.parameters()):
                continue
            if h.ndim not in (2, 4):
                raise ConfigError(
                    f"rule 'sigprop' compares vectors or feature maps; block {stack.names[k]!r} "
                    f"outputs a {h.ndim}-D tensor {tuple(h.shape[1:])} per image (use a CNN "
                    "or an MLP such as ff_mlp or resnet32_cifar)")
            embed = None if parts else nn.Linear(num_classes, example[0].numel(), bias=False)
            blocks = [stack.blocks[i] for i in pending]
            parts.append(SignalPart(stack.names[k], blocks, pending, embed, cfg.loss, cfg.topk))
            pending = []
        if not parts:
            raise ConfigError("rule 'sigprop' needs a block with parameters")
        blocks = [stack.blocks[i] for i in pending]
        parts.append(InputRowsPart("head", blocks, pending, classifier(stack.head)))
        return parts
