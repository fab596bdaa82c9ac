"""InfoPro: local parts trained to keep information about the input and the label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads import Classifier
from ..losses import bce_reconstruction, supcon_loss
from ..recompute import recomputed
from .base import Rule, block_outputs, register_rule
from .layerwise import InputMemo, MemoPart


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: upsample to the image size, conv-BN-ReLU, conv, sigmoid.

    Args:
        channels: the part output's channels.
        size: ``(H, W)`` of the input image.
        width: channels of the hidden conv (12 in the paper's code).
        image_channels: channels of the image.
    """

    def __init__(self, channels: int, size: tuple[int, int], width: int = 12,
                 image_channels: int = 3):
        super().__init__()
        self.size = tuple(size)
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, image_channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[2:]) != self.size:  # at the image's size already: no copy
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.net(h)


class AuxNet(nn.Module):
    """InfoPro's auxiliary head: conv-BN-ReLU, global pool, FC-ReLU, FC.

    The conv keeps the channels and has stride 2 on maps of side 16 or more
    (the paper's ``1c2f`` head also strides there; it doubles the channels,
    which costs activation memory in the largest part).
    """

    def __init__(self, channels: int, side: int, out: int, hidden: int = 128):
        super().__init__()
        stride = 2 if side >= 16 else 1
        width = channels
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(h).mean(dim=(2, 3)))


class InfoProObjective(nn.Module):
    """``lambda1 * BCE(decoder(h), image in [0, 1]) + lambda2 * aux loss`` of one local part.

    A term weighted 0 has no module (``decoder`` or ``aux`` is None): it
    would not learn, so it costs no memory or parameters, and a part
    without an auxiliary head does not predict at its depth.

    The image is the network input recorded in ``memo`` by the first part,
    mapped back to [0, 1] with the normalisation the rule's batch hook saw
    (or, without it, by the batch's min and max).
    """

    part_input: torch.Tensor | None = None

    def __init__(self, decoder: Decoder | None, aux: AuxNet | None, lambdas: tuple[float, float],
                 aux_loss: str, memo: InputMemo, rule: InfoPro):
        super().__init__()
        self.decoder, self.aux, self.lambdas, self.aux_loss = decoder, aux, lambdas, aux_loss
        # Recomputing lowers the peak only where two heads would otherwise be alive at once.
        both = decoder is not None and aux is not None
        self.recompute = both and rule.config.recompute_heads
        self.memo, self._rule = memo, [rule]  # a list: the rule is not a submodule

    def forward(self, h: torch.Tensor, y: torch.Tensor):
        l1, l2 = self.lambdas
        value = h.new_zeros((), dtype=torch.float32)
        if self.decoder is not None and self.training:
            image = self._rule[0].target(self.memo.network_input)
            value = value + l1 * self._term(
                self.decoder, lambda z: bce_reconstruction(self.decoder(z), image), h)
        if self.aux is None:  # lambda2 = 0: no auxiliary head, no prediction at this depth
            return value, None
        if self.training:
            return value + l2 * self._term(self.aux, lambda z: self._aux_loss(self.aux(z), y),
                                           h), None
        out = self.aux(h)
        return value + l2 * self._aux_loss(out, y), None if self.aux_loss == "contrast" else out

    def _aux_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.aux_loss == "contrast":
            return supcon_loss(out, y, self._rule[0].config.temperature)
        return F.cross_entropy(out, y)

    def _term(self, head: nn.Module, loss, h: torch.Tensor) -> torch.Tensor:
        """One head's loss on ``h``; with ``recompute`` its graph is rebuilt in backward."""
        return recomputed(loss, head, h) if self.recompute else loss(h)


