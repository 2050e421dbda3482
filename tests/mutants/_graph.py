"""Graph surgery shared by the pt2e mutants (the bugs themselves live in pt2e.py)."""

from __future__ import annotations

import functools

import torch
from torch import fx

import qref
from qref.pt2e.convert import _remove_unused
from qref.pt2e.fold_quantize import fold_quantized_weights
from qref.pt2e.ops import DEQUANTIZE, is_call
from qref.pt2e.reference_representation import to_reference_representation

qd = torch.ops.quantized_decomposed


def convert_and_edit(model, edit, use_reference_representation, fold_quantize) -> fx.GraphModule:
    """qref.convert_pt2e with ``edit(gm)`` applied to the q/dq graph before weights are folded
    and before the reference representation, so one edit serves every flag combination."""
    gm = qref.convert_pt2e(model, use_reference_representation=False, fold_quantize=False)
    edit(gm)
    if fold_quantize:
        fold_quantized_weights(gm)
    if use_reference_representation:
        to_reference_representation(gm)
    _remove_unused(gm)
    gm.recompile()
    return gm


def is_constant(node) -> bool:
    """Computed from attributes only (a weight or bias, possibly through views)."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "get_attr":
        return True
    return node.op == "call_function" and all(is_constant(a) for a in node.all_input_nodes)


def activation_quantizes(gm: fx.GraphModule) -> list[fx.Node]:
    """Per-tensor static quantize nodes of activations (qparams are literals), in graph order."""
    return [
        n for n in gm.graph.nodes
        if is_call(n, (qd.quantize_per_tensor.default,)) and not is_constant(n.args[0])
    ]


def dequantizes_of(q: fx.Node) -> list[fx.Node]:
    return [u for u in q.users if is_call(u, DEQUANTIZE)]


def weight_quantizes(gm: fx.GraphModule) -> list[fx.Node]:
    """Per-channel quantize nodes of weights (constants; int32 biases, quant_max 2**31-1, excluded)."""
    return [
        n for n in gm.graph.nodes
        if is_call(n, (qd.quantize_per_channel.default,)) and is_constant(n.args[0])
        and n.args[-2] != 2**31 - 1
    ]


def attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads."""
    return functools.reduce(getattr, node.target.split("."), gm)


def set_args(node: fx.Node, **changes) -> None:
    """Replace quantize/dequantize arguments by schema name (input, scale, zero_point, ...)."""
    names = [a.name for a in node.target._schema.arguments]
    args = list(node.args)
    for name, value in changes.items():
        args[names.index(name)] = value
    node.args = tuple(args)


def reference_quantize(x, scale, zero_point, quant_min, quant_max, dtype):
    """quantized_decomposed.quantize_per_tensor spelled out (x * (1/scale), round half even)."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, quant_min, quant_max).to(dtype)
