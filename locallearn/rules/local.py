"""The local-objective machinery that layerwise, sequential, dgl and infopro share.

A :class:`LocalRule` makes one part per block, its objective composed from a registered
head and loss (plus nHSIC and InfoPro's reconstruction), so any head and any loss work
with any of these rules (docs/architecture.md, "Composition")::

    --rule sequential --rule-opt head=cnn --rule-opt loss=supcon
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import call_options, config_dict
from ..errors import ConfigError
from ..heads import HEADS, Later, build_head, he_normal, reads_later, zero_last_linear
from ..losses import LOSSES
from ..objectives import Objective, Term, classifier
from .base import LocalPart, Rule, block_outputs, later_blocks


@dataclass
class LocalConfig:
    """Options every local-objective rule takes; docs/rules.md describes each."""

    aux_hidden: int = 0
    aux_depth: int = 0
    aux_pool: int = 0
    aux_features: int = 0
    beta: float = 0.99
    temperature: float = 0.1
    proj_dim: int = 128
    nhsic_lambda: float = 0.0
    nhsic_target: Literal["input", "block_input"] = "input"
    nhsic_distance: Literal["sqeuclidean", "euclidean"] = "sqeuclidean"
    loss_options: tuple[str, ...] = ()


class LocalRule(Rule):
    """One part per block, each with an objective composed from registered heads and losses.

    Subclasses set their ``Config`` (a :class:`LocalConfig` with a head and a
    loss field), and may override :meth:`weights` (the terms' weights per
    part), :meth:`recompute` and the partition attributes below.
    """

    Config: ClassVar[type] = LocalConfig
    #: The config fields naming the auxiliary head and the local loss.
    head_option: ClassVar[str] = "head"
    loss_option: ClassVar[str] = "loss"
    #: ``own``: the model's head is a last part of its own; ``last_block``: it
    #: is the objective of the last block's part.
    model_head: ClassVar[Literal["own", "last_block"]] = "own"
    #: Options always in the run record; the others only where they differ from the default.
    shown: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._check()

    head = property(lambda self: getattr(self.config, self.head_option))
    loss = property(lambda self: getattr(self.config, self.loss_option))

    def _check(self) -> None:
        """Refuse, before anything is built, options and compositions that cannot work."""
        cfg, rule = self.config, f"rule {self.name!r}"
        for key in ("aux_hidden", "aux_depth", "aux_pool", "aux_features", "nhsic_lambda"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"option {key!r} of {rule} must be >= 0; "
                                  f"got {getattr(cfg, key)}")
        man = getattr(cfg, "man", 0.0)
        if not 0 <= man <= 1:
            raise ConfigError(f"option 'man' of {rule} is MAN's EMA momentum, in (0, 1] "
                              f"(0: no MAN); got {man}")
        if not 0 <= cfg.beta <= 1 or cfg.temperature <= 0 or cfg.proj_dim < 1:
            raise ConfigError(f"options of {rule} need 0 <= beta <= 1, temperature > 0 and "
                              f"proj_dim >= 1; got {cfg.beta}, {cfg.temperature}, {cfg.proj_dim}")
        head = HEADS.get(self.head).meta  # unknown names: close matches named
        loss = LOSSES.get(self.loss).meta
        self.loss_options = call_options(LOSSES.get(self.loss).factory, cfg.loss_options,
                                         f"loss {self.loss!r}")
        if head["role"] != "classifier":
            raise ConfigError(f"{rule}: {self.head_option}={self.head} is a {head['role']} head; "
                              "the auxiliary head must be a classifier head")
        if loss["head"] != "classifier":
            kind = f"a {loss['head']} head" if loss["head"] else "the part's output itself"
            fits = ", ".join(e.name for e in LOSSES if e.meta["head"] == "classifier")
            raise ConfigError(f"{rule}: {self.loss_option}={self.loss} scores {kind}, not an "
                              f"auxiliary classifier head; local losses: {fits}")

    def describe(self) -> dict[str, Any]:
        """The rule's own options, and the composition's where they differ from its default."""
        options, default = super().describe(), config_dict(type(self.config)())
        return {k: v for k, v in options.items() if k in self.shown or v != default[k]}

    def make_step(self, images, labels, transform, num_classes, generator=None, train=True):
        views = LOSSES.get(self.loss).meta["views"]
        return self.stacked_views(images, labels, transform, num_classes, generator, train, views)

    def weights(self, k: int, local_parts: int) -> dict[str, float]:
        """Weights of part ``k``'s terms: ``loss`` (the local loss) and ``reconstruction``."""
        return {"reconstruction": 0.0, "loss": 1.0}

    def recompute(self, heads: dict[str, torch.nn.Module]) -> bool:
        """Whether the objective with ``heads`` rebuilds them in backward; never by default."""
        return False

    def head_options(self, k: int, local_parts: int) -> dict[str, Any]:
        """The options part ``k``'s auxiliary head is built with: the shared ``aux_*`` ones."""
        cfg = self.config
        return {"hidden": cfg.aux_hidden, "depth": cfg.aux_depth, "pool": cfg.aux_pool,
                "features": cfg.aux_features}

    def objective(self, k: int, local_parts: int, shape: torch.Size, num_classes: int,
                  example: torch.Tensor, where: str, later: list[Later] = (),
                  front: nn.Module | None = None) -> Objective:
        """Part ``k``'s objective on block outputs of ``shape``: what its heads read (the
        output of ``front``, if any, on the block output); ``later``: the fine blocks after
        the part, for heads that are built from them.

        Heads are built in a fixed order (decoder, auxiliary head, similarity
        branch), so a seed gives the same initial weights.
        """
        cfg, weight = self.config, self.weights(k, local_parts)
        meta = LOSSES.get(self.loss).meta
        heads, terms = {}, []
        if weight["reconstruction"]:
            heads["decoder"] = build_head("decoder", shape, tuple(example.shape[1:]), where,
                                          width=getattr(cfg, "decoder_width", 0))
            terms.append(Term("reconstruction", weight["reconstruction"], "decoder"))
        if weight["loss"]:
            out = cfg.proj_dim if meta["out"] == "proj_dim" else num_classes
            heads["aux"] = build_head(self.head, shape, out, where, self.head_option, later,
                                      **self.head_options(k, local_parts))
            if meta["zero_init"]:
                zero_last_linear(heads["aux"])
            sim = None
            if meta["similarity"]:
                sim = "sim"
                heads[sim] = build_head("spatial_std" if len(shape) == 4 else "sim_linear",
                                        shape, None, where)
            options = {"beta": cfg.beta, "temperature": cfg.temperature, **self.loss_options}
            terms.append(Term(self.loss, weight["loss"], "aux", sim, options))
            if cfg.nhsic_lambda:
                terms.append(Term("nhsic", cfg.nhsic_lambda, "aux",
                                  options={"target": cfg.nhsic_target,
                                           "distance": cfg.nhsic_distance}))
        return Objective(heads, terms, self.recompute(heads), front)

    def part_scales(self, num_parts: int) -> list[float]:
        """Learning-rate multiplier of each part; 1 by default."""
        return [1.0] * num_parts

    def parts(self, stack, num_classes, example):
        outputs = block_outputs(stack, example)
        n = len(stack.blocks)
        local = n if self.model_head == "own" else n - 1
        scales = self.part_scales(n)
        later = later_blocks(stack, example) if reads_later(self.head) else [()] * n
        man = getattr(self.config, "man", 0.0)
        if man and local < 1:
            raise ConfigError(f"rule {self.name!r}: man averages the next part's first block "
                              "into each part's auxiliary net, and this stack has a single "
                              "part; use --blocks K with K >= 2 or --split-after NAME,...")
        parts = []
        for k, (block, h) in enumerate(zip(stack.blocks, outputs, strict=True)):
            name = stack.names[k]
            where = f"rule {self.name!r}, block {name!r}"
            if k < local:
                front = momentum_front(stack, k, h, man, where) if man and k + 1 < n else None
                shape = h.shape if front is None else front.shape
                objective = self.objective(k, local, shape, num_classes, example, where,
                                           later[k], front)
            else:
                objective = classifier(stack.head)
            parts.append(LocalPart(name, [block], [k], objective, scales[k]))
        if self.model_head == "own":
            parts.append(LocalPart("head", [], [], classifier(stack.head)))
        return parts


