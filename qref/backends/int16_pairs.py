"""The reference with u8 x s8 products summed in int16 pairs, as onednn's kernels do on a CPU
without VNNI (``vpmaddubsw``, pytorch#44939): where two adjacent products of an output leave
int16 they saturate before the int32 sum.  inductor lowers a pt2e x86 model to those kernels,
so on such a CPU its outputs follow this form, not the exact one.

Measured on an AVX2 CPU without VNNI (pinned in tests/test_backends.py): a Linear pairs adjacent
input features, its input quantized statically or at run time; a dense conv2d pairs adjacent
input channels at each kernel tap (the channels padded to even); a depthwise conv does not pair;
a grouped conv pairs or not by kernel shape, so both forms are offered for it; a conv whose input
is quantized at run time is left to a float conv, exact.  Only elements whose pairs really leave int16 take the paired
value: everywhere else the form is the reference itself.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..pt2e.ops import DEQUANTIZE, is_call, schema_arguments

CAUSE = ("onednn's u8 x s8 kernels on a CPU without VNNI sum adjacent products in int16 "
         "(vpmaddubsw, pytorch#44939): a uint8 input above 127 against a large weight saturates "
         "the pair; the output was judged against the reference with those pairs saturated")

_INT16 = (-(2**15), 2**15 - 1)
_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default


def _pair_sums(products: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjacent pairs along ``dim`` (padded to even with a zero), each saturated to int16, and
    whether any pair of an element saturated."""
    if products.shape[dim] % 2:
        pad = torch.zeros_like(products.narrow(dim, 0, 1))
        products = torch.cat([products, pad], dim)
    pairs = products.unflatten(dim, (-1, 2)).sum(dim + 1 if dim >= 0 else dim)
    saturated = pairs.clamp(*_INT16)
    return saturated, saturated != pairs


def _integers(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The uint8 values a dequantized activation came from."""
    return torch.round(x.double() / scale).to(torch.int64) + zero_point


def _weight_integers(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.round(w.double() / scales.double().reshape(-1, *([1] * (w.dim() - 1)))).to(torch.int64)


def paired_linear(x, w, bias, x_scale, x_zero_point, w_scales):
    """``linear`` of a dequantized uint8 ``x`` and int8 ``w``, its products summed in int16 pairs."""
    exact = F.linear(x, w, bias)
    scale, zp = float(x_scale), int(x_zero_point)
    scales = torch.as_tensor(w_scales, dtype=torch.float64).reshape(-1).expand(w.shape[0])
    q, wq = _integers(x, scale, zp), _weight_integers(w, scales)
    pairs, changed = _pair_sums(q.unsqueeze(-2) * wq, -1)  # (..., out, in / 2)
    acc = pairs.sum(-1) - zp * wq.sum(1)
    value = acc.double() * scale * scales
    value = value.to(exact.dtype) + (bias if bias is not None else 0)
    return torch.where(changed.any(-1), value, exact)


def paired_conv2d(x, w, bias, stride, padding, dilation, groups, x_scale, x_zero_point, w_scales,
                  grouped_pairs: bool):
    """``conv2d`` of a dequantized uint8 ``x`` and int8 ``w``, the products at each kernel tap summed
    in int16 pairs of adjacent input channels (a depthwise conv, and a grouped one unless
    ``grouped_pairs``, exactly)."""
    exact = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    out_channels, per_group, kh, kw = w.shape
    if per_group == 1 or (groups > 1 and not grouped_pairs):
        return exact
    scale, zp = float(x_scale), int(x_zero_point)
    scales = torch.as_tensor(w_scales, dtype=torch.float64).reshape(-1).expand(out_channels)
    q, wq = _integers(x, scale, zp), _weight_integers(w, scales)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    q = F.pad(q.double(), (pw, pw, ph, ph), value=zp)  # padding holds the real zero
    cols = F.unfold(q, (kh, kw), dilation=dilation, stride=stride).to(torch.int64)
    cols = cols.reshape(q.shape[0], groups, per_group, kh * kw, -1)  # n, group, channel, tap, position
    wq = wq.reshape(groups, out_channels // groups, per_group, kh * kw)
    products = cols.unsqueeze(2) * wq[None, :, :, :, :, None]  # n, group, out, channel, tap, position
    pairs, changed = _pair_sums(products, 3)
    acc = pairs.sum((3, 4)).flatten(1, 2) - zp * wq.sum((2, 3)).reshape(1, -1, 1)
    value = (acc.double() * scale * scales.reshape(1, -1, 1)).reshape(exact.shape)
    value = value.to(exact.dtype) + (bias.reshape(1, -1, 1, 1) if bias is not None else 0)
    return torch.where(changed.any(3).any(3).flatten(1, 2).reshape(exact.shape), value, exact)


def _value(gm: torch.fx.GraphModule, arg):
    return getattr(gm, arg.target) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else arg


def _quantized_operands(gm: torch.fx.GraphModule, node):
    """(x_scale, x_zero_point, w_scales) of a linear/conv2d fed a per-tensor uint8 activation and a
    symmetric int8 weight (per-tensor or per output channel) through dequantizes, or None."""
    if not is_call(node, (_LINEAR, _CONV2D)):
        return None
    x, w = node.args[0], node.args[1]
    if not (is_call(x, DEQUANTIZE) and is_call(w, DEQUANTIZE)) or "per_tensor" not in str(x.target):
        return None
    xa, wa = schema_arguments(x), schema_arguments(w)
    if is_call(node, (_CONV2D,)) and isinstance(xa["scale"], torch.fx.Node):
        return None  # a dynamically quantized conv: inductor leaves it to a float conv (exact)
    if xa["dtype"] != torch.uint8 or wa["dtype"] != torch.int8:
        return None
    per_channel = "per_channel" in str(w.target)
    if per_channel and wa["axis"] != 0:
        return None
    zero_points = _value(gm, wa["zero_points"] if per_channel else wa["zero_point"])
    if bool(torch.as_tensor(zero_points).ne(0).any()):
        return None  # an asymmetric weight: not the x86 kernels' scheme
    return xa["scale"], xa["zero_point"], wa["scales"] if per_channel else wa["scale"]


def _grouped(gm: torch.fx.GraphModule, node) -> bool:
    """A conv2d of several groups of more than one input channel each."""
    if not is_call(node, (_CONV2D,)) or schema_arguments(node)["groups"] == 1:
        return False
    weight = _value(gm, node.args[1].args[0])
    return isinstance(weight, torch.Tensor) and weight.shape[1] > 1


def forms(reference: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """The reference with its quantized linears and conv2ds summing products in int16 pairs (two
    forms when a grouped conv could go either way); [] if it has no such op."""
    nodes = [n for n in reference.graph.nodes if _quantized_operands(reference, n)]
    if not nodes:
        return []
    grouped = any(_grouped(reference, n) for n in nodes)
    return [_paired(reference, grouped_pairs) for grouped_pairs in ((True, False) if grouped else (True,))]


def _paired(reference: torch.fx.GraphModule, grouped_pairs: bool) -> torch.fx.GraphModule:
    gm = copy.deepcopy(reference)
    for node in list(gm.graph.nodes):
        operands = _quantized_operands(gm, node)
        if operands is None:
            continue
        a = schema_arguments(node)
        if is_call(node, (_LINEAR,)):
            node.target, node.args, node.kwargs = paired_linear, (a["input"], a["weight"], a["bias"], *operands), {}
        else:
            node.target = paired_conv2d
            node.args = (a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                         a["groups"], *operands, grouped_pairs)
            node.kwargs = {}
    gm.recompile()
    return gm
