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

    Every block of the stack is a part with its own auxiliary head and local
    loss. By default the seed's head (keitaroskmt/E2E-info,
    ``src/models/trainable_block.py``, from Nøkland & Eidnes' local-loss code,
    ``head=reduced_linear``): the block output average-pooled to at most 2048
    values with its spatial layout kept, then a linear layer, trained by
    cross-entropy; ``head=linear`` is global average pooling + linear. Each part's
    input is detached, so no gradient crosses a block boundary, and all
    parts update on every batch. The model's own
    head is a last part trained on the detached output of the final block.
    Grouping blocks with ``--blocks K`` gives K parts. Local losses:
    cross-entropy; ``predsim`` (Nøkland & Eidnes, "Training Neural Networks
    with Local Error Signals", ICML 2019); ``supcon`` (Khosla et al.,
    "Supervised Contrastive Learning", NeurIPS 2020) on two augmented views;
    each optionally minus ``nhsic_lambda`` times nHSIC of the head's output
    with the network's or the block's input (the seed paper's augmenting
    term). Any registered head or loss can take their place.

    Training defaults (``training_defaults``; the command line and presets override
    them): Adam (AdamW without weight decay) at lr 5e-4, the seed's optimizer
    (``conf/main_lw.yaml`` and ``conf/optimizer/adam.yaml``). Its head needs it: a
    2048-feature linear layer on unnormalised pooled maps diverges under SGD at
    lr 0.05 (the README's main job on 2,000 images stayed at chance; docs/rules.md).
    """

    Config = LayerwiseConfig
    training_defaults = {"optimizer": "adamw", "lr": 5e-4, "weight-decay": 0.0}
    shown = ("head", "aux_hidden")
