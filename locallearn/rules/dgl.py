"""Decoupled greedy learning: every part, its own auxiliary network and optimizer, every batch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import register_rule
from .local import LocalConfig, LocalRule


@dataclass
class DGLConfig(LocalConfig):
    """Options of ``dgl`` (and the shared ones of :class:`~.local.LocalConfig`); docs/rules.md
    describes each. ``aux`` is the auxiliary network, by default MLP-SR, the one every
    DGL training script of the reference code (eugenium/DGL) builds; ``man`` > 0 feeds it
    through MAN's momentum block (:class:`~.local.Momentum`)."""

    aux: str = "mlp_sr"
    loss: str = "ce"
    lr_scales: tuple[float, ...] = ()
    man: float = 0.0

    def __post_init__(self):
        if any(s <= 0 for s in self.lr_scales):
            raise ConfigError(f"option 'lr_scales' of rule 'dgl' must be positive; "
                              f"got {self.lr_scales}")


@register_rule(
    "dgl",
    paper=(
        "Belilovsky, Eickenberg & Oyallon 2020, Decoupled Greedy Learning of CNNs (ICML); "
        "option man: Su et al. 2024, Momentum Auxiliary Network for Supervised Local "
        "Learning (ECCV)"
    ),
    summary="every part updates each batch on its own auxiliary network and optimizer",
)
class DGL(LocalRule):
    """Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020).

    Each block is a part with an auxiliary network (the paper's MLP-SR auxiliary) and an
    optimizer of its own, updating on every batch on its detached input; the last block
    trains with the model's head. docs/rules.md#dgl compares it with eugenium/DGL.
    """

    Config = DGLConfig
    head_option = "aux"
    model_head = "last_block"
    shown = ("aux", "aux_depth", "aux_pool", "lr_scales")

    def part_scales(self, num_parts: int) -> list[float]:
        scales = self.config.lr_scales or (1.0,) * num_parts
        if len(scales) != num_parts:
            raise ConfigError(f"option 'lr_scales' of rule 'dgl' needs one value per part "
                              f"({num_parts}); got {len(scales)}")
        return list(scales)
