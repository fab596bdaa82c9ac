"""locallearn: a zoo of local-learning rules for timm backbones, trained under Accelerate."""

__version__ = "0.1.0"

from . import cifar_resnets, models  # noqa: E402,F401  (register the small-image variants with timm)
from .blocks import BlockStack, split  # noqa: E402
from .data import load_dataset  # noqa: E402
from .errors import ConfigError, DataError, LocallearnError, SplitError  # noqa: E402
from .rules import LocalPart, Rule, create_rule, list_rules, register_rule  # noqa: E402
from .trainer import TrainConfig, Trainer  # noqa: E402

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
    "create_rule",
    "list_rules",
    "load_dataset",
    "register_rule",
    "split",
]
