"""InfoPro: local parts trained to keep information about the input and the label."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import block_outputs, register_rule
from .local import LocalConfig, LocalRule


@dataclass
class InfoProConfig(LocalConfig):
    """Options of ``infopro`` (and the shared ones of :class:`~.local.LocalConfig`);
    docs/rules.md describes each. The empty ``lambda_first`` is (5, 0.5) with a single local
    part (K = 2), else (5, 0): the reference's ResNet-110 commands for K = 2 and K = 8.
    ``recompute_heads`` runs the decoder and the auxiliary head again in backward, one at a
    time (:func:`~locallearn.recompute.recomputed`), so a part's peak holds its blocks plus
    the larger head, not both; same gradients, each head runs twice per step. ``man`` > 0
    feeds both heads through MAN's momentum block (:class:`~.local.Momentum`).
    """

    head: str = "infopro"
    lambda_first: tuple[float, ...] = ()
    lambda_last: tuple[float, ...] = (0.0, 1.0)
    aux_loss: str = "contrast"
    temperature: float = 0.07
    decoder_width: int = 12
    recompute_heads: bool = True
    man: float = 0.0

    def __post_init__(self):
        for key in ("lambda_first", "lambda_last"):
            value = getattr(self, key)
            if value and (len(value) != 2 or min(value) < 0):
                raise ConfigError(f"option {key!r} of rule 'infopro' needs two weights >= 0 "
                                  f"(lambda1,lambda2); got {value}")
        if not self.lambda_last:
            raise ConfigError("option 'lambda_last' of rule 'infopro' needs two weights")
        if self.decoder_width < 1:
            raise ConfigError("option 'decoder_width' of rule 'infopro' must be >= 1; "
                              f"got {self.decoder_width}")


@register_rule(
    "infopro",
    paper=(
        "Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised Learning: an "
        "Alternative to End-to-End Training (ICLR); option man: Su et al. 2024, Momentum "
        "Auxiliary Network for Supervised Local Learning (ECCV)"
    ),
    summary="K parts; each local part keeps input (reconstruction) and label information",
)
class InfoPro(LocalRule):
    """InfoPro (Wang, Ni, Song, Yang & Huang, ICLR 2021).

    Every part but the last minimises ``lambda1 * reconstruction + lambda2 * auxiliary
    loss`` (a decoder rebuilding the input image, :meth:`~locallearn.step.Step.image`,
    and the ``1c2f`` net under a contrastive loss), the weights linear from
    ``lambda_first`` to ``lambda_last``; the last part trains with the model's head.
    docs/rules.md#infopro compares it with blackfeather-wang/InfoPro-Pytorch.
    """

    Config = InfoProConfig
    loss_option = "aux_loss"
    model_head = "last_block"
    shown = ("lambda_first", "lambda_last", "aux_loss", "temperature", "decoder_width",
             "recompute_heads")

    def weights(self, k, local_parts):
        """Part ``k``'s (lambda1, lambda2), linear from ``lambda_first`` to ``lambda_last``."""
        first = self.config.lambda_first or ((5.0, 0.5) if local_parts == 1 else (5.0, 0.0))
        recon, aux = (a + (b - a) * k / max(local_parts - 1, 1)
                      for a, b in zip(first, self.config.lambda_last, strict=True))
        return {"reconstruction": recon, "loss": aux}

    def recompute(self, heads):
        # Recomputing lowers the peak only where two heads would otherwise be alive at once.
        return self.config.recompute_heads and len(heads) > 1

    def parts(self, stack, num_classes, example):
        if len(stack.blocks) < 2:
            raise ConfigError("rule 'infopro' needs at least 2 parts; use --blocks K with K >= 2 "
                              "or --split-after NAME,...")
        outputs = block_outputs(stack, example)
        if example.ndim != 4 or any(h.ndim != 4 for h in outputs[:-1]):
            raise ConfigError("rule 'infopro' needs image inputs and (B, C, H, W) block outputs")
        return super().parts(stack, num_classes, example)
