"""Feedback alignment (``fa``) and direct feedback alignment (``dfa``): backprop's error
travels through fixed random matrices instead of the transposed forward weights.

- ``fa``: Lillicrap, Cownden, Tweed & Akerman 2016. Every ``nn.Linear`` and ``nn.Conv2d``
  sends the error to its input through a fixed random ``feedback`` buffer shaped like its
  weight (``dx = dy B``, a transposed convolution with ``B``); its own weight and bias
  gradients are the exact local ones (``dW = dy^T x``).
- ``dfa``: Nøkland 2016. The output error ``e = dL/d(logits)`` reaches the output of every
  block directly, as ``e B_k`` with a fixed random ``B_k`` per block; blocks run on their
  predecessor's detached output, so no block waits for the blocks above it.

BioTorch (github jsalbert/biotorch) is the reference code; docs/rules.md#fa and #dfa list
where this differs from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..objectives import classifier
from ..recompute import run_recomputed
from ..step import Scored
from .base import LocalPart, Rule, block_outputs, register_rule

_EXACT = [False]  # inside exact_backward(): FA layers send errors through W (backprop)


@contextmanager
def exact_backward() -> Iterator[None]:
    """FA layers built by forwards inside this context backpropagate through their weight
    (the true gradient), for the probe's comparison."""
    _EXACT[0] = True
    try:
        yield
    finally:
        _EXACT[0] = False


class _LinearFn(torch.autograd.Function):
    """``F.linear`` whose input gradient goes through ``back`` instead of ``weight``."""

    @staticmethod
    def forward(ctx, x, weight, bias, back):
        ctx.save_for_backward(x, back)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, back = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ back
        rows = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.sum(0)
        return dx, dw, db, None


