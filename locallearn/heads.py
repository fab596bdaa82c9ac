"""Local objectives' building blocks: auxiliary heads and the classifier objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PoolLinear(nn.Module):
    """Global average pooling then a linear classifier.

    Pools a (B, C, H, W) feature map over space, a (B, N, D) token sequence
    over tokens, and passes (B, D) through; the default auxiliary head of the
    seed paper's layer-wise training.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.fc = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(pool(h))


def pool(h: torch.Tensor) -> torch.Tensor:
    """Average a block output down to one vector per sample (B, D)."""
    if h.ndim == 4:
        return h.mean(dim=(2, 3))
    if h.ndim == 3:
        return h.mean(dim=1)
    return h.flatten(1)


def channels_of(shape: torch.Size) -> int:
    """Feature size left after :func:`pool` for a block output of ``shape`` (batch first)."""
    return shape[1] if len(shape) == 4 else shape[-1] if len(shape) == 3 else int(shape[1:].numel())


class Classifier(nn.Module):
    """Objective that scores a block output with ``head`` and cross-entropy.

    ``forward(h, y)`` returns ``(loss, logits)``; the logits are what the
    trainer counts as this depth's prediction.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(h)
        return F.cross_entropy(logits, y), logits


class NoObjective(nn.Module):
    """Objective of a part that never learns (a frozen feature extractor): no loss, no logits."""

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return h.new_zeros(()), None


class ConvHead(nn.Module):
    """A 3x3 conv-BN-ReLU on a (B, C, H, W) map, then global average pooling and a linear layer.

    Args:
        channels: the map's channels.
        out: outputs of the linear layer.
        width: channels of the conv (0: ``channels``).
        hidden: width of a hidden ReLU layer after pooling (0: none).
    """

    def __init__(self, channels: int, out: int, width: int = 0, hidden: int = 0):
        super().__init__()
        width = width or channels
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.fc = PoolLinear(width, out, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(h))


def make_head(kind: str, shape: torch.Size, out: int, hidden: int = 0) -> nn.Module:
    """An auxiliary head of ``kind`` for block outputs of ``shape``.

    Args:
        kind: ``linear`` (pool + linear), ``mlp`` (pool + hidden ReLU layer +
            linear) or ``conv`` (:class:`ConvHead`; needs (B, C, H, W) outputs).
        shape: the block output's shape, batch first.
        out: the head's outputs.
        hidden: the hidden width of ``mlp`` (0: the pooled feature size).

    Raises:
        ValueError: ``conv`` on an output that is not a feature map, or an unknown kind.
    """
    channels = channels_of(shape)
    if kind == "linear":
        return PoolLinear(channels, out, hidden)
    if kind == "mlp":
        return PoolLinear(channels, out, hidden or channels)
    if kind == "conv":
        if len(shape) != 4:
            raise ValueError(f"a conv head needs (B, C, H, W) block outputs, not {tuple(shape)}")
        return ConvHead(channels, out)
    raise ValueError(f"unknown head kind {kind!r}")
