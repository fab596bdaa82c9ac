"""``vgg11_cifar``: VGG-11 with batch norm for 32x32 images, registered in timm's registry.

VGG-11 with batch norm (Simonyan & Zisserman, ICLR 2015): the conv trunk laid out as
timm's ``VGG.features``, and a small global-pool MLP head instead of timm's 4096-wide
7x7 ``ConvMlp``, which is sized for 224x224 inputs and would hold most of the
parameters. No pretrained weights exist; ``pretrained=True`` is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import ConfigError
from .cifar import cifar_cfg, dropout_rate, no_weights

# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {"vgg11_cifar": cifar_cfg(pool_size=(1, 1), first_conv="features.0", classifier="head")}
)


class CifarVGG(nn.Module):
    """VGG with batch norm for small images and a small global-pool MLP head.

    By default the pooled conv features go through one hidden layer (linear,
    ReLU, dropout) inside the head. ``drop_conv``, ``fc_layers`` and ``pool_first``
    build the seed paper's layer-wise VGG (docs/presets.md, "The seed paper's
    networks"). ``cfg`` lists conv widths and ``"M"`` for 2x2 max-pools, as timm's
    VGG configs; ``hidden`` is the width of the hidden fully connected layers, each
    followed by dropout ``drop_rate``.
    """

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_chans: int = 3,
                 hidden: int = 512, drop_rate: float = 0.0, global_pool: str = "avg",
                 drop_conv: float = 0.0, fc_layers: int = 0, pool_first: bool = False):
        super().__init__()
        if not global_pool:
            raise ConfigError("CifarVGG needs a global pool type, e.g. 'avg' or 'max'")
        if isinstance(fc_layers, bool) or not isinstance(fc_layers, int) or fc_layers < 0:
            raise ConfigError(f"model option fc_layers must be a whole number >= 0; "
                              f"got {fc_layers!r}")
        if not isinstance(pool_first, bool):
            raise ConfigError(f"model option pool_first must be true or false; got {pool_first!r}")
        drop_rate = dropout_rate("drop_rate", drop_rate)
        drop_conv = dropout_rate("drop_conv", drop_conv)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.fc_layers, self.pool_first = fc_layers, pool_first
        self.feature_info: list[dict[str, Any]] = []
        layers: list[nn.Module] = []
        chs, stride = in_chans, 1
        for v in cfg:
            if v == "M":
                # Same taps as timm's VGG: the unit's output before each pool.
                tap = f"features.{len(layers) - 1}"
                self.feature_info.append(dict(num_chs=chs, reduction=stride, module=tap))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stride *= 2
            else:
                layers += [nn.Conv2d(chs, int(v), 3, padding=1), nn.BatchNorm2d(int(v))]
                layers.append(nn.ReLU(inplace=True))
                if drop_conv:
                    layers.append(nn.Dropout(drop_conv))
                chs = int(v)
        self.features = nn.Sequential(*layers)
        tap = f"features.{len(layers) - 1}"
        self.feature_info.append(dict(num_chs=chs, reduction=stride, module=tap))
        self.num_features = chs
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        width = chs * pool.feat_mult()
        if fc_layers:
            units = []
            for i in range(fc_layers):
                unit = [nn.Linear(width if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden),
                        nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
                units.append(nn.Sequential(pool, *unit) if i == 0 else nn.Sequential(*unit))
            self.pre_logits = nn.Sequential(*units)
        else:
            self.pre_logits = nn.Sequential(
                pool, nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate))
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        # timm's VGG initialisation, so the two VGGs start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11 with batch norm and a 512-wide global-pool MLP head, for 32x32 inputs.

    The seed paper's layer-wise VGG-11: ``--model-opt drop_conv=0.2 --model-opt
    fc_layers=2 --model-opt drop_rate=0.2 --model-opt pool_first=true``.
    """
    no_weights("vgg11_cifar", pretrained)
    return build_model_with_cfg(CifarVGG, "vgg11_cifar", pretrained, model_cfg=_VGG11,
                                feature_cfg=dict(flatten_sequential=True,
                                                 out_indices=(0, 1, 2, 3, 4, 5)), **kwargs)
