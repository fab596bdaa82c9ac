"""Forward gradients: the gradient estimated from forward-mode directional derivatives.

Baydin, Pearlmutter, Syme, Wood & Torr, "Gradients without Backpropagation" (2022): for a
random direction ``v ~ N(0, I)`` in weight space, ``(grad L . v) v`` is an unbiased
estimate of ``grad L``, and ``grad L . v`` is one forward-mode pass (a dual-number
forward), no backward through the network. Ren, Kornblith, Liao & Hinton, "Scaling
Forward Gradient with Local Losses" (ICLR 2023) perturb activities instead of weights
(fewer dimensions to guess, so less variance), give every block a local loss, and train
the local heads by their exact gradient. docs/rules.md#forward_gradient has the options
and the differences from the reference code.

The estimate enters the unchanged training loop as a surrogate loss whose value is the
part's loss and whose gradient is the estimate (:func:`surrogate`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..errors import ConfigError
from ..objectives import classifier
from ..recompute import kept_buffers
from ..step import Scored, Step
from .base import LocalPart, register_rule
from .local import LocalConfig, LocalRule

#: Independent estimates the gradient probe averages its cosine and variance over.
PROBE_ESTIMATES = 8


@dataclass
class ForwardGradientConfig(LocalConfig):
    """Options of ``forward_gradient`` (and the shared ones of :class:`~.local.LocalConfig`)."""

    head: str = "linear"
    loss: str = "ce"
    perturb: Literal["weight", "activity"] = "activity"
    directions: int = 1
    local: bool = True


class ForwardGradientPart(LocalPart):
    """A part whose training forward returns a forward-gradient surrogate as its loss.

    ``perturb="weight"``: every trainable parameter of the part gets ``(dL/dtheta . v) v``.
    ``perturb="activity"``: each block's output ``z_j`` is perturbed by ``u_j`` (all at
    once, one forward-mode pass), the loss's tangent ``d = sum_j dL/dz_j . u_j`` gives each
    block ``d u_j`` as its activity gradient, and block j's own backward (from its detached
    input) turns that into its weight gradient; the heads get their exact gradient. Both
    average ``directions`` estimates. Evaluation is a plain forward.
    """

    def __init__(self, part: LocalPart, perturb: str, directions: int):
        super().__init__(part.part_name, list(part.blocks), part.block_ids, part.objective,
                         part.lr_scale)
        self.perturb, self.directions = perturb, directions
        quiet_forward_ad()

    def forward(self, x: torch.Tensor, step: Step, plain: bool = False
                ) -> tuple[torch.Tensor, Scored]:
        if plain or not (step.train and torch.is_grad_enabled()) or not self.estimated():
            return super().forward(x, step)
        h, scored, pairs = self.estimate(x, step, None, self.directions)
        return h, scored._replace(loss=surrogate(scored.loss, pairs))

    def estimated(self) -> list[nn.Parameter]:
        """The parameters whose gradient is estimated: all the part's (weight mode), or its
        blocks' (activity mode; the heads' is exact)."""
        owner = self if self.perturb == "weight" else self.blocks
        return [p for p in owner.parameters() if p.requires_grad]

    def estimate(self, x: torch.Tensor, step: Step, generator: torch.Generator | None,
                 directions: int) -> tuple[torch.Tensor, Scored, list[tuple]]:
        """The part's output and (primal) score, and ``(tensor, estimate)`` pairs: each
        estimated parameter (weight mode) or block output (activity mode, with its graph to
        the block's parameters) and the mean of ``directions`` estimates of its gradient.

        Only the last pass moves the buffers (BatchNorm statistics), as one backprop step
        would; the directions are drawn from ``generator`` (None: the global generator).
        """
        total: list[torch.Tensor] | None = None
        for k in range(directions):
            last = k == directions - 1
            keep = contextlib.nullcontext() if last else kept_buffers(self)
            with keep, torch.set_grad_enabled(last and torch.is_grad_enabled()):
                run = self._weight_pass if self.perturb == "weight" else self._activity_pass
                h, scored, tensors, grads = run(x, step, generator)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        pairs = [(t, g / directions) for t, g in zip(tensors, total, strict=True)]
        return h, scored, pairs

    def _weight_pass(self, x, step, generator):
        params = dict((n, p) for n, p in self.named_parameters() if p.requires_grad)
        v = {n: randn_like(p, generator) for n, p in params.items()}
        with fwAD.dual_level(), torch.no_grad():
            duals = {n: fwAD.make_dual(p.detach(), v[n]) for n, p in params.items()}
            h, scored = torch.func.functional_call(self, duals, (x, step), {"plain": True})
            d = tangent_of(scored.loss)
            h, scored = primal(h), primal_score(scored)
        return h, scored, list(params.values()), [d * v[n] for n in params]

    def _activity_pass(self, x, step, generator):
        h, tangent, outputs, noise = x.detach(), None, [], []
        with fwAD.dual_level():
            for block in self.blocks:
                z = block(h if tangent is None else fwAD.make_dual(h, tangent))
                z, t = fwAD.unpack_dual(z)
                u = randn_like(z, generator)
                outputs.append(z)
                noise.append(u)
                h = z.detach()
                tangent = u if t is None else t + u
            scored = self.objective(fwAD.make_dual(h, tangent), step, x)
            d = tangent_of(scored.loss)
            scored = primal_score(scored)
        return outputs[-1], scored, outputs, [d * u for u in noise]


def quiet_forward_ad() -> None:
    """Load torch's forward-mode decompositions now, without the FutureWarning (about its
    own use of ``torch.jit.script``) that torch would print at a run's first dual tensor."""
    load = getattr(fwAD, "_maybe_load_decompositions", None)  # (private: may go away)
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*torch\.jit\.script", FutureWarning)
            load()


