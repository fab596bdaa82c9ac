"""Rule-independent analysis: the information-plane observer and its figures.

The dependence measures are pure functions in :mod:`locallearn.hsic`, a floor below the
rules (which use the differentiable nHSIC term). Figures live in
:mod:`locallearn.analysis.plots` (imported on demand: it needs matplotlib).
"""

from __future__ import annotations

from ..hsic import nhsic
from .plane import InformationPlane

__all__ = ["InformationPlane", "nhsic"]
