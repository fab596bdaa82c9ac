"""Simultaneous layer-wise training with auxiliary heads and a choice of local losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads import make_head, pool
from ..hsic import differentiable_nhsic
from ..losses import predsim_loss, supcon_loss
from .base import LocalPart, Rule, block_outputs, register_rule


class InputMemo:
    """What the parts of one step share besides ``(h, y)``: the network's input.

    The first part records its input (the network input) here before running
    its blocks; later parts' objectives read it in the same step, which is
    how an objective sees the image without the contract passing it around.
    """

    def __init__(self):
        self.network_input: torch.Tensor | None = None


class MemoPart(LocalPart):
    """A :class:`LocalPart` that hands its input to its objective (``objective.part_input``).

    The first part (``first=True``) also records its input as the network
    input in the shared ``memo``.
    """

    def __init__(self, *args: Any, memo: InputMemo, first: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.memo, self.first = memo, first

    def forward(self, x, y):
        if self.first:
            self.memo.network_input = x
        self.objective.part_input = x
        try:
            return super().forward(x, y)
        finally:
            self.objective.part_input = None


class SpatialStd(nn.Module):
    """A 3x3 conv, then each channel's standard deviation over space (Nøkland & Eidnes 2019).

    A 1x1 map has no spread over space (the standard deviation of one value is
    undefined), so there the conv's channel values themselves are compared.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.conv(h).flatten(2)
        return z.std(dim=2) if z.shape[2] > 1 else z.squeeze(2)


class LocalObjective(nn.Module):
    """A part's local loss on its auxiliary head's output.

    ``forward(h, y)`` returns ``(loss, logits)``. With two stacked views per
    image (``h`` has a multiple of ``len(y)`` rows) the labels are repeated and
    the logits of the first view are returned.

    Args:
        head: the auxiliary head (classifier, or projection for ``supcon``).
        loss: ``ce``, ``predsim`` or ``supcon``.
        num_classes: number of labels.
        sim: the similarity branch of ``predsim``.
        beta: ``predsim``'s similarity weight.
        temperature: ``supcon``'s temperature.
        nhsic_lambda: weight of the subtracted nHSIC(head output; target) term.
        nhsic_target: ``input`` (the network input) or ``block_input`` (the part's input).
        memo: where the network input is found.
    """

    part_input: torch.Tensor | None = None

    def __init__(self, head: nn.Module, loss: str = "ce", num_classes: int = 0,
                 sim: nn.Module | None = None, beta: float = 0.99, temperature: float = 0.1,
                 nhsic_lambda: float = 0.0, nhsic_target: str = "input",
                 memo: InputMemo | None = None):
        super().__init__()
        self.head, self.sim, self.loss = head, sim, loss
        self.num_classes, self.beta, self.temperature = num_classes, beta, temperature
        self.nhsic_lambda, self.nhsic_target, self.memo = nhsic_lambda, nhsic_target, memo

    def forward(self, h: torch.Tensor, y: torch.Tensor):
        views = h.shape[0] // y.shape[0]
        labels = y.repeat(views) if views > 1 else y
        out = self.head(h)
        logits = None if self.loss == "supcon" else out
        if self.loss == "ce":
            value = F.cross_entropy(out, labels)
        elif self.loss == "predsim":
            value = predsim_loss(out, self.sim(h), labels, self.num_classes, self.beta)
        else:
            value = supcon_loss(out, labels, self.temperature)
        if self.nhsic_lambda and self.training:
            value = value - self.nhsic_lambda * differentiable_nhsic(
                out.float(), self._nhsic_target().flatten(1).float()
            ).to(value.dtype)
        return value, None if logits is None else logits[: len(y)]

    def _nhsic_target(self) -> torch.Tensor:
        x = self.memo.network_input if self.nhsic_target == "input" else self.part_input
        if x is None:
            raise ConfigError(f"nhsic_target={self.nhsic_target} needs the {self.nhsic_target}, "
                              "which this step does not see (cached features?)")
        return x


