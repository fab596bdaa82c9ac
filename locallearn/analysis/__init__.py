"""Rule-independent analysis: kernel dependence measures, the information-plane observer, plots.

The measures themselves are pure functions in :mod:`locallearn.hsic`, a floor below
the rules (which use the differentiable nHSIC term); the ones the plane uses are
re-exported here. Figures live in :mod:`locallearn.analysis.plots` (imported on
demand: it needs matplotlib).
"""

from __future__ import annotations

from ..hsic import (
                    KERNELS,
                    SoftProjector,
                    differentiable_nhsic,
                    kernel_alignment,
                    kernel_matrix,
                    nhsic,
                    nhsic_adjusted,
                    soft_projector,
)
from .plane import InformationPlane

__all__ = ["KERNELS", "InformationPlane", "SoftProjector", "differentiable_nhsic",
           "kernel_alignment", "kernel_matrix", "nhsic", "nhsic_adjusted", "soft_projector"]
