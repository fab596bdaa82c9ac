"""Greedy sequential layer-wise training: one part at a time, then frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..losses import LOSSES
from .base import register_rule
from .layerwise import Layerwise, LayerwiseConfig


def share_epochs(epochs: int, parts: int, given: tuple[int, ...], rule: str) -> list[int]:
    """Epochs of each of ``parts`` parts trained one after another.

    ``given`` (the rule's ``epochs_per_part`` option) is checked and returned;
    empty, the epochs are shared out evenly, the last parts getting one more
    when they do not divide.
    """
    if given:
        if len(given) != parts or sum(given) != epochs or min(given) < 1:
            raise ConfigError(
                f"option 'epochs_per_part' of rule '{rule}' needs {parts} positive "
                f"counts adding up to --epochs {epochs}; got {','.join(map(str, given))}"
            )
        return list(given)
    if epochs < parts:
        raise ConfigError(
            f"rule '{rule}' trains {parts} parts one after another and needs "
            f"--epochs >= {parts}; got {epochs}"
        )
    share, extra = divmod(epochs, parts)
    return [share + (k >= parts - extra) for k in range(parts)]


def phase(epoch: int, epochs_per_part: list[int]) -> int:
    """The part that trains in ``epoch`` (0-based) when parts train in turn."""
    end = 0
    for k, count in enumerate(epochs_per_part):
        end += count
        if epoch < end:
            return k
    raise ValueError(f"epoch {epoch} is past the last part's epochs")


@dataclass
class SequentialConfig(LayerwiseConfig):
    """Options of ``sequential``.

    Attributes:
        epochs_per_part: epochs of each phase, in order (each block part, then
            the model's head with ``head_phase``); must add up to ``--epochs``.
            Empty: the epochs are shared out evenly, the last phases getting one
            more when they do not divide.
        restart_schedule: each part runs the whole learning-rate schedule over
            its own epochs, as the seed code does; false: one schedule over the run.
        cache_features: cache the frozen prefix's outputs on the un-augmented
            training set once per part, instead of recomputing them every step.
        frozen_mode: ``eval``: frozen parts run in eval mode; ``train`` (the
            seed's ``main_lw_seq.py``): the whole model stays in training mode,
            so frozen blocks' BatchNorm keeps updating its running statistics
            and their dropout stays active. Either way without autograd.
        head_phase: train the model's head in a last phase of its own, after
            every block, on the frozen network (the seed's ``main_lw_seq.py``);
            false: it trains together with the last block.
    """

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

    The parts are those of ``layerwise`` (each block with its auxiliary head,
    then the model's head). Part k trains alone for its share of the epochs
    with its auxiliary head, then is frozen: it runs without autograd and
    holds no optimizer state while the next part trains on its outputs, in
    eval mode by default or in training mode with ``frozen_mode=train``. The
    model's head trains together with the last block, or in a last phase of
    its own with ``head_phase`` (the seed's sequential variant, Sakamoto &
    Sato 2024, keitaroskmt/E2E-info ``main_lw_seq.py``). With
    ``cache_features`` the frozen prefix's outputs are computed once per part.
    """

    Config = SequentialConfig
    shown = ("head", "aux_hidden", "epochs_per_part", "restart_schedule", "cache_features",
             "frozen_mode", "head_phase")

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

    @property
    def restart_schedule(self) -> bool:
        return self.config.restart_schedule

    @property
    def cache_inputs(self) -> bool:
        return self.config.cache_features

    @property
    def frozen_train_mode(self) -> bool:
        return self.config.frozen_mode == "train"

    def epochs_per_part(self, epochs: int, blocks: int) -> list[int]:
        """Epochs of each phase: each of the ``blocks`` block parts, then the head's own."""
        phases = blocks + self.config.head_phase
        return share_epochs(epochs, phases, self.config.epochs_per_part, "sequential")

    def trained_parts(self, epoch: int, epochs: int, num_parts: int) -> list[int]:
        blocks = num_parts - 1  # the last part is the model's head
        k = phase(epoch, self.epochs_per_part(epochs, blocks))
        if self.config.head_phase:
            return [k]  # k == blocks: the head's phase
        return [k, num_parts - 1] if k == blocks - 1 else [k]
