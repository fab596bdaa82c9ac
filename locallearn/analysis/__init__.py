"""Rule-independent analysis: kernel dependence measures, the information-plane observer, plots."""

from __future__ import annotations

from .hsic import (
    KERNELS,
    SoftProjector,
    differentiable_nhsic,
    hsic,
    kernel_matrix,
    linear_cka,
    nhsic,
    nhsic_scaled,
    soft_projector,
)

__all__ = [
    "KERNELS",
    "SoftProjector",
    "differentiable_nhsic",
    "hsic",
    "kernel_matrix",
    "linear_cka",
    "nhsic",
    "nhsic_scaled",
    "soft_projector",
]
