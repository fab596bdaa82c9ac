"""Rule-independent analysis: kernel dependence measures, the information-plane observer, plots.

Plain HSIC is :func:`locallearn.analysis.hsic.hsic`; it is not re-exported here, so
that ``locallearn.analysis.hsic`` stays the module. Figures live in
:mod:`locallearn.analysis.plots` (imported on demand: it needs matplotlib).
"""

from __future__ import annotations

from .hsic import (
    KERNELS,
    SoftProjector,
    differentiable_nhsic,
    kernel_alignment,
    kernel_matrix,
    linear_cka,
    nhsic,
    nhsic_scaled,
    soft_projector,
)
from .plane import InformationPlane

__all__ = [
    "KERNELS",
    "InformationPlane",
    "SoftProjector",
    "differentiable_nhsic",
    "kernel_alignment",
    "kernel_matrix",
    "linear_cka",
    "nhsic",
    "nhsic_scaled",
    "soft_projector",
]
