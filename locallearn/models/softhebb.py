"""``softhebb_cnn``: the three-layer CNN of SoftHebb (Journé et al., ICLR 2023), registered in timm.

Each layer is batch norm without affine parameters, a bias-free convolution with reflect
padding, the triangle activation and a pool, as in the paper's code (github
NeuromorphicComputing/SoftHebb, ``demo.py``, ``DeepSoftHebb``); widths 96, 384, 1536,
scaled by ``width`` so a CPU run can shrink them. The head is dropout and a linear
classifier on the flattened last map. Each convolution carries the paper's SoftHebb
settings as attributes (``t_invert``: the soft winner-take-all's inverse temperature,
``hebb_lr``: its learning rate), which :mod:`locallearn.rules.softhebb` reads. No
pretrained weights exist; ``pretrained=True`` is an error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import ConfigError
from .cifar import cifar_cfg, no_weights

default_cfgs = generate_default_cfgs(
    {"softhebb_cnn": cifar_cfg(pool_size=(4, 4), first_conv="stem.conv", classifier="head.1")}
)

# The paper's layers (demo.py): width, kernel, padding, t_invert, hebb_lr, triangle power.
LAYERS = ((96, 5, 2, 1.0, 0.08, 0.7), (384, 3, 1, 0.65, 0.005, 1.4), (1536, 3, 1, 0.25, 0.01, 1.0))


class Triangle(nn.Module):
    """``relu(u - mean_c(u)) ** power``: each unit minus the mean over channels at its pixel."""

    def __init__(self, power: float = 1.0):
        super().__init__()
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x - x.mean(dim=1, keepdim=True))
        return x if self.power == 1 else x.pow(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power}"


class HebbLayer(nn.Sequential):
    """BN (no affine) -> bias-free reflect-padded conv -> triangle -> pool: one SoftHebb layer."""

    def __init__(self, chs: int, width: int, kernel: int, padding: int, t_invert: float,
                 hebb_lr: float, power: float, pool: nn.Module):
        conv = nn.Conv2d(chs, width, kernel, padding=padding, padding_mode="reflect", bias=False)
        # demo.py's initialisation: normal with std 25 / sqrt(fan_in), so neuron norms
        # start near 25 and the norm-dependent learning rate starts high.
        nn.init.normal_(conv.weight, 0.0, 25 / math.sqrt(chs * kernel * kernel))
        conv.t_invert, conv.hebb_lr = t_invert, hebb_lr
        super().__init__()
        self.bn = nn.BatchNorm2d(chs, affine=False)
        self.conv = conv
        self.act = Triangle(power)
        self.pool = pool


class SoftHebbCNN(nn.Module):
    """The SoftHebb CNN; ``stem`` is its first Hebbian layer, ``layers`` the other two."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 width: float = 1.0, drop_rate: float = 0.5):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ConfigError(f"model option width of softhebb_cnn must be a number > 0 "
                              f"(the multiplier of the widths 96, 384, 1536); got {width!r}")
        if img_size % 8:
            raise ConfigError(f"softhebb_cnn needs an image side divisible by 8 (three "
                              f"halvings); got img_size={img_size}")
        self.num_classes, self.in_chans = num_classes, in_chans
        pools = [nn.MaxPool2d(4, 2, 1), nn.MaxPool2d(4, 2, 1), nn.AvgPool2d(2, 2)]
        layers, chs = [], in_chans
        for (w, k, p, t, lr, power), pool in zip(LAYERS, pools, strict=True):
            w = max(1, round(w * width))
            layers.append(HebbLayer(chs, w, k, p, t, lr, power, pool))
            chs = w
        self.stem = layers[0]
        self.layers = nn.Sequential(*layers[1:])
        self.num_features = chs * (img_size // 8) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(self.num_features, num_classes) if num_classes
                                  else nn.Identity())
        self.feature_info = [dict(num_chs=layer.conv.out_channels, reduction=2 ** (i + 1),
                                  module=name) for i, (name, layer) in
                             enumerate([("stem", self.stem), ("layers.0", self.layers[0]),
                                        ("layers.1", self.layers[1])])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model
def softhebb_cnn(pretrained: bool = False, **kwargs: Any) -> SoftHebbCNN:
    """SoftHebb's CNN (Journé et al. 2023): 96, 384, 1536 channels times ``width``."""
    no_weights("softhebb_cnn", pretrained)
    return build_model_with_cfg(SoftHebbCNN, "softhebb_cnn", pretrained, **kwargs)
