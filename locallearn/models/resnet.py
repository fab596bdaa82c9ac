"""``resnet18_cifar``: timm's ResNet-18 with the CIFAR stem, registered in timm's registry.

ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR
2016) with one 3x3 stride-1 conv and no max-pool as its stem, so a 32x32
image keeps full resolution through ``layer1``. It is a plain
``timm.models.resnet.ResNet`` so every tool that knows timm's ResNet
(including :func:`locallearn.blocks.split`) handles it. The seed paper
(Sakamoto & Sato, TMLR 2024) trains it with ``vgg11_cifar``. No pretrained
weights exist; ``pretrained=True`` is an error.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from .cifar import cifar_cfg, no_weights

__all__ = ["resnet18_cifar"]

# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {"resnet18_cifar": cifar_cfg(pool_size=(4, 4), first_conv="conv1", classifier="fc")}
)


def _cifar_resnet(**kwargs: Any) -> ResNet:
    """Build timm's ResNet, then swap the 7x7/2 stem and max-pool for one 3x3/1 conv."""
    model = ResNet(**kwargs)
    in_chans, width = model.conv1.in_channels, model.conv1.out_channels
    dd = {"device": model.conv1.weight.device, "dtype": model.conv1.weight.dtype}
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    # The stem no longer downsamples (x2 conv stride, x2 max-pool), so every tap is 4x finer,
    # except act1, which only lost the conv's x2.
    for info in model.feature_info:
        info["reduction"] = 1 if info["module"] == "act1" else info["reduction"] // 4
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""
    no_weights("resnet18_cifar", pretrained)
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return build_model_with_cfg(
        _cifar_resnet, "resnet18_cifar", pretrained, **dict(model_args, **kwargs)
    )
