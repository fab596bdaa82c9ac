"""locallearn: a zoo of local-learning rules for timm backbones, trained under Accelerate."""

__version__ = "0.1.0"

from . import cifar_resnets, models  # noqa: E402,F401  (register the small-image variants with timm)
from .blocks import BlockStack, split  # noqa: E402
from .data import load_dataset  # noqa: E402
from .errors import ConfigError, DataError, LocallearnError, SplitError  # noqa: E402
from .heads import build_head, list_heads, register_head  # noqa: E402
from .losses import LossInput, build_loss, list_losses, register_loss  # noqa: E402
from .objectives import Objective, Term, classifier, no_objective  # noqa: E402
from .rules import LocalPart, Rule, create_rule, list_rules, register_rule  # noqa: E402
from .rules.local import LocalConfig, LocalRule  # noqa: E402
from .step import Scored, Step  # noqa: E402
from .trainer import TrainConfig, Trainer  # noqa: E402

__all__ = [
    "BlockStack",
    "ConfigError",
    "DataError",
    "LocalConfig",
    "LocalPart",
    "LocalRule",
    "LocallearnError",
    "LossInput",
    "Objective",
    "Rule",
    "Scored",
    "SplitError",
    "Step",
    "Term",
    "TrainConfig",
    "Trainer",
    "build_head",
    "build_loss",
    "classifier",
    "create_rule",
    "list_heads",
    "list_losses",
    "list_rules",
    "load_dataset",
    "no_objective",
    "register_head",
    "register_loss",
    "register_rule",
    "split",
]