def momentum_front(stack: nn.Module, k: int, h: torch.Tensor, momentum: float,
                   where: str) -> Momentum:
    """MAN's front for part ``k``, from the first block of part ``k + 1``.

    That block is ``stack.blocks[k + 1]`` itself, or its first member where the part
    groups several blocks (``--blocks K``, ``--split-after``, a stage). Refused where it
    has no parameters to average, or does not run on the output ``h`` of part ``k``.
    """
    nxt = stack.blocks[k + 1]
    first = nxt[0] if isinstance(nxt, nn.Sequential) and len(nxt) else nxt
    if not any(True for _ in first.parameters()):
        raise ConfigError(f"{where}: man needs the next part's first block to have "
                          f"weights to average; {type(first).__name__} has none")
    front = Momentum(first, momentum)
    try:
        with torch.no_grad():
            front.eval()
            front.shape = front(h).shape
            front.train()
    except Exception as e:  # noqa: BLE001 (any failure means this block cannot seed a head)
        raise ConfigError(f"{where}: man cannot seed the auxiliary net with the next part's "
                          f"first block ({type(e).__name__}: {e})") from None
    return front


class Momentum(nn.Module):
    """MAN's front of an auxiliary net: ``learned(h) + ema(h)``, both shaped like ``source``.

    Su et al., "Momentum Auxiliary Network for Supervised Local Learning" (ECCV
    2024); as their code (JunhaoSu0/MAN, ``resnetInfoPro_MAN.py``): part k's heads
    read the sum of a trainable block (the paper's "learnable bias", ``LB``) and an
    exponential moving average of ``source``, the first block of part k + 1 (``EMA_Net``).
    Both are fresh copies of ``source``'s architecture (convs He-normal, norms reset),
    not of its weights. The average's weights are buffers: the optimizer never sees
    them, checkpoints carry them. :meth:`after_backward` moves them towards ``source``'s
    parameters (not its buffers; the average's norm statistics follow its own forward).
    """

    def __init__(self, source: nn.Module, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.learned = fresh_copy(source)
        self.ema = fresh_copy(source)
        for module in self.ema.modules():  # the average's weights: buffers, not parameters
            for name, p in list(module._parameters.items()):
                if p is not None:
                    del module._parameters[name]
                    module.register_buffer(name, p.detach())
        self._source = [source]  # a list: not a submodule (part k + 1 owns and trains it)
        self.shape: torch.Size | None = None  # the output shape the heads are built for

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.learned(h) + self.ema(h)

    @torch.no_grad()
    def after_backward(self) -> None:
        """``ema = ema * m + source * (1 - m)`` for each parameter of the source, written as
        the reference writes it; called after part k's backward, before any optimizer step
        of part k + 1 in this batch, so it reads the weights of the previous step."""
        m, ema = self.momentum, dict(self.ema.named_buffers())
        for name, p in self._source[0].named_parameters():
            ema[name].copy_(ema[name] * m + p * (1 - m))


def fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with new weights: every submodule that can reset itself does,
    then convs are drawn He-normal (fan-out), as MAN's code initialises its blocks."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return he_normal(module)
