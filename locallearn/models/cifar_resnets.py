"""The CIFAR ResNets of He et al. (2016), registered in timm's model registry.

``resnet32_cifar`` and ``resnet110_cifar``: the 6n+2-layer networks of He, Zhang, Ren &
Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016, section 4.2), n = 5 and
18, with option-B shortcuts as InfoPro's code (docs/presets.md, "The CIFAR ResNets").
Weights start as in He et al. and InfoPro's code (He-normal convs, unit batch norms).
The children are in forward order with ``feature_info`` taps at the stem and every
stage, so :func:`locallearn.split` lays the model out through the generic path.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock
from torch import nn

from ..errors import ConfigError
from .cifar import cifar_cfg, no_weights


class CifarResNet(nn.Module):
    """A 3-stage ResNet for 32x32 images (He et al. 2016, section 4.2), option-B shortcuts.

    ``blocks`` is n of the 6n+2 layers (basic blocks per stage); ``widths`` are the
    channels of the stem and the stages; ``zero_init_last`` zeroes the last batch norm
    weight of every block (timm's default for ImageNet ResNets; not in He et al.).
    """

    def __init__(self, blocks: int = 5, widths: tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 zero_init_last: bool = False):
        super().__init__()
        if blocks < 1 or len(widths) != 3:
            raise ConfigError(f"CifarResNet needs blocks >= 1 and 3 widths; got {blocks}, {widths}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        chs = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(blocks):
                down = None
                if j == 0 and (stride != 1 or chs != width):
                    down = nn.Sequential(nn.Conv2d(chs, width, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(width))
                layer.append(BasicBlock(chs, width, stride if j == 0 else 1, down))
                chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f"layer{i + 1}"))
        self.num_features = chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(chs * self.global_pool.feat_mult(), num_classes) if num_classes \
            else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool and classifier; ``pre_logits=True`` stops after the pool."""
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs({
    name: cifar_cfg(pool_size=(8, 8), first_conv="conv1", classifier="fc")
    for name in ("resnet32_cifar", "resnet110_cifar")
})


def _create(name: str, blocks: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    no_weights(name, pretrained)
    return build_model_with_cfg(CifarResNet, name, pretrained, blocks=blocks,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 3 stages x 5 basic blocks, 16/32/64 channels."""
    return _create("resnet32_cifar", 5, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016): 3 stages x 18 basic blocks, 16/32/64 channels."""
    return _create("resnet110_cifar", 18, pretrained, **kwargs)
