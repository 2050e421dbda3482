"""The quantized_decomposed operators a converted pt2e graph is made of."""

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

qd = torch.ops.quantized_decomposed

QUANTIZE = (
    qd.quantize_per_tensor.default,
    qd.quantize_per_tensor.tensor,
    qd.quantize_per_channel.default,
)
DEQUANTIZE = (
    qd.dequantize_per_tensor.default,
    qd.dequantize_per_tensor.tensor,
    qd.dequantize_per_channel.default,
)
CHOOSE_QPARAMS = (qd.choose_qparams.tensor, qd.choose_qparams_symmetric.tensor)
SYM_SIZE = (torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default)


def is_call(node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


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
