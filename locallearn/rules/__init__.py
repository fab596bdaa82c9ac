"""Training rules. Importing this package registers the built-in rules."""

from . import e2e, layerwise  # noqa: F401  (registration happens at import)
from .base import RULES, LocalPart, Rule, create_rule, list_rules, register_rule

__all__ = ["RULES", "LocalPart", "Rule", "create_rule", "list_rules", "register_rule"]
