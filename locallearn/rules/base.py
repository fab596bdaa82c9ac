"""The rule contract: a partition of the block stack, local objectives and a schedule.

A rule cuts a :class:`~locallearn.blocks.BlockStack` into :class:`LocalPart` modules (blocks
plus the objective that trains them), builds each batch's input and
:class:`~locallearn.step.Step` (:meth:`Rule.make_step`) and says which parts train when;
the trainer knows nothing else about it (docs/architecture.md, "Rules").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import build_config, config_dict
from ..errors import ConfigError
from ..heads import Later
from ..recompute import run_recomputed
from ..registry import Registry
from ..settings import IDENTITY, PROBE_FLAGS, TRAIN_FLAGS
from ..step import Scored, Step

RULES = Registry("rule", required=("paper",))

#: The ``run.py`` flags a rule may give its own default for (:attr:`Rule.training_defaults`):
#: the backbone, what the training loop trains (not how fast it runs: the speed settings) and
#: the linear probe (a label-free rule's accuracy). The seed is the user's or a preset's.
DEFAULTABLE = ("model", *(f.name for f in TRAIN_FLAGS if f.role == IDENTITY and f.presettable),
               *(f.name for f in PROBE_FLAGS))


def register_rule(name: str, **meta: Any):
    """Register a :class:`Rule` subclass as ``--rule name``.

    ``paper`` (the reference implemented) is required, ``summary`` (one line for docs
    and ``--list-rules``) expected. The class's ``training_defaults`` must name flags
    of :data:`DEFAULTABLE` (their values are checked by the flags' parsers when a run
    resolves them)::

        @register_rule("my_rule", paper="Me et al. 2026", summary="...")
        class MyRule(Rule): ...
    """

    def decorate(cls: type[Rule]) -> type[Rule]:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"register_rule({name!r}) decorates a Rule subclass, not {cls!r}")
        defaults = cls.training_defaults
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"rule {name!r}: training_defaults must map run.py flag names to "
                              f"values; got {type(defaults).__name__}")
        for key in defaults:
            if key not in DEFAULTABLE:
                raise ConfigError(f"rule {name!r}: unknown training default {key!r}; valid: "
                                  f"{', '.join(DEFAULTABLE)}")
        cls.name = name
        return RULES.register(name, **meta)(cls)

    return decorate


def list_rules() -> list[str]:
    return RULES.names()


def create_rule(name: str, **options: Any) -> Rule:
    """Build the rule ``name`` from options typed by its config dataclass."""
    cls = RULES.get(name).factory
    return cls(build_config(cls.Config, options, f"rule {name!r}"))


class LocalPart(nn.Module):
    """One trainable unit: consecutive blocks of the stack and the objective that trains them.

    ``blocks`` are shared with the stack, not copied; ``block_ids`` are their indices
    there, and the part's logits count as the prediction at depth ``block_ids[-1]``
    (empty for a part that only holds a head on the previous part's output). The
    ``objective`` maps ``(h, step, part_input)`` to a :class:`~locallearn.step.Scored`
    (usually an :class:`~locallearn.objectives.Objective`); ``lr_scale`` multiplies
    the learning rate of the part's optimizer.
    """

    def __init__(self, name: str, blocks: Sequence[nn.Module], block_ids: Sequence[int],
                 objective: nn.Module, lr_scale: float = 1.0):
        super().__init__()
        self.part_name = name
        self.blocks = nn.ModuleList(blocks)
        self.block_ids = list(block_ids)
        self.objective = objective
        self.lr_scale = lr_scale
        #: Keep only each block's input for backward and run the block again there (set
        #: by the loop's ``recompute_blocks``; see :func:`~locallearn.recompute.run_recomputed`).
        self.recompute_blocks = False

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks without the objective (a frozen part's forward)."""
        if self.recompute_blocks and torch.is_grad_enabled():
            return run_recomputed(self.blocks, x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, Scored]:
        h = self.run_blocks(x)
        return h, self.objective(h, step, x)

    def after_backward(self) -> None:
        """What the objective does between the part's backward and its optimizer step
        (MAN's EMA update, :class:`~locallearn.rules.local.Momentum`); nothing by default."""
        update = getattr(self.objective, "after_backward", None)
        if update is not None:
            update()


@dataclass
class NoOptions:
    """A rule without options."""


class Rule:
    """Base class of training rules. Subclasses set ``Config`` and implement :meth:`parts`.

    Most rules need not start here: :class:`~locallearn.rules.local.LocalRule`
    builds parts with auxiliary heads and loss terms from the registries.
    """

    name: ClassVar[str] = "?"
    Config: ClassVar[type] = NoOptions
    #: Each part's learning-rate schedule runs over that part's own epochs
    #: (rather than one schedule over the whole run).
    restart_schedule: bool = False
    #: Train a part whose predecessors are all frozen on their cached outputs
    #: (computed once, without augmentation) instead of running them every step.
    cache_inputs: bool = False
    #: ``run.py`` flags this rule sets by default, by flag name (see :data:`DEFAULTABLE`),
    #: e.g. ``{"optimizer": "adamw", "lr": 1e-3}``. They apply where neither the command
    #: line nor a preset sets the flag; the record's ``config_sources`` names which did.
    training_defaults: ClassVar[Mapping[str, Any]] = {}
    #: Run the frozen parts in training mode (BatchNorm normalises by the batch
    #: and updates its running statistics, dropout is active), still without
    #: autograd or optimizer state; False: in eval mode.
    frozen_train_mode: bool = False
    #: Why the rule cannot run under ``--parallel parts`` (the one-line refusal there,
    #: docs/parallel.md); empty: it can, where its schedule allows.
    not_pipelined: ClassVar[str] = ""
    #: Its parts give no logits (it learns without labels): its accuracy at each depth is
    #: the linear probe's, so it sets ``{"probe": "linear"}`` in :attr:`training_defaults`
    #: and refuses ``--probe none``.
    label_free: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def parts(self, stack: nn.Module, num_classes: int, example: torch.Tensor) -> list[LocalPart]:
        """Partition the BlockStack into trainable parts with their objectives; ``example`` is
        a small batch of inputs, to read block output shapes."""
        raise NotImplementedError

    def make_step(self, images: torch.Tensor, labels: torch.Tensor, transform: Any,
                  num_classes: int, generator: torch.Generator | None = None,
                  train: bool = True) -> tuple[torch.Tensor, Step]:
        """The first part's input and the :class:`~locallearn.step.Step` of a batch.

        ``images`` are uint8 ``(B, C, H, W)`` as the loader yields them; ``transform``
        is a :class:`~locallearn.data.BatchTransform` drawing augmentation from
        ``generator`` (None at evaluation). The default applies ``transform``. A rule
        that changes its inputs overrides it: forward-forward writes labels into the
        images, supervised contrastive stacks two augmented views. The step's labels
        are the batch's (one per image), against which the last part's logits are scored.
        """
        return self.stacked_views(images, labels, transform, num_classes, generator, train, 1)

    @staticmethod
    def stacked_views(images, labels, transform, num_classes, generator, train,
                      views: int) -> tuple[torch.Tensor, Step]:
        """``views`` augmented views of each image stacked (one at evaluation), and their step."""
        views = views if train else 1
        x = transform(images, generator)
        if views > 1:
            x = torch.cat([x] + [transform(images, generator) for _ in range(views - 1)])
        return x, Step(labels, x, train, views, num_classes, transform.mean, transform.std)

    def predictions(self, logits: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The prediction at each part's depth from the logits each part gave (at evaluation).

        By default each part's own logits; forward-forward sums goodness over
        layers. The last entry is the network's prediction.
        """
        return logits

    def trained_parts(self, epoch: int, epochs: int, num_parts: int) -> list[int]:
        """Indices of the parts that train in ``epoch`` (0-based); all of them by default.

        Parts before the first trained one run without autograd (in eval mode
        unless :attr:`frozen_train_mode`); parts after the last trained one are
        skipped during training.
        """
        return list(range(num_parts))

    def describe(self) -> dict[str, Any]:
        """The resolved options, for the run record."""
        return config_dict(self.config)

    def gradient_probe(self, parts: Sequence[LocalPart], x: torch.Tensor, step: Step,
                       generator: torch.Generator) -> dict[str, dict[str, float]] | None:
        """How this rule's update compares with backprop's on one probe batch: metric ->
        name (a layer or a part) -> value, e.g. ``{"angle": {"fc1": 41.3}}``; None (the
        default): nothing to measure.

        A rule that overrides it gets a :class:`~locallearn.analysis.gradients.GradientProbe`
        calling it after every epoch into the record's history. It is called with the
        parts in training mode and must not change training: gradients by
        ``torch.autograd.grad`` (never ``.grad``), randomness from ``generator``; the
        probe restores the parts' buffers (BatchNorm statistics) and the random state.
        """
        return None


def block_outputs(stack: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every block for ``example``, without autograd and without touching BN stats."""
    was_training = stack.training
    stack.eval()
    try:
        with torch.no_grad():
            return stack.features(example)
    finally:
        stack.train(was_training)


def later_blocks(stack: nn.Module, example: torch.Tensor) -> list[list[Later]]:
    """For each block of the stack, the fine blocks after it, with their shapes.

    A block that :func:`~locallearn.blocks.split` grouped (``--blocks``,
    ``--split-after``: a Sequential named ``a+b+...``, or holding one block) counts as
    the blocks it holds; any other block (a whole stage at stage granularity) as one.
    Shapes come from ``example``, in eval mode without autograd, as :func:`block_outputs`.
    """
    fine, ends = [], []
    for name, block in zip(stack.names, stack.blocks, strict=True):
        names = name.split("+")
        grouped = isinstance(block, nn.Sequential) and len(block) == len(names)
        fine += list(zip(names, block, strict=True)) if grouped else [(name, block)]
        ends.append(len(fine))
    was_training, x, later = stack.training, example, []
    stack.eval()
    try:
        with torch.no_grad():
            for i, (name, block) in enumerate(fine):
                y = block(x)
                later.append(Later(i, name, block, x.shape, y.shape))
                x = y
    finally:
        stack.train(was_training)
    return [later[end:] for end in ends]