class _Conv2dFn(torch.autograd.Function):
    """``F.conv2d`` whose input gradient is the transposed convolution with ``back``."""

    @staticmethod
    def forward(ctx, x, weight, bias, back, stride, padding, dilation, groups):
        ctx.save_for_backward(x, back)
        ctx.conv = stride, padding, dilation, groups
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, back = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, back, dy, *ctx.conv)
        if ctx.needs_input_grad[1]:
            dw = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, dy, *ctx.conv)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None, None, None, None, None


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` in autocast's dtype where it is on (as nn.Linear/Conv2d would run), so the
    custom function's forward and backward both compute in it (bf16 under
    ``--mixed-precision bf16``); the casts carry the gradients back to the fp32 weights."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return [x, *tensors]
    dtype = torch.get_autocast_dtype(kind)
    return [t if t is None else t.to(dtype) for t in (x, *tensors)]


class FALinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same forward) whose backward sends the error to
    its input through the fixed ``feedback`` buffer (Lillicrap et al. 2016)."""

    feedback: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        back = self.weight if _EXACT[0] else self.feedback
        return _LinearFn.apply(*_autocast(x, self.weight, self.bias, back))


class FAConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose backward sends the error to its input through ``feedback``."""

    feedback: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):  # as nn.Conv2d pads
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0, 0)
        back = self.weight if _EXACT[0] else self.feedback
        x, weight, bias, back = _autocast(x, self.weight, self.bias, back)
        return _Conv2dFn.apply(x, weight, bias, back, self.stride, padding, self.dilation,
                               self.groups)


_FA_CLASS = {nn.Linear: FALinear, nn.Conv2d: FAConv2d}


def feedback_layers(stack: nn.Module) -> dict[str, nn.Module]:
    """Make every ``nn.Linear`` / ``nn.Conv2d`` of the stack's blocks and head an FA layer,
    in place (the module keeps its identity and weight keys; its class changes and a
    ``feedback`` buffer joins its state), with a fresh ``feedback`` drawn from the global
    RNG as BioTorch's default (Xavier uniform). Returns them by name (``block.sub``,
    ``head.sub``); refuses layers FA cannot replace and a stack without any."""
    named = [(f"{n}.", b) for n, b in zip(stack.names, stack.blocks, strict=True)]
    layers: dict[str, nn.Module] = {}
    for prefix, root in [*named, ("head.", stack.head)]:
        for sub, m in root.named_modules():
            kind = next((base for base in (nn.Linear, nn.Conv2d) if isinstance(m, base)), None)
            if kind is None:
                continue
            if type(m) not in (kind, _FA_CLASS[kind]):
                raise ConfigError(f"rule 'fa': layer {prefix + sub!r} is a "
                                  f"{type(m).__name__}, whose own forward FA cannot replace; "
                                  "valid: models whose linear and convolution layers are plain "
                                  "nn.Linear / nn.Conv2d (e.g. ff_mlp, resnet*_cifar)")
            m.__class__ = _FA_CLASS[kind]
            back = torch.empty_like(m.weight, dtype=torch.float32)
            m.register_buffer("feedback", nn.init.xavier_uniform_(back).to(m.weight.dtype))
            layers[(prefix + sub).rstrip(".")] = m
    if not layers:
        raise ConfigError("rule 'fa' needs nn.Linear or nn.Conv2d layers to send the error "
                          f"through; model {getattr(stack, 'model_name', '?')!r} has none")
    return layers


def _layer_name(path: str, part: LocalPart) -> str:
    """A layer's name in the model (``layer1.0.conv1``, ``head.fc``) from its path in the
    part (``blocks.2.conv1``; ``blocks.0.1.conv1`` where ``split`` grouped fine blocks
    into a Sequential; ``objective.heads.head.fc``)."""
    top, index, rest = (path.split(".", 2) + ["", ""])[:3]
    if top != "blocks":
        return ".".join(filter(None, ("head", path.removeprefix("objective.heads.head")[1:])))
    block, names = part.blocks[int(index)], part.block_names[int(index)].split("+")
    if isinstance(block, nn.Sequential) and len(block) == len(names) and rest:
        j, _, rest = rest.partition(".")
        names = [names[int(j)]]
    return ".".join(filter(None, ("+".join(names), rest)))


def angle(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Degrees between two gradients (lists of tensors, flattened together): arccos of their
    cosine, in float64; 90 where either is zero."""
    u = torch.cat([t.double().flatten() for t in a])
    v = torch.cat([t.double().flatten() for t in b])
    cos = (u @ v) / (u.norm() * v.norm()).clamp_min(1e-300)
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


def _grads(part: LocalPart, x: torch.Tensor, step, params: list[torch.Tensor]):
    """Gradients of ``part``'s training loss on ``x`` for ``params``, with the global random
    state put back afterwards (so two calls draw the same dropout)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _, scored = part(x, step)
        return torch.autograd.grad(scored.loss, params, allow_unused=True, materialize_grads=True)


@register_rule(
    "fa",
    paper=("Lillicrap, Cownden, Tweed & Akerman 2016, Random synaptic feedback weights support "
           "error backpropagation for deep learning (Nature Communications)"),
    summary="e2e, but every linear/conv layer sends the error back through a fixed random matrix",
)
class FeedbackAlignment(Rule):
    """Feedback alignment (Lillicrap et al. 2016): one part holding every block and the
    model's head, trained on the cross-entropy as e2e, except that every ``nn.Linear`` and
    ``nn.Conv2d`` backpropagates the error through a fixed random matrix ``B`` (its
    ``feedback`` buffer, seeded by the run and saved in checkpoints) instead of ``W``;
    the weight and bias gradients of each layer are the exact ones given the error it gets.
    """

    not_pipelined = "a single part holds every block (the error crosses the whole network)"

    def parts(self, stack, num_classes, example):
        feedback_layers(stack)  # (in place: the part holds the same modules)
        ids = list(range(len(stack.blocks)))
        part = LocalPart("fa", list(stack.blocks), ids, classifier(stack.head))
        part.block_names = list(stack.names)
        return [part]

    def gradient_probe(self, parts, x, step, generator):
        """``{"angle": {layer: degrees}}`` between each FA layer's weight gradient and
        backprop's on the probe batch (the alignment of the update, as the papers plot it),
        and ``"weight_angle"``: between its feedback ``B`` and its weight ``W`` (the angle
        BioTorch logs, ``compute_alignment``)."""
        part = parts[0]
        layers = {_layer_name(path, part): m for path, m in part.named_modules()
                  if isinstance(m, FALinear | FAConv2d)}
        weights = [m.weight for m in layers.values()]
        fa = _grads(part, x, step, weights)
        with exact_backward():
            bp = _grads(part, x, step, weights)
        return {"angle": {name: angle([a], [b]) for name, a, b in zip(layers, fa, bp, strict=True)},
                "weight_angle": {name: angle([m.feedback], [m.weight.detach()])
                                 for name, m in layers.items()}}


class DirectFeedbackPart(LocalPart):
    """Every block and the model's head, trained by direct feedback alignment.

    In training, block k runs on the detached output of block k - 1 and the head on the
    detached last output; the output error ``e = dL/d(logits)`` reaches each block's output
    ``h_k`` as ``s_k = e B_k`` through the surrogate ``L + sum_k <h_k - h_k.detach(), s_k>``,
    whose value is ``L`` and whose gradient is DFA's (the head's is exact). At evaluation
    (or without autograd) it is a plain forward.
    """

    def __init__(self, name, blocks, block_ids, objective, block_names, shapes, num_classes):
        super().__init__(name, blocks, block_ids, objective)
        self.block_names = list(block_names)
        for k, shape in enumerate(shapes):  # BioTorch's default: Xavier uniform
            back = nn.init.xavier_uniform_(torch.empty(num_classes, math.prod(shape)))
            self.register_buffer(f"feedback_{k}", back)

    def feedback(self, k: int) -> torch.Tensor:
        return getattr(self, f"feedback_{k}")

    def forward(self, x, step):
        if not (step.train and torch.is_grad_enabled()):
            return super().forward(x, step)
        outputs, h = [], x
        for block in self.blocks:
            h = h.detach()
            h = run_recomputed([block], h) if self.recompute_blocks else block(h)
            outputs.append(h)
        heard: list[torch.Tensor] = []  # the head's output, which the loss read (the
        hook = self.objective.heads["head"].register_forward_hook(  # logits are a slice)
            lambda module, args, out: heard.append(out))
        try:
            scored = self.objective(h.detach(), step, x)
        finally:
            hook.remove()
        e = torch.autograd.grad(scored.loss, heard[0], retain_graph=True)[0]
        loss = scored.loss
        for k, h_k in enumerate(outputs):
            s = (e @ self.feedback(k).to(e.dtype)).view_as(h_k).detach()
            loss = loss + ((h_k - h_k.detach()) * s).sum()
        return h, Scored(loss, scored.logits, scored.metrics)


@register_rule(
    "dfa",
    paper=("Nøkland 2016, Direct Feedback Alignment Provides Learning in Deep Neural Networks "
           "(NeurIPS)"),
    summary="the output error reaches every block's output directly through a fixed random matrix",
)
class DirectFeedbackAlignment(Rule):
    """Direct feedback alignment (Nøkland 2016) to each block's output; within a block,
    backprop (for ``ff_mlp``, one layer per block, this is Nøkland's rule exactly:
    ``delta a_k = (e B_k) * f'(a_k)``). The feedback matrices are buffers of the part,
    seeded by the run and saved in checkpoints."""

    not_pipelined = ("a single part holds every block (each block's signal needs the output "
                     "error before any block's update)")

    def parts(self, stack, num_classes, example):
        shapes = [tuple(h.shape[1:]) for h in block_outputs(stack, example[:1])]
        ids = list(range(len(stack.blocks)))
        return [DirectFeedbackPart("dfa", list(stack.blocks), ids, classifier(stack.head),
                                   stack.names, shapes, num_classes)]

    def gradient_probe(self, parts, x, step, generator):
        """``{"angle": {block: degrees}}`` between the DFA gradient of each block's
        parameters (flattened together) and backprop's on the probe batch."""
        part = parts[0]
        blocks = [[p for p in b.parameters() if p.requires_grad] for b in part.blocks]
        flat = [p for ps in blocks for p in ps]
        dfa = _grads(part, x, step, flat)
        bp = _grads(lambda h, s: LocalPart.forward(part, h, s), x, step, flat)
        out, i = {}, 0
        for name, ps in zip(part.block_names, blocks, strict=True):
            if ps:
                out[name] = angle(dfa[i:i + len(ps)], bp[i:i + len(ps)])
            i += len(ps)
        return {"angle": out}
