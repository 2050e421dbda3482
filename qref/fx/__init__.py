"""The FX flow: ``convert_to_reference_fx`` (reference model) and ``convert_fx`` (lowered)."""

from .convert import convert_fx, convert_to_reference_fx
from .lower import lower_to_native

__all__ = ["convert_fx", "convert_to_reference_fx", "lower_to_native"]
