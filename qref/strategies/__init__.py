"""Public Hypothesis strategies for qref's property suite."""

from qref.strategies.tensors import (  # noqa: F401
    FLOAT32_MAX, QDTYPE_BOUNDS, QDType, QParamsCase, as_layout, axes, float_tensors, layouts,
    qdtypes, qparams, scales, shapes, zero_points,
)
from qref.strategies.models import (  # noqa: F401
    Act, BatchNorm, Cat, Conv, Flatten, Linear, MatMul, ModelSpec, Pool, Residual, conv_bn_specs,
    fixed_qparams_specs, model_specs,
)
from qref.strategies.setups import QuantSetup, quant_setups  # noqa: F401
from qref.strategies.cases import Case, cases  # noqa: F401

__all__ = [
    "FLOAT32_MAX", "QDTYPE_BOUNDS", "QDType", "QParamsCase", "as_layout", "axes", "float_tensors",
    "layouts", "qdtypes", "qparams", "scales", "shapes", "zero_points",
    "Act", "BatchNorm", "Cat", "Conv", "Flatten", "Linear", "MatMul", "ModelSpec", "Pool", "Residual",
    "conv_bn_specs", "fixed_qparams_specs", "model_specs", "QuantSetup", "quant_setups", "Case",
    "cases",
]
