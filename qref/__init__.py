"""qref: a reference converter and verification suite for PyTorch quantization conversion."""

from .fold import fold_conv_bn
from .pt2e import convert_pt2e

__all__ = ["convert_pt2e", "fold_conv_bn"]
__version__ = "0.1.0"
