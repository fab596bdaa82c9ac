"""Small-image backbones registered in timm's own model registry.

Importing this module makes ``timm.create_model("resnet18_cifar")`` and
``timm.create_model("vgg11_cifar")`` work. Both are the 32x32 variants that
local-learning papers train on CIFAR-10; the seed paper (Sakamoto & Sato,
"End-to-End Training Induces Information Bottleneck through Layer-Role
Differentiation", TMLR 2024) trains exactly these two.

- ``resnet18_cifar``: ResNet-18 (He et al., "Deep Residual Learning for Image
  Recognition", CVPR 2016) with the CIFAR stem: one 3x3 stride-1 conv and no
  max-pool, so a 32x32 image keeps full resolution through ``layer1``. It is
  a plain ``timm.models.resnet.ResNet`` so every tool that knows timm's ResNet
  (including :func:`locallearn.blocks.split`) handles it.
- ``vgg11_cifar``: VGG-11 with batch norm (Simonyan & Zisserman, "Very Deep
  Convolutional Networks for Large-Scale Image Recognition", ICLR 2015). The
  conv trunk is laid out exactly as timm's ``VGG.features``; the head is a
  small global-pool MLP instead of timm's 4096-wide 7x7 ``ConvMlp``, which is
  sized for 224x224 inputs and would hold most of the parameters.

No pretrained weights exist for either; ``pretrained=True`` is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from locallearn.errors import ConfigError

__all__ = ["CifarVGG", "FFMlp", "ff_mlp", "resnet18_cifar", "vgg11_cifar"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "license": "apache-2.0",
        **kwargs,
    }


# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {
        "resnet18_cifar": _cfg(first_conv="conv1", classifier="fc"),
        "vgg11_cifar": _cfg(pool_size=(1, 1), first_conv="features.0", classifier="head"),
        "ff_mlp": _cfg(pool_size=(1, 1), first_conv="layers.0.fc", classifier="head"),
    }
)


def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"no pretrained weights exist for {name}; use pretrained=False")


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
    _no_weights("resnet18_cifar", pretrained)
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return build_model_with_cfg(
        _cifar_resnet, "resnet18_cifar", pretrained, **dict(model_args, **kwargs)
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
    _no_weights("vgg11_cifar", pretrained)
    return build_model_with_cfg(
        CifarVGG,
        "vgg11_cifar",
        pretrained,
        model_cfg=_VGG11,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4, 5)),
        **kwargs,
    )


def rms_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each sample (row of the flattened ``x``) to unit root-mean-square."""
    rms = x.flatten(1).pow(2).mean(1).add(eps).sqrt()
    return x / rms.view(-1, *([1] * (x.ndim - 1)))


class FFLayer(nn.Module):
    """Length normalisation of the input, then a linear layer and ReLU (a forward-forward layer).

    Hinton (2022) normalises each hidden vector's length before the next
    layer, so a layer cannot read the previous layer's goodness (the length)
    and must use the direction of its activities. The length here is
    ``sqrt(dim)`` (unit root-mean-square entries) rather than 1, which keeps
    the same direction and suits ``nn.Linear``'s initialisation, made for
    inputs of unit-scale entries.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.fc = nn.Linear(dim_in, dim_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(rms_normalize(x)))


class FFMlp(nn.Module):
    """A fully connected ReLU network on the flattened image, for forward-forward.

    ``stem`` flattens; ``layers`` are :class:`FFLayer`s; ``head`` is a linear
    classifier (trained by backprop rules; forward-forward predicts by goodness).

    Args:
        num_classes: classifier outputs.
        in_chans: image channels.
        img_size: image side.
        widths: the hidden layers' widths.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: tuple[int, ...] = (1000, 1000, 1000)):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        dims = [in_chans * img_size * img_size, *widths]
        self.stem = nn.Flatten()
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.Sequential(*(FFLayer(a, b) for a, b in pairs))
        self.num_features = dims[-1]
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=dims[0], reduction=1, module="stem")] + [
            dict(num_chs=w, reduction=1, module=f"layers.{i}") for i, w in enumerate(widths)
        ]

    def get_classifier(self) -> nn.Module:
        """Return the final classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model
def ff_mlp(pretrained: bool = False, **kwargs: Any) -> FFMlp:
    """3 x 1000 ReLU layers with length normalisation on the flattened image (Hinton 2022)."""
    _no_weights("ff_mlp", pretrained)
    return build_model_with_cfg(FFMlp, "ff_mlp", pretrained, **kwargs)
