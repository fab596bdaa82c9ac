"""``vgg11_cifar``: VGG-11 with batch norm for 32x32 images, registered in timm's registry.

VGG-11 with batch norm (Simonyan & Zisserman, "Very Deep Convolutional
Networks for Large-Scale Image Recognition", ICLR 2015). The conv trunk is
laid out exactly as timm's ``VGG.features``; the head is a small global-pool
MLP instead of timm's 4096-wide 7x7 ``ConvMlp``, which is sized for 224x224
inputs and would hold most of the parameters. The seed paper (Sakamoto &
Sato, TMLR 2024) trains it with ``resnet18_cifar``. No pretrained weights
exist; ``pretrained=True`` is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import ConfigError
from .cifar import cifar_cfg, no_weights

__all__ = ["CifarVGG", "vgg11_cifar"]

# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {"vgg11_cifar": cifar_cfg(pool_size=(1, 1), first_conv="features.0", classifier="head")}
)


class CifarVGG(nn.Module):
    """VGG with batch norm for small images and a small global-pool MLP head.

    Args:
        cfg: conv widths and ``"M"`` for 2x2 max-pools, as in timm's VGG configs.
        num_classes: classifier outputs; 0 leaves the head an identity.
        in_chans: input channels.
        hidden: width of the MLP between the pooled features and the classifier.
        drop_rate: dropout before the classifier.
        global_pool: pooling type of timm's ``SelectAdaptivePool2d``.
    """

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_chans: int = 3,
        hidden: int = 512,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if not global_pool:
            raise ConfigError("CifarVGG needs a global pool type, e.g. 'avg' or 'max'")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info: list[dict[str, Any]] = []
        layers: list[nn.Module] = []
        chs, stride = in_chans, 1
        for v in cfg:
            if v == "M":
                # Same taps as timm's VGG: the activation before each pool.
                tap = f"features.{len(layers) - 1}"
                self.feature_info.append(dict(num_chs=chs, reduction=stride, module=tap))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stride *= 2
            else:
                layers += [nn.Conv2d(chs, int(v), 3, padding=1), nn.BatchNorm2d(int(v))]
                layers.append(nn.ReLU(inplace=True))
                chs = int(v)
        self.features = nn.Sequential(*layers)
        tap = f"features.{len(layers) - 1}"
        self.feature_info.append(dict(num_chs=chs, reduction=stride, module=tap))
        self.num_features = chs
        self.head_hidden_size = hidden
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.pre_logits = nn.Sequential(
            pool,
            nn.Linear(chs * pool.feat_mult(), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's VGG initialisation, so the two VGGs start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """Return the final classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        if num_classes > 0:
            device = self.pre_logits[1].weight.device
            self.head = nn.Linear(self.head_hidden_size, num_classes, device=device)
        else:
            self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv trunk: (B, C, H, W) -> (B, num_features, H/32, W/32)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, MLP and classifier; ``pre_logits=True`` stops before the classifier."""
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11 with batch norm and a 512-wide global-pool MLP head, for 32x32 inputs."""
    no_weights("vgg11_cifar", pretrained)
    return build_model_with_cfg(
        CifarVGG,
        "vgg11_cifar",
        pretrained,
        model_cfg=_VGG11,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4, 5)),
        **kwargs,
    )