@dataclass
class InfoProConfig:
    """Options of ``infopro``.

    Attributes:
        lambda_first: (lambda1, lambda2) of the first local part; empty: (5, 0.5)
            when there is a single local part (K = 2), else (5, 0).
        lambda_last: (lambda1, lambda2) of the last local part (part K-1).
        aux_loss: the auxiliary loss: ``ce`` or ``contrast`` (supervised contrastive).
        temperature: temperature of ``contrast``.
        decoder_width: channels of the decoder's hidden conv.
        recompute_heads: keep no activations of the decoder and auxiliary head
            for backward; each runs again in backward, one at a time
            (:func:`~locallearn.recompute.recomputed`), so a part's peak holds
            its blocks plus the larger head, not both. Same gradients; each
            head runs twice per step. Parts with a single head keep it (its
            recomputation would not lower their peak).
    """

    lambda_first: tuple[float, ...] = ()
    lambda_last: tuple[float, ...] = (0.0, 1.0)
    aux_loss: Literal["ce", "contrast"] = "ce"
    temperature: float = 0.07
    decoder_width: int = 12
    recompute_heads: bool = True

    def __post_init__(self):
        for key in ("lambda_first", "lambda_last"):
            value = getattr(self, key)
            if value and (len(value) != 2 or min(value) < 0):
                raise ConfigError(f"option {key!r} of rule 'infopro' needs two weights >= 0 "
                                  f"(lambda1,lambda2); got {value}")
        if not self.lambda_last:
            raise ConfigError("option 'lambda_last' of rule 'infopro' needs two weights")
        if self.temperature <= 0 or self.decoder_width < 1:
            raise ConfigError("options 'temperature' > 0 and 'decoder_width' >= 1 of rule "
                              f"'infopro'; got {self.temperature} and {self.decoder_width}")


def lambda_schedule(first: tuple[float, float], last: tuple[float, float],
                    local_parts: int) -> list[tuple[float, float]]:
    """(lambda1, lambda2) of each local part, linear from ``first`` to ``last``."""
    if local_parts == 1:
        return [tuple(first)]
    return [tuple(a + (b - a) * k / (local_parts - 1) for a, b in zip(first, last, strict=True))
            for k in range(local_parts)]


@register_rule(
    "infopro",
    paper=(
        "Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised Learning: an "
        "Alternative to End-to-End Training (ICLR)"
    ),
    summary="K parts; each local part keeps input (reconstruction) and label information",
)
class InfoPro(Rule):
    """InfoPro (Wang, Ni, Song, Yang & Huang, ICLR 2021).

    Each block of the stack (``--blocks K`` groups it into K parts balanced by
    activation memory, as InfoPro* does) is a part. Every part but the last
    minimises ``lambda1 * reconstruction + lambda2 * auxiliary loss``: a small
    decoder rebuilds the input image from the part's output (binary
    cross-entropy against the image in [0, 1]), and an auxiliary head
    classifies it. The weights are interpolated linearly from ``lambda_first``
    at the first part to ``lambda_last`` at the last local part. The last part
    trains with the model's head and plain cross-entropy.

    The decoder's target is the network input: the first part records it in
    a memo shared by the parts of the step (:class:`~.layerwise.MemoPart`),
    and the batch hook records the normalisation to undo.
    """

    Config = InfoProConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch(self, images, labels, transform, generator=None, train=True):
        self._stats = (transform.mean, transform.std)
        return transform(images, generator), labels

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The network input ``x`` mapped to [0, 1]."""
        if x is None:
            raise ConfigError("rule 'infopro' needs the network input in every step")
        if self._stats is not None:
            mean, std = (t.to(x.device, x.dtype) for t in self._stats)
            return (x * std + mean).clamp(0, 1)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)

    def lambdas(self, local_parts: int) -> list[tuple[float, float]]:
        """The (lambda1, lambda2) of each of ``local_parts`` local parts."""
        first = self.config.lambda_first or ((5.0, 0.5) if local_parts == 1 else (5.0, 0.0))
        return lambda_schedule(first, self.config.lambda_last, local_parts)

    def parts(self, stack, num_classes, example):
        n = len(stack.blocks)
        if n < 2:
            raise ConfigError("rule 'infopro' needs at least 2 parts; use --blocks K with K >= 2")
        outputs = block_outputs(stack, example)
        if example.ndim != 4 or any(h.ndim != 4 for h in outputs[:-1]):
            raise ConfigError("rule 'infopro' needs image inputs and (B, C, H, W) block outputs")
        memo, parts = InputMemo(), []
        weights = self.lambdas(n - 1)
        aux_out = 128 if self.config.aux_loss == "contrast" else num_classes
        for k, (block, h) in enumerate(zip(stack.blocks, outputs, strict=True)):
            if k == n - 1:
                objective = Classifier(stack.head)
            else:
                decoder = Decoder(h.shape[1], example.shape[2:], self.config.decoder_width,
                                  example.shape[1]) if weights[k][0] else None
                aux = AuxNet(h.shape[1], h.shape[2], aux_out) if weights[k][1] else None
                objective = InfoProObjective(decoder, aux, weights[k], self.config.aux_loss,
                                             memo, self)
            parts.append(MemoPart(stack.names[k], [block], [k], objective, memo=memo,
                                  first=k == 0))
        return parts
