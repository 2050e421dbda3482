"""Public Hypothesis strategies for qref's property suite."""

from qref.strategies.tensors import (  # noqa: F401
    FLOAT32_MAX, QDTYPE_BOUNDS, QDType, QParamsCase, as_layout, axes, float_tensors, layouts,
    qdtypes, qparams, scales, shapes, zero_points,
)

__all__ = [
    "FLOAT32_MAX", "QDTYPE_BOUNDS", "QDType", "QParamsCase", "as_layout", "axes", "float_tensors",
    "layouts", "qdtypes", "qparams", "scales", "shapes", "zero_points",
]
