"""The grid a recorded quantize/dequantize call puts values on: its QParams, and its style.

Read from the call's evaluated arguments (decomposed pt2e ops, by schema name) or from the torch
quantized tensor it takes or returns. The *style* says how that graph quantizes (``"decomposed"``:
``quantized_decomposed`` ops; ``"torch"``: ``torch.quantize_per_*``), so that a float can be put
on the reference's grid the way the reference itself would (:meth:`Grid.quantize`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, fx

from ..nodes import DECOMPOSED_DEQUANTIZE, DECOMPOSED_QUANTIZE
from ..qparams import QParams

__all__ = ["Grid", "QDTYPE_OF", "INT_OF_QDTYPE", "call_grid", "tensor_grid"]

QDTYPE_OF = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}
INT_OF_QDTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}


class Grid(NamedTuple):
    """The QParams of a recorded quantize/dequantize call, and the style of op that applied them."""

    qparams: QParams
    style: str  # "decomposed" (quantized_decomposed ops) or "torch" (torch.quantize_per_*)

    def quantize(self, x: Tensor) -> Tensor:
        """``x`` on this grid, the way this style of graph quantizes, as int64."""
        q, x = self.qparams, x.detach().float()
        if self.style == "torch":
            qdtype = QDTYPE_OF[q.dtype]
            if q.axis is None:
                out = torch.quantize_per_tensor(x, float(q.scale), int(q.zero_point), qdtype)
            else:
                out = torch.quantize_per_channel(x, q.scale, q.zero_point, q.axis, qdtype)
            return out.int_repr().to(torch.int64)
        qd = torch.ops.quantized_decomposed
        if q.axis is None:
            out = qd.quantize_per_tensor(x, float(q.scale), int(q.zero_point), q.quant_min, q.quant_max, q.dtype)
        else:
            out = qd.quantize_per_channel(x, q.scale, q.zero_point, q.axis, q.quant_min, q.quant_max, q.dtype)
        return out.to(torch.int64)


def _bound(target, args, kwargs) -> dict:
    """An op overload's evaluated arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(target._schema.arguments):
        if arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif not arg.kwarg_only and i < len(args):
            out[arg.name] = args[i]
        else:
            out[arg.name] = arg.default_value
    return out


def _decomposed_grid(target, args, kwargs) -> Grid:
    a = _bound(target, args, kwargs)
    per_channel = "axis" in a
    qparams = QParams(
        scale=a["scales"] if per_channel else a["scale"],
        zero_point=a["zero_points"] if per_channel else a["zero_point"],
        quant_min=int(a["quant_min"]),
        quant_max=int(a["quant_max"]),
        dtype=a["dtype"],
        axis=a["axis"] if per_channel else None,
    )
    return Grid(qparams=qparams, style="decomposed")


def tensor_grid(q: Tensor) -> Grid:
    """The parameters a torch quantized tensor carries."""
    dtype = INT_OF_QDTYPE[q.dtype]
    info = torch.iinfo(dtype)
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zp, axis = q.q_per_channel_scales(), q.q_per_channel_zero_points(), q.q_per_channel_axis()
    else:
        scale, zp, axis = q.q_scale(), q.q_zero_point(), None
    qparams = QParams(scale=scale, zero_point=zp, quant_min=info.min, quant_max=info.max, dtype=dtype, axis=axis)
    return Grid(qparams=qparams, style="torch")


def call_grid(node: fx.Node, args, kwargs, result) -> Grid | None:
    """Parameters of a recognised quantize/dequantize call, from its evaluated arguments."""
    if isinstance(result, Tensor) and result.is_quantized:
        return tensor_grid(result)
    if node.target in DECOMPOSED_QUANTIZE or node.target in DECOMPOSED_DEQUANTIZE:
        return _decomposed_grid(node.target, args, kwargs)
    if isinstance(args[0], Tensor) and args[0].is_quantized:  # a dequantize of a torch quantized tensor
        return tensor_grid(args[0])
    return None
