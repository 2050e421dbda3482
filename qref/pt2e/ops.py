"""The quantized_decomposed operators a converted pt2e graph is made of.

The q/dq targets and ``is_call`` live in :mod:`qref.nodes`; they are re-exported here.
"""

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

from ..nodes import DECOMPOSED_DEQUANTIZE as DEQUANTIZE
from ..nodes import DECOMPOSED_QUANTIZE as QUANTIZE
from ..nodes import is_call

__all__ = ["QUANTIZE", "DEQUANTIZE", "CHOOSE_QPARAMS", "SYM_SIZE", "is_call", "real_users", "schema_arguments"]

qd = torch.ops.quantized_decomposed

CHOOSE_QPARAMS = (qd.choose_qparams.tensor, qd.choose_qparams_symmetric.tensor)
SYM_SIZE = (torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default)


def real_users(node) -> list:
    """Users of ``node`` other than shape queries (``sym_size``), which do not consume values."""
    return [u for u in node.users if not is_call(u, SYM_SIZE)]


def schema_arguments(node) -> dict:
    """An OpOverload call's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif not arg.kwarg_only and i < len(node.args):
            out[arg.name] = node.args[i]
        else:
            out[arg.name] = arg.default_value
    return out
