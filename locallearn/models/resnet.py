"""``resnet18_cifar``: timm's ResNet-18 with the CIFAR stem, registered in timm's registry.

A plain ``timm.models.resnet.ResNet`` (so everything that knows timm's ResNet handles
it) with one 3x3 stride-1 conv and no max-pool as its stem: the seed paper's network
(kuangliu's CIFAR ResNet-18). Its options ``zero_init_last`` (False here, as the seed's)
and ``drop_stem`` (dropout where the max-pool was) are docs/presets.md's "The seed
paper's networks". No pretrained weights exist; ``pretrained=True`` is an error.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from .cifar import cifar_cfg, dropout_rate, no_weights

# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {"resnet18_cifar": cifar_cfg(pool_size=(4, 4), first_conv="conv1", classifier="fc")}
)


def _cifar_resnet(drop_stem: float = 0.0, **kwargs: Any) -> ResNet:
    """Build timm's ResNet, then swap the 7x7/2 stem and max-pool for one 3x3/1 conv
    (and ``Dropout(drop_stem)`` where the max-pool was)."""
    drop_stem = dropout_rate("drop_stem", drop_stem)
    model = ResNet(**kwargs)
    in_chans, width = model.conv1.in_channels, model.conv1.out_channels
    dd = {"device": model.conv1.weight.device, "dtype": model.conv1.weight.dtype}
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Dropout(drop_stem) if drop_stem else nn.Identity()
    # The stem no longer downsamples (x2 conv stride, x2 max-pool), so every tap is 4x finer,
    # except act1, which only lost the conv's x2.
    for info in model.feature_info:
        info["reduction"] = 1 if info["module"] == "act1" else info["reduction"] // 4
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs.

    Options (``--model-opt``) besides timm ResNet's: ``drop_stem`` (dropout after
    the stem, 0.2 in the seed paper's layer-wise ResNet); ``zero_init_last``
    defaults to False, as the seed's ResNet (True: timm's zeroed last batch norms).
    """
    no_weights("resnet18_cifar", pretrained)
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), zero_init_last=False)
    return build_model_with_cfg(
        _cifar_resnet, "resnet18_cifar", pretrained, **dict(model_args, **kwargs)
    )
