"""Decoupled greedy learning: every part, its own auxiliary network and optimizer, every batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import ConfigError
from ..heads import Classifier, PoolLinear, channels_of
from .base import LocalPart, Rule, block_outputs, register_rule


class ConvAux(nn.Module):
    """DGL's CNN auxiliary network: 3x3 conv-BN-ReLU layers, average pooling, linear.

    Args:
        channels: the block's output channels.
        num_classes: number of labels.
        depth: number of conv-BN-ReLU layers.
        pool: side of the average-pooled map fed to the linear layer.
    """

    def __init__(self, channels: int, num_classes: int, depth: int = 2, pool: int = 2):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, h):
        return self.fc(self.pool(self.convs(h)).flatten(1))


class MlpSrAux(nn.Module):
    """DGL's MLP-SR auxiliary network: spatial reduction, then 1x1 convs (an MLP per site).

    Averages the map down to ``pool`` x ``pool`` first, so the auxiliary
    network costs little however large the block output is.
    """

    def __init__(self, channels: int, num_classes: int, depth: int = 3, pool: int = 2,
                 hidden: int = 0):
        super().__init__()
        hidden = hidden or channels
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool)]
        width = channels
        for _ in range(depth):
            layers += [nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.fc = nn.Linear(width * pool * pool, num_classes)

    def forward(self, h):
        return self.fc(self.mlp(h).flatten(1))


@dataclass
class DGLConfig:
    """Options of ``dgl``.

    Attributes:
        aux: auxiliary network: ``cnn`` (default), ``mlp_sr``, or ``linear``
            (pool + linear, the only one for token outputs such as ViT's).
        aux_depth: conv layers of the ``cnn`` aux net (default 2) or 1x1 layers
            of ``mlp_sr`` (0 picks each one's default).
        aux_pool: side of the pooled map the aux net's linear layer reads.
        lr_scales: per-part learning-rate multipliers, one per part; empty: all 1.
    """

    aux: Literal["cnn", "mlp_sr", "linear"] = "cnn"
    aux_depth: int = 0
    aux_pool: int = 2
    lr_scales: tuple[float, ...] = ()

    def __post_init__(self):
        if self.aux_depth < 0 or self.aux_pool < 1:
            raise ConfigError("options 'aux_depth' >= 0 and 'aux_pool' >= 1 of rule 'dgl'; "
                              f"got {self.aux_depth} and {self.aux_pool}")
        if any(s <= 0 for s in self.lr_scales):
            raise ConfigError(f"option 'lr_scales' of rule 'dgl' must be positive; "
                              f"got {self.lr_scales}")


@register_rule(
    "dgl",
    paper=(
        "Belilovsky, Eickenberg & Oyallon 2020, Decoupled Greedy Learning of CNNs (ICML)"
    ),
    summary="every part updates each batch on its own auxiliary network and optimizer",
)
class DGL(Rule):
    """Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020).

    Each block of the stack is a part with an auxiliary network of its own
    (by default the paper's CNN auxiliary: conv-BN-ReLU layers, 2x2 average
    pooling, linear); its input is detached and it updates on every batch
    with its own optimizer, so parts could run on different devices with
    only a forward dependency. The last block trains with the model's own
    head as its objective, as the network's final module does in the paper.
    """

    Config = DGLConfig

    def _aux(self, shape, num_classes: int, name: str) -> nn.Module:
        cfg = self.config
        if cfg.aux == "linear":
            return PoolLinear(channels_of(shape), num_classes)
        if len(shape) != 4:
            raise ConfigError(
                f"rule 'dgl': the {cfg.aux} auxiliary net needs (B, C, H, W) block outputs, but "
                f"block {name!r} gives {tuple(shape)}; use --rule-opt aux=linear"
            )
        if cfg.aux == "mlp_sr":
            return MlpSrAux(shape[1], num_classes, cfg.aux_depth or 3, cfg.aux_pool)
        return ConvAux(shape[1], num_classes, cfg.aux_depth or 2, cfg.aux_pool)

    def parts(self, stack, num_classes, example):
        n = len(stack.blocks)
        scales = self.config.lr_scales or (1.0,) * n
        if len(scales) != n:
            raise ConfigError(f"option 'lr_scales' of rule 'dgl' needs one value per part ({n}); "
                              f"got {len(scales)}")
        outputs = block_outputs(stack, example)
        parts = []
        for k, (block, h) in enumerate(zip(stack.blocks, outputs, strict=True)):
            last = k == n - 1
            head = stack.head if last else self._aux(h.shape, num_classes, stack.names[k])
            parts.append(LocalPart(stack.names[k], [block], [k], Classifier(head), scales[k]))
        return parts
