"""Training rules. Importing this package registers the built-in rules."""

from . import (  # noqa: F401  (registration at import)
    auglocal,
    blockwise_ssl,
    dgl,
    e2e,
    feedback,
    forward_forward,
    forward_gradient,
    infopro,
    layerwise,
    sequential,
    sigprop,
    softhebb,
)
from .base import RULES, LocalPart, Rule, create_rule, list_rules, register_rule

__all__ = ["RULES", "LocalPart", "Rule", "create_rule", "list_rules", "register_rule"]
