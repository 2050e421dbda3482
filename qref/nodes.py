"""Which fx nodes are calls of what: the one set of node predicates (and q/dq targets) of qref.

A quantize is a call of a decomposed pt2e quantize op (``quantized_decomposed.quantize_per_tensor``
``.default``/``.tensor``, ``quantize_per_channel``) or of torch's own ``torch.quantize_per_tensor``/
``torch.quantize_per_channel`` (FX graphs); a dequantize is a call of a decomposed dequantize op,
of ``torch.dequantize``, or the method ``Tensor.dequantize``. The narrower predicates below name
exactly the one form the FX lowering rewrites (it reads their arguments positionally).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
from torch import fx

__all__ = [
    "DECOMPOSED_QUANTIZE",
    "DECOMPOSED_DEQUANTIZE",
    "TORCH_QUANTIZE",
    "QUANTIZE",
    "DEQUANTIZE",
    "is_call",
    "is_quantize",
    "is_dequantize",
    "is_torch_quantize_per_tensor",
    "is_dequantize_method",
]

_qd = torch.ops.quantized_decomposed

DECOMPOSED_QUANTIZE = (
    _qd.quantize_per_tensor.default,
    _qd.quantize_per_tensor.tensor,
    _qd.quantize_per_channel.default,
)
DECOMPOSED_DEQUANTIZE = (
    _qd.dequantize_per_tensor.default,
    _qd.dequantize_per_tensor.tensor,
    _qd.dequantize_per_channel.default,
)
TORCH_QUANTIZE = (torch.quantize_per_tensor, torch.quantize_per_channel)
QUANTIZE = DECOMPOSED_QUANTIZE + TORCH_QUANTIZE
DEQUANTIZE = DECOMPOSED_DEQUANTIZE + (torch.dequantize,)


def is_call(node, targets) -> bool:
    """``node`` is an fx node calling one of the functions or op overloads in ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_quantize(node) -> bool:
    """A quantize call of either form (decomposed pt2e op or ``torch.quantize_per_*``)."""
    return is_call(node, QUANTIZE)


def is_dequantize(node) -> bool:
    """A dequantize call of any form (decomposed op, ``torch.dequantize``, ``.dequantize()``)."""
    return is_call(node, DEQUANTIZE) or is_dequantize_method(node)


def is_torch_quantize_per_tensor(node) -> bool:
    """Only ``torch.quantize_per_tensor(x, scale, zero_point, dtype)`` (the FX activation quantize)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.quantize_per_tensor


def is_dequantize_method(node) -> bool:
    """Only the method call ``x.dequantize()`` (the FX reference graph's dequantize)."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "dequantize"
