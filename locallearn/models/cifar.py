"""What the small-image backbones share: CIFAR-10 statistics, timm's pretrained-cfg, checks."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained-cfg of a weightless 32x32 CIFAR-10 model; ``kwargs`` add or override."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "license": "apache-2.0",
        **kwargs,
    }


def no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"no pretrained weights exist for {name}; use pretrained=False")


def dropout_rate(name: str, rate: Any) -> float:
    """Model option ``name``, a dropout rate, checked to be a number in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"model option {name} must be a dropout rate in [0, 1); got {rate!r}")
    return float(rate)
