"""AugLocal: each part's auxiliary network is built from the blocks after it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..heads import HEADS
from .base import register_rule
from .local import LocalConfig, LocalRule


@dataclass
class AugLocalConfig(LocalConfig):
    """Options of ``auglocal`` (and the shared ones of :class:`~.local.LocalConfig`);
    docs/rules.md describes each. ``aux_depth`` is d, the first part's auxiliary depth;
    ``pyramid`` the coefficient c of the pyramidal depth (0: every part has depth d)."""

    aux: str = "augmented"
    loss: str = "ce"
    aux_depth: int = 2
    pyramid: float = 0.5

    def __post_init__(self):
        if self.aux_depth < 1 or not 0 <= self.pyramid <= 1:
            raise ConfigError(f"options of rule 'auglocal' need aux_depth >= 1 and "
                              f"0 <= pyramid <= 1; got {self.aux_depth}, {self.pyramid}")


@register_rule(
    "auglocal",
    paper=("Ma, Wu, Si & Tan 2024, Scaling Supervised Local Learning with Augmented "
           "Auxiliary Networks (ICLR)"),
    summary="every part learns through a fresh copy of evenly spaced later blocks, "
            "shallower toward the output",
)
class AugLocal(LocalRule):
    """AugLocal (Ma, Wu, Si & Tan, ICLR 2024).

    Every part but the last trains on its detached input through the ``augmented``
    head: fresh copies of later blocks, ``aux_depth`` of them at the first part and
    fewer toward the output (the pyramidal depth); the last part trains with the
    model's head. docs/rules.md#auglocal compares it with ChenxiangMA/AugLocal and says
    how the reference's K maps to ``--split-after``.
    """

    Config = AugLocalConfig
    head_option = "aux"
    model_head = "last_block"
    shown = ("aux", "aux_depth", "pyramid")

    def head_options(self, k, local_parts):
        """Part ``k``'s depth falls linearly from d to ``d - pyramid * (d - 1)`` (rounded
        half to even, at least 1), the reference's ``aux_depth_list``; heads without a
        depth (``aux=conv``) are built without one."""
        d, c = self.config.aux_depth, self.config.pyramid
        r = c * k / (local_parts - 1) if local_parts > 1 else 0.0
        options = super().head_options(k, local_parts)
        if "depth" in HEADS.options(self.head):
            return {**options, "depth": max(1, round(d * (1 - r) + r))}
        return {**options, "depth": 0}
