"""``ff_mlp``: the fully connected network of forward-forward (Hinton 2022), registered in timm.

Each layer normalises the length of its input, then applies a linear layer
and ReLU; :func:`rms_normalize` is that normalisation, also used by the
forward-forward rule. No pretrained weights exist; ``pretrained=True`` is an
error.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .cifar import cifar_cfg, no_weights

# register_model reads this module-level name when each entrypoint is decorated.
default_cfgs = generate_default_cfgs(
    {"ff_mlp": cifar_cfg(pool_size=(1, 1), first_conv="layers.0.fc", classifier="head")}
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model
def ff_mlp(pretrained: bool = False, **kwargs: Any) -> FFMlp:
    """3 x 1000 ReLU layers with length normalisation on the flattened image (Hinton 2022)."""
    no_weights("ff_mlp", pretrained)
    return build_model_with_cfg(FFMlp, "ff_mlp", pretrained, **kwargs)
