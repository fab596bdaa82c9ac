"""Greedy sequential layer-wise training: one part at a time, then frozen."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..losses import LOSSES
from .base import register_rule
from .layerwise import Layerwise, LayerwiseConfig


def phase(epoch: int, epochs: int, parts: int, given: tuple[int, ...], rule: str) -> int:
    """The part that trains in ``epoch`` (0-based) when ``parts`` parts train in turn.

    ``given`` (the rule's ``epochs_per_part`` option) are each part's epochs;
    empty, the ``epochs`` are shared out evenly, the last parts getting one more
    when they do not divide.
    """
    if given:
        if len(given) != parts or sum(given) != epochs or min(given) < 1:
            raise ConfigError(
                f"option 'epochs_per_part' of rule '{rule}' needs {parts} positive "
                f"counts adding up to --epochs {epochs}; got {','.join(map(str, given))}")
        counts = list(given)
    elif epochs < parts:
        raise ConfigError(f"rule '{rule}' trains {parts} parts one after another and needs "
                          f"--epochs >= {parts}; got {epochs}")
    else:
        share, extra = divmod(epochs, parts)
        counts = [share + (k >= parts - extra) for k in range(parts)]
    return bisect.bisect_right(list(itertools.accumulate(counts)), epoch)


@dataclass
class SequentialConfig(LayerwiseConfig):
    """Options of ``sequential``; docs/rules.md describes each. ``frozen_mode=train`` and
    ``head_phase`` are the seed's ``main_lw_seq.py``."""

    epochs_per_part: tuple[int, ...] = ()
    restart_schedule: bool = True
    cache_features: bool = False
    frozen_mode: Literal["eval", "train"] = "eval"
    head_phase: bool = False


@register_rule(
    "sequential",
    paper=(
        "Bengio, Lamblin, Popovici & Larochelle 2006, Greedy Layer-Wise Training of Deep "
        "Networks (NeurIPS); Belilovsky, Eickenberg & Oyallon 2019, Greedy Layerwise Learning "
        "Can Scale to ImageNet (ICML); Sakamoto & Sato 2024 (TMLR), sequential variant"
    ),
    summary="block parts train one after another on their auxiliary heads, each then frozen",
)
class Sequential(Layerwise):
    """Greedy sequential training (Bengio et al. 2006; Belilovsky et al. 2019).

    The parts of ``layerwise`` train one at a time, each then frozen (no autograd, no
    optimizer state; in eval mode, or ``frozen_mode=train`` as the seed's
    ``main_lw_seq.py``). docs/rules.md#sequential compares it with the seed's code.
    """

    Config = SequentialConfig
    shown = ("head", "aux_hidden", "epochs_per_part", "restart_schedule", "cache_features",
             "frozen_mode", "head_phase")

    # Properties, not attributes set once: a subclass may still override them as class attributes.
    restart_schedule = property(lambda self: self.config.restart_schedule)
    cache_inputs = property(lambda self: self.config.cache_features)
    frozen_train_mode = property(lambda self: self.config.frozen_mode == "train")

    def _check(self) -> None:
        super()._check()
        cfg = self.config
        views = LOSSES.get(self.loss).meta["views"]
        if cfg.cache_features and views > 1:
            raise ConfigError(f"rule 'sequential': cache_features computes each frozen output "
                              f"once, without augmentation, so loss {self.loss!r} would get "
                              f"{views} identical views; turn one of them off")
        if cfg.cache_features and cfg.frozen_mode == "train":
            raise ConfigError("rule 'sequential': cache_features computes each frozen output "
                              "once, in eval mode, so frozen_mode=train cannot apply; turn one "
                              "of them off")

    def trained_parts(self, epoch: int, epochs: int, num_parts: int) -> list[int]:
        cfg, blocks = self.config, num_parts - 1  # the last part is the model's head
        k = phase(epoch, epochs, blocks + cfg.head_phase, cfg.epochs_per_part, "sequential")
        if cfg.head_phase:
            return [k]  # k == blocks: the head's phase
        return [k, num_parts - 1] if k == blocks - 1 else [k]
