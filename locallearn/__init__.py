"""locallearn: a zoo of local-learning rules for timm backbones, trained under Accelerate."""

from . import models  # noqa: F401  (registers the small-image variants with timm)
from .blocks import BlockStack, split
from .data import load_dataset
from .errors import ConfigError, DataError, LocallearnError, SplitError
from .heads import build_head, list_heads, register_head
from .losses import LossInput, build_loss, list_losses, register_loss
from .objectives import Objective, Term, classifier, no_objective
from .rules import LocalPart, Rule, create_rule, list_rules, register_rule
from .rules.local import LocalConfig, LocalRule
from .step import Scored, Step
from .trainer import TrainConfig, Trainer
from .version import __version__

__all__ = [
    "BlockStack", "ConfigError", "DataError", "LocalConfig", "LocalPart", "LocalRule",
    "LocallearnError", "LossInput", "Objective", "Rule", "Scored", "SplitError", "Step", "Term",
    "TrainConfig", "Trainer", "__version__", "build_head", "build_loss", "classifier",
    "create_rule", "list_heads", "list_losses", "list_rules", "load_dataset", "no_objective",
    "register_head", "register_loss", "register_rule", "split",
]
