"""locallearn: a zoo of local-learning rules for timm backbones, trained under Accelerate."""

from . import models  # noqa: F401  (registers the small-image variants with timm)
from .blocks import BlockStack, split
from .data import load_dataset
from .errors import ConfigError, DataError, LocallearnError, SplitError
from .rules import LocalPart, Rule, create_rule, list_rules, register_rule
from .trainer import TrainConfig, Trainer
from .version import __version__

__all__ = [
    "BlockStack",
    "ConfigError",
    "DataError",
    "LocalPart",
    "LocallearnError",
    "Rule",
    "SplitError",
    "TrainConfig",
    "Trainer",
    "__version__",
    "create_rule",
    "list_rules",
    "load_dataset",
    "register_rule",
    "split",
]