def surrogate(loss: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> torch.Tensor:
    """``loss`` in value, plus ``sum((t - t.detach()) * g)``: zero in value, and its gradient
    sends each estimate ``g`` into ``t`` (a parameter, or a block output whose backward
    carries it to the block's parameters)."""
    extra = sum(((t - t.detach()) * g.detach()).sum() for t, g in pairs)
    return loss + extra.to(loss.dtype)


def randn_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def primal(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else fwAD.unpack_dual(t).primal


def tangent_of(loss: torch.Tensor) -> torch.Tensor:
    """The loss's directional derivative (0 where the loss does not depend on the direction)."""
    t = fwAD.unpack_dual(loss).tangent
    return torch.zeros((), device=loss.device) if t is None else t.detach().float()


def primal_score(scored: Scored) -> Scored:
    """The score without tangents (its loss keeps its graph to the heads)."""
    return Scored(primal(scored.loss), primal(scored.logits),
                  {k: primal(v) for k, v in scored.metrics.items()})


@register_rule(
    "forward_gradient",
    paper=(
        "Baydin, Pearlmutter, Syme, Wood & Torr 2022, Gradients without Backpropagation; "
        "Ren, Kornblith, Liao & Hinton 2023, Scaling Forward Gradient with Local Losses (ICLR)"
    ),
    summary="gradients estimated by forward-mode directional derivatives along random "
            "directions (activity or weight perturbation), with local losses by default",
)
class ForwardGradient(LocalRule):
    """Forward gradients (Baydin et al. 2022), local and activity-perturbed as in Ren et al.
    (ICLR 2023) by default.

    ``local=true``: one part per block with its auxiliary head (default ``linear``: Ren et
    al.'s spatially averaged linear classifier) and local loss, the model's head a last part
    (as ``layerwise``); ``local=false``: one part, the whole network under the global
    cross-entropy (as ``e2e``). Inside every part the gradient is estimated, not
    backpropagated, except within one block (activity mode) and in the heads.
    """

    Config = ForwardGradientConfig
    # SGD at the loop's default (lr 0.1, momentum 0.9) diverged within two epochs on ff_mlp
    # (docs/rules.md#forward_gradient): the estimate's norm is about sqrt(dimensions) times
    # the gradient's, and Adam's per-coordinate scaling absorbs it.
    training_defaults = {"optimizer": "adamw", "lr": 1e-3, "weight-decay": 0.0}
    shown = ("perturb", "directions", "local", "head")
    not_pipelined = ("its random directions come from the global random stream, which "
                     "pipeline stages do not share, so the stages could not give the serial "
                     "weights")

    def _check(self) -> None:
        super()._check()
        cfg, rule = self.config, f"rule {self.name!r}"
        if cfg.directions < 1:
            raise ConfigError(f"option 'directions' of {rule} is the number of random "
                              f"directions averaged per step, >= 1; got {cfg.directions}")
        defaults = ForwardGradientConfig()
        if not cfg.local and (cfg.head, cfg.loss) != (defaults.head, defaults.loss):
            raise ConfigError(f"{rule}: head and loss choose the local objectives, and "
                              "local=false trains on the global cross-entropy alone; "
                              "drop them or set local=true")

    def parts(self, stack, num_classes, example):
        if self.config.local:
            plain = super().parts(stack, num_classes, example)
        else:
            ids = list(range(len(stack.blocks)))
            plain = [LocalPart("forward_gradient", list(stack.blocks), ids,
                               classifier(stack.head))]
        return [ForwardGradientPart(p, self.config.perturb, self.config.directions)
                for p in plain]

    def gradient_probe(self, parts, x, step, generator):
        """Per part: the mean over :data:`PROBE_ESTIMATES` independent estimates (each of
        ``directions`` directions) of their cosine with the exact gradient ``g`` of the same
        loss for the same parameters, and of ``|g_hat - g|^2 / |g|^2``."""
        cosine, variance = {}, {}
        h = x
        for part in parts:
            params = part.estimated()
            exact = flat(params, part(h.detach(), step, plain=True)[1].loss) if params else None
            if exact is not None and exact.norm() > 0:  # (a zero gradient: nothing to compare)
                cos, var = [], []
                for _ in range(PROBE_ESTIMATES):
                    _, scored, pairs = part.estimate(h.detach(), step, generator,
                                                     self.config.directions)
                    g_hat = estimate_of(params, pairs, part.perturb)
                    cos.append(torch.nn.functional.cosine_similarity(g_hat, exact, 0).item())
                    var.append(((g_hat - exact).square().sum() / exact.square().sum()).item())
                cosine[part.part_name] = sum(cos) / len(cos)
                variance[part.part_name] = sum(var) / len(var)
            with torch.no_grad():
                h = part.run_blocks(h)
        return {"cosine": cosine, "variance": variance}


def flat(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """The gradient of ``loss`` for ``params``, flattened into one float vector."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().float()
                      for p, g in zip(params, grads, strict=True)])


def estimate_of(params: list[torch.Tensor], pairs: list[tuple], perturb: str) -> torch.Tensor:
    """The estimate for ``params``, flattened: the pairs' own (weight mode) or carried into
    the blocks' parameters by their backward (activity mode)."""
    if perturb == "weight":
        return torch.cat([g.flatten().float() for _, g in pairs])
    return flat(params, sum((t * g.detach()).sum() for t, g in pairs))
