"""qref: a reference converter and verification suite for PyTorch quantization conversion."""

from .engines import engines, use_engine
from .fold import fold_conv_bn
from .fx import convert_fx, convert_to_reference_fx
from .pt2e import convert_pt2e

__all__ = [
    "convert_fx",
    "convert_pt2e",
    "convert_to_reference_fx",
    "engines",
    "fold_conv_bn",
    "use_engine",
]
__version__ = "0.1.0"
