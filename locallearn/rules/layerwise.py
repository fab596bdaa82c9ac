"""Simultaneous layer-wise training with auxiliary heads and a choice of local losses."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register_rule
from .local import LocalConfig, LocalRule


@dataclass
class LayerwiseConfig(LocalConfig):
    """Options of ``layerwise`` and ``sequential`` (and the shared ones of
    :class:`~.local.LocalConfig`); docs/rules.md describes each."""

    head: str = "reduced_linear"
    loss: str = "ce"


@register_rule(
    "layerwise",
    paper=(
        "Sakamoto & Sato 2024, End-to-End Training Induces Information Bottleneck through "
        "Layer-Role Differentiation (TMLR); Belilovsky, Eickenberg & Oyallon 2019, Greedy "
        "Layerwise Learning Can Scale to ImageNet (ICML); losses of Nøkland & Eidnes 2019 "
        "(predsim) and Khosla et al. 2020 (supcon)"
    ),
    summary="every block trains on its own auxiliary head's local loss, all at once",
)
class Layerwise(LocalRule):
    """Layer-wise training as in Sakamoto & Sato (TMLR 2024), all blocks at once.

    Every block is a part with its own auxiliary head (by default the seed's
    ``reduced_linear``) and local loss, on its detached input; the model's head is a last
    part. Its training defaults are the seed's Adam, without which the seed's head
    diverges under SGD: docs/rules.md#layerwise has the references and the measurements.
    """

    Config = LayerwiseConfig
    training_defaults = {"optimizer": "adamw", "lr": 5e-4, "weight-decay": 0.0}
    shown = ("head", "aux_hidden")
