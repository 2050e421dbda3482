"""FX custom modules, as a user writes them: a float class, its observed class and its quantized
class, for the custom-module clause of ``convert_custom_config`` (``with_custom_module`` wraps one
module of a model in it; ``custom_configs`` gives the prepare and convert configs naming them).

The quantized class is user code both converters call (``from_observed``): it runs the wrapped
float module on its dequantized input and quantizes the result to the output observer's qparams,
so a converter is judged only on where it puts the custom module and what it feeds it.
"""

from __future__ import annotations

import torch
from torch import fx, nn

__all__ = ["CustomFloat", "CustomObserved", "CustomQuantized", "custom_configs", "with_custom_module"]


class CustomFloat(nn.Module):
    """A float module the tracer does not enter: the module it wraps."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class CustomObserved(CustomFloat):
    @classmethod
    def from_float(cls, float_module):
        observed = cls(float_module.inner)
        observed.qconfig = float_module.qconfig
        return observed


class CustomQuantized(nn.Module):
    """Quantized in, quantized out: the wrapped float module between a dequantize and a quantize."""

    def __init__(self, inner: nn.Module, scale: float, zero_point: int, dtype):
        super().__init__()
        self.inner, self.scale, self.zero_point, self.dtype = inner, scale, zero_point, dtype

    def forward(self, qx):
        return torch.quantize_per_tensor(self.inner(qx.dequantize()), self.scale, self.zero_point, self.dtype)

    @classmethod
    def from_observed(cls, observed):
        post = observed.activation_post_process
        scale, zero_point = post.calculate_qparams()
        return cls(observed.inner, float(scale), int(zero_point), post.dtype)


def leaf_modules(model: nn.Module) -> list[str]:
    """The modules a symbolic trace of ``model`` calls, in call order (the ones that can be wrapped)."""
    return [str(n.target) for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_module"]


def with_custom_module(model: nn.Module, path: str) -> nn.Module:
    """``model`` with its module at ``path`` wrapped in :class:`CustomFloat` (in place)."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, name, CustomFloat(getattr(owner, name)))
    return model


def custom_configs():
    """(PrepareCustomConfig, ConvertCustomConfig) mapping the classes above, static quantization."""
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig
    from torch.ao.quantization.quant_type import QuantType

    prepare = PrepareCustomConfig().set_float_to_observed_mapping(CustomFloat, CustomObserved)
    convert = ConvertCustomConfig().set_observed_to_quantized_mapping(CustomObserved, CustomQuantized,
                                                                      QuantType.STATIC)
    return prepare, convert
