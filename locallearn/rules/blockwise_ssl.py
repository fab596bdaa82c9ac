"""Blockwise self-supervised learning: every part learns from two views alone, no labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..heads import reads_later
from ..losses import LOSSES
from .base import LocalPart, block_outputs, later_blocks, register_rule
from .local import LocalConfig, LocalRule


@dataclass
class BlockwiseSSLConfig(LocalConfig):
    """Options of ``blockwise_ssl`` (and the shared ones of :class:`~.local.LocalConfig`);
    docs/rules.md#blockwise_ssl describes each and compares them with the reference's.
    ``aux_features`` is the projector's conv width, ``aux_hidden`` its MLP's, ``aux_depth``
    its linear layers (0: :data:`PROJECTOR`'s), ``proj_dim`` its output, ``kernel`` its
    conv's size."""

    head: str = "projector"
    loss: str = "barlow"
    proj_dim: int = 512
    kernel: int = 1
    merge_stem: bool = True

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"option 'kernel' of rule 'blockwise_ssl' is the projector "
                              f"conv's size, an odd number >= 1; got {self.kernel}")


#: The projector's sizes by default: small enough for a CPU (the reference's for ResNet-50,
#: the head's own defaults, are features 2048, hidden 8192, 3 layers, out 8192).
PROJECTOR = {"features": 128, "hidden": 512, "depth": 3}


def label_free_losses() -> list[str]:
    """The registered losses a label-free part can learn from: two views, training only,
    no prediction (``barlow``, ``vicreg``, ``simclr``, and a plugin's of that kind)."""
    return [e.name for e in LOSSES if e.meta["views"] == 2 and e.meta["train_only"]
            and not e.meta["logits"] and e.meta["head"] == "classifier"]


class PerView(nn.Module):
    """Runs ``module`` on each of the ``views`` stacked views alone while training, so its
    batch norms take each view's statistics, as the reference's two forward passes do."""

    def __init__(self, module: nn.Module, views: int):
        super().__init__()
        self.module, self.views = module, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.views == 1:
            return self.module(x)
        return torch.cat([self.module(v) for v in x.chunk(self.views)])


class ViewPart(LocalPart):
    """A part whose blocks see each stacked view on its own in a training step."""

    def run_blocks(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        if views == 1:
            return super().run_blocks(x)
        return torch.cat([LocalPart.run_blocks(self, v) for v in x.chunk(views)])

    def forward(self, x, step):
        h = self.run_blocks(x, step.views if step.train else 1)
        return h, self.objective(h, step, x)


@register_rule(
    "blockwise_ssl",
    paper=("Siddiqui, Krueger, LeCun & Deny 2023, Blockwise Self-Supervised Learning at Scale "
           "(arXiv 2302.01647)"),
    summary="every part (a stage) learns on its own from a self-supervised loss of two "
            "augmented views (Barlow Twins) through its own projector; no labels",
)
class BlockwiseSSL(LocalRule):
    """Blockwise self-supervised learning (Siddiqui, Krueger, LeCun & Deny, 2023).

    Each part (a stage at ``--granularity stage``; the stem trains with the first
    stage, as the reference's first loss trains ResNet's stem) learns on its detached
    input from a two-view self-supervised loss (``barlow`` by default; ``vicreg``,
    ``simclr``) of its own ``projector`` head. No part reads a label and the model's
    head is not trained: the accuracy at each depth is the linear probe's. Each view
    goes through a part's blocks and projector on its own, so batch norm normalises
    per view as in the reference (shoaibahmed/blockwise_ssl, ``main.py``).
    docs/rules.md#blockwise_ssl lists what differs from the reference.
    """

    Config = BlockwiseSSLConfig
    label_free = True
    training_defaults = {"probe": "linear", "optimizer": "adamw", "lr": 1e-3,
                         "weight-decay": 1e-6}
    shown = ("head", "loss")

    def _check(self) -> None:
        super()._check()
        fits = label_free_losses()
        if self.loss not in fits:
            raise ConfigError(f"rule 'blockwise_ssl': loss={self.loss} is not a label-free "
                              f"two-view loss; choose one of {', '.join(fits)}")

    def head_options(self, k, local_parts):
        """The ``aux_*`` options; the projector's left at 0 take :data:`PROJECTOR`'s."""
        options = super().head_options(k, local_parts)
        if self.head != "projector":
            return options
        return {**options, **{key: options[key] or value for key, value in PROJECTOR.items()},
                "kernel": self.config.kernel}

    def groups(self, stack: nn.Module) -> list[list[int]]:
        """Block indices of each part: one block each, the stem merged into the next."""
        groups = [[k] for k in range(len(stack.blocks))]
        if self.config.merge_stem and stack.names[0] == "stem" and len(groups) > 1:
            groups[:2] = [[0, 1]]
        return groups

    def parts(self, stack, num_classes, example):
        outputs = block_outputs(stack, example)
        later = later_blocks(stack, example) if reads_later(self.head) else [()] * len(outputs)
        views = LOSSES.get(self.loss).meta["views"]
        groups, parts = self.groups(stack), []
        for k, ids in enumerate(groups):
            name = "+".join(stack.names[i] for i in ids)
            where = f"rule {self.name!r}, block {name!r}"
            objective = self.objective(k, len(groups), outputs[ids[-1]].shape, num_classes,
                                       example, where, later[ids[-1]])
            objective.heads["aux"] = PerView(objective.heads["aux"], views)
            parts.append(ViewPart(name, [stack.blocks[i] for i in ids], ids, objective))
        return parts
