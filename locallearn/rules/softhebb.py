"""SoftHebb (``softhebb``): soft winner-take-all Hebbian plasticity in every convolution, no
feedback and no label; the shared linear probe measures what the blocks learnt.

Journé, Garcia Rodriguez, Guo & Moraitis, "Hebbian Deep Learning Without Feedback" (ICLR
2023); reference code github NeuromorphicComputing/SoftHebb (``demo.py``, ``hebbconv.py``).
For a convolution with weight ``w`` (one row ``w_i`` per output channel), input patches
``x`` and weighted inputs ``u = w * x``, the update is

    dw_i = sum over batch and pixels of  y_i (x - u_i w_i),   y = softmax(t_invert u)

over channels, with every non-winning ``y_i`` negated (anti-Hebbian), ``dw`` divided by its
largest absolute entry, and applied with a per-neuron rate ``hebb_lr |‖w_i‖ - 1| ** 0.5``
that falls as the neuron's norm reaches the rule's fixed point 1. The part's loss is a
surrogate whose gradient is minus that step (docs/rules.md#softhebb).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..objectives import no_objective
from ..step import Scored
from .base import LocalPart, Rule, register_rule


@dataclass
class SoftHebbConfig:
    """Options of ``softhebb`` (docs/rules.md#softhebb).

    Attributes:
        t_invert: the soft winner-take-all's inverse temperature; 0: each convolution's own
            ``t_invert`` (``softhebb_cnn``'s are the paper's 1, 0.65, 0.25), else 1.
        hebb_lr: the Hebbian learning rate (times ``--lr``); 0: each convolution's own
            ``hebb_lr`` (``softhebb_cnn``: 0.08, 0.005, 0.01), else 0.01.
        norm_power: the exponent of ``|‖w_i‖ - 1|`` in the per-neuron rate (0: constant).
    """

    t_invert: float = 0.0
    hebb_lr: float = 0.0
    norm_power: float = 0.5


def _check_conv(conv: nn.Conv2d, where: str) -> None:
    why = ("groups > 1" if conv.groups != 1 else "a bias (the reference's bias rule is not "
           "implemented)" if conv.bias is not None else
           f"padding={conv.padding!r}" if isinstance(conv.padding, str) else "")
    if why:
        raise ConfigError(f"rule 'softhebb': {where} has {why}; valid: bias-free nn.Conv2d "
                          "with groups=1 (softhebb_cnn, resnet18_cifar, resnet*_cifar)")


@torch.no_grad()
def softhebb_delta(conv: nn.Conv2d, x: torch.Tensor, t_invert: float,
                   u: torch.Tensor | None = None) -> torch.Tensor:
    """SoftHebb's update direction of ``conv`` for its input ``x`` (normalised to max |.| = 1),
    in float32: ``sum y (x - u w)`` with anti-Hebbian non-winners, as ``demo.py``. ``u``: the
    convolution's float32 output for ``x`` where the forward computed it already."""
    w, x = conv.weight.detach().float(), x.detach().float()
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    with torch.autocast(x.device.type, enabled=False):  # bf16 runs: still all float32
        if u is None or u.dtype != torch.float32:
            u = F.conv2d(x, w, None, conv.stride, 0, conv.dilation)
        # every unit anti-Hebbian (negated) but each pixel's winner
        y = torch.softmax(t_invert * u, dim=1).neg_()
        winner = u.argmax(dim=1, keepdim=True)
        y.scatter_(1, winner, y.gather(1, winner).neg_())
        # sum over batch and output pixels of y * x for each kernel tap: the weight gradient
        # of the convolution for output gradient y, by the backend's backward-weight kernel.
        yx = torch.nn.grad.conv2d_weight(x, w.shape, y, conv.stride, 0, conv.dilation)
    yu = (y * u).sum(dim=(0, 2, 3))
    delta = yx - yu.view(-1, 1, 1, 1) * w
    return delta / (delta.abs().amax() + 1e-30)


def neuron_rate(weight: torch.Tensor, hebb_lr: float, power: float) -> torch.Tensor:
    """Per output channel ``hebb_lr (|‖w_i‖ - 1| + 1e-10) ** power``, shaped to broadcast."""
    norm = weight.detach().float().flatten(1).norm(dim=1)
    rate = hebb_lr * ((norm - 1).abs() + 1e-10) ** power
    return rate.view(-1, *([1] * (weight.ndim - 1)))


class HebbianPart(LocalPart):
    """Blocks learnt by SoftHebb alone: no logits, no gradient through activations.

    In training its forward runs the blocks without autograd, each convolution's update
    computed from its input and output on the way (a forward hook), and returns the surrogate
    ``d + sum <w - w.detach(), -rate * delta>``: gradient minus the SoftHebb step, value
    ``d`` the mean distance of the neurons' norms from 1 (what the rule drives to 0).
    """

    def __init__(self, name, blocks, block_ids, convs: dict[str, nn.Conv2d],
                 settings: dict[str, tuple[float, float]], norm_power: float):
        super().__init__(name, blocks, block_ids, no_objective())
        self.convs, self.settings, self.norm_power = convs, settings, norm_power

    def forward(self, x, step):
        if not (step.train and torch.is_grad_enabled()):
            return super().forward(x, step)
        deltas: dict[str, torch.Tensor] = {}
        hooks = [conv.register_forward_hook(  # its output is u: no second convolution
            lambda m, args, out, name=name: deltas.__setitem__(
                name, softhebb_delta(m, args[0], self.settings[name][0], out)))
            for name, conv in self.convs.items()]
        try:
            with torch.no_grad():
                h = self.run_blocks(x)
        finally:
            for hook in hooks:
                hook.remove()
        loss, dist = None, []
        for name, conv in self.convs.items():
            w = conv.weight
            rate = neuron_rate(w, self.settings[name][1], self.norm_power)
            step_ = (rate * deltas[name]).to(w.dtype)
            term = ((w - w.detach()) * -step_).sum()
            loss = term if loss is None else loss + term
            dist.append((w.detach().float().flatten(1).norm(dim=1) - 1).abs().mean())
        value = torch.stack(dist).mean()
        return h, Scored(value + loss, None, {"norm_distance": value})


def hebbian_convs(block: nn.Module, prefix: str) -> dict[str, nn.Conv2d]:
    """Every Conv2d of ``block`` by name, checked; a layer of another kind that has weights
    (a linear layer, a 1-d or transposed convolution) is refused."""
    convs = {}
    for sub, m in block.named_modules(prefix=prefix):
        if isinstance(m, nn.Conv2d):
            _check_conv(m, f"layer {sub!r}")
            convs[sub] = m
        elif isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
            raise ConfigError(f"rule 'softhebb': layer {sub!r} is a {type(m).__name__}, which "
                              "SoftHebb does not train; valid: blocks of nn.Conv2d "
                              "(softhebb_cnn, resnet18_cifar, resnet*_cifar)")
    return convs


@register_rule(
    "softhebb",
    paper=("Journé, Garcia Rodriguez, Guo & Moraitis 2023, Hebbian Deep Learning Without "
           "Feedback (ICLR)"),
    summary="soft winner-take-all Hebbian plasticity in every conv, no feedback, no label "
            "(accuracy: the linear probe's)",
)
class SoftHebb(Rule):
    """One part per block learnt by SoftHebb (no labels, no logits); the model's head is in no
    part and never trains. As the paper's protocol, a linear classifier on the frozen features
    measures them: the shared linear probe (``--probe linear``), after every epoch. Parts
    exchange detached activations only, so the rule pipelines."""

    Config: ClassVar[type] = SoftHebbConfig
    label_free: ClassVar[bool] = True
    # The reference: plain SGD on the Hebbian step (its rate folded into the surrogate).
    training_defaults: ClassVar[dict] = {
        "model": "softhebb_cnn", "probe": "linear", "optimizer": "sgd", "lr": 1.0,
        "momentum": 0.0, "weight-decay": 0.0, "schedule": "constant"}

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if min(c.t_invert, c.hebb_lr, c.norm_power) < 0:
            raise ConfigError("options of rule 'softhebb' need t_invert, hebb_lr, norm_power "
                              f">= 0; got {c.t_invert}, {c.hebb_lr}, {c.norm_power}")

    def parts(self, stack, num_classes, example):
        c, parts = self.config, []
        for p in stack.head.parameters():  # in no part: the probe reads the blocks instead
            p.requires_grad_(False)
        for k, (name, block) in enumerate(zip(stack.names, stack.blocks, strict=True)):
            convs = hebbian_convs(block, name)
            if not convs:
                raise ConfigError(f"rule 'softhebb': block {name!r} of "
                                  f"{stack.model_name or 'the model'} has no nn.Conv2d to "
                                  "learn; valid: convolutional backbones (softhebb_cnn, "
                                  "resnet18_cifar, resnet*_cifar)")
            for p in block.parameters():
                p.requires_grad_(False)
            settings = {}
            for sub, conv in convs.items():
                conv.weight.requires_grad_(True)
                settings[sub] = (c.t_invert or getattr(conv, "t_invert", 1.0),
                                 c.hebb_lr or getattr(conv, "hebb_lr", 0.01))
            parts.append(HebbianPart(name, [block], [k], convs, settings, c.norm_power))
        return parts