@dataclass
class LayerwiseConfig:
    """Options of ``layerwise`` (and ``sequential``).

    Attributes:
        aux_hidden: width of a hidden layer in each auxiliary head; with
            ``head=linear`` a positive width makes it an MLP (as before);
            0 gives the seed paper's global-average-pool + linear head.
        loss: the local loss: ``ce``, ``predsim`` or ``supcon``.
        head: the auxiliary head: ``linear``, ``mlp`` or ``conv``.
        beta: ``predsim``'s weight of similarity matching.
        temperature: ``supcon``'s softmax temperature.
        proj_dim: ``supcon``'s projection size.
        nhsic_lambda: subtract ``nhsic_lambda * nHSIC(aux output; target)`` from each local loss.
        nhsic_target: ``input`` (the network input) or ``block_input`` (the block's own input).
    """

    aux_hidden: int = 0
    loss: Literal["ce", "predsim", "supcon"] = "ce"
    head: Literal["linear", "mlp", "conv"] = "linear"
    beta: float = 0.99
    temperature: float = 0.1
    proj_dim: int = 128
    nhsic_lambda: float = 0.0
    nhsic_target: Literal["input", "block_input"] = "input"

    def __post_init__(self):
        for key in ("aux_hidden", "nhsic_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"option {key!r} of rule 'layerwise' must be >= 0; "
                                  f"got {getattr(self, key)}")
        if not 0 <= self.beta <= 1 or self.temperature <= 0 or self.proj_dim < 1:
            raise ConfigError("options of rule 'layerwise' need 0 <= beta <= 1, temperature > 0 "
                              f"and proj_dim >= 1; got {self.beta}, {self.temperature}, "
                              f"{self.proj_dim}")


@register_rule(
    "layerwise",
    paper=(
        "Sakamoto & Sato 2024, End-to-End Training Induces Information Bottleneck through "
        "Layer-Role Differentiation (TMLR); Belilovsky, Eickenberg & Oyallon 2019, Greedy "
        "Layerwise Learning Can Scale to ImageNet (ICML); losses of Nøkland & Eidnes 2019 "
        "(predsim) and Khosla et al. 2020 (supcon)"
    ),
    summary="every block trains on its own auxiliary head's local loss, all at once",
)
class Layerwise(Rule):
    """Layer-wise training as in Sakamoto & Sato (TMLR 2024), all blocks at once.

    Every block of the stack is a part with its own auxiliary head and local
    loss (global average pool + linear and cross-entropy by default); each
    part's input is detached, so no gradient crosses a block boundary, and
    all parts update on every batch. The model's own head is a last part
    trained on the detached output of the final block. Grouping blocks with
    ``--blocks K`` gives K parts. Local losses: cross-entropy; ``predsim``
    (Nøkland & Eidnes, "Training Neural Networks with Local Error Signals",
    ICML 2019); ``supcon`` (Khosla et al., "Supervised Contrastive Learning",
    NeurIPS 2020) on two augmented views; each optionally minus
    ``nhsic_lambda`` times nHSIC of the head's output with the network's or
    the block's input (the seed paper's augmenting term).
    """

    Config = LayerwiseConfig

    def describe(self):
        """The resolved options; the local-loss family's only where they differ from default."""
        options, default = super().describe(), LayerwiseConfig()
        return {k: v for k, v in options.items()
                if k not in _FAMILY or v != getattr(default, k)}

    def batch(self, images, labels, transform, generator=None, train=True):
        if train and self.config.loss == "supcon":  # two augmented views, stacked
            return torch.cat([transform(images, generator), transform(images, generator)]), labels
        return super().batch(images, labels, transform, generator, train)

    def _objective(self, shape, num_classes: int, memo: InputMemo, name: str) -> LocalObjective:
        cfg = self.config
        out = cfg.proj_dim if cfg.loss == "supcon" else num_classes
        try:
            head = make_head(cfg.head, shape, out, cfg.aux_hidden)
        except ValueError as e:
            raise ConfigError(f"rule {self.name!r}, block {name!r}: {e}") from None
        sim = None
        if cfg.loss == "predsim":
            sim = SpatialStd(shape[1]) if len(shape) == 4 else _Pool()
        return LocalObjective(head, cfg.loss, num_classes, sim, cfg.beta, cfg.temperature,
                              cfg.nhsic_lambda, cfg.nhsic_target, memo)

    def parts(self, stack, num_classes, example):
        memo, parts = InputMemo(), []
        outputs = block_outputs(stack, example)
        for k, (block, h) in enumerate(zip(stack.blocks, outputs, strict=True)):
            objective = self._objective(h.shape, num_classes, memo, stack.names[k])
            parts.append(MemoPart(stack.names[k], [block], [k], objective, memo=memo,
                                  first=k == 0))
        parts.append(LocalPart("head", [], [], LocalObjective(stack.head)))
        return parts


_FAMILY = ("loss", "head", "beta", "temperature", "proj_dim", "nhsic_lambda", "nhsic_target")


class _Pool(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return pool(h)
