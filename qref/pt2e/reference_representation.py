"""The integer reference representation: convert_pt2e's ``use_reference_representation=True`` step.

Input: a converted q/dq graph (weights folded to int8 constants, one user per dequantize).
Output: the same graph with every quantized pattern torchao 0.18 rewrites spelled out in integer
arithmetic, node for node as torchao writes it, so results agree bit for bit.

Each pattern is one small function below that writes its math as graph nodes (``op(target, *args)``
appends one node), and one matcher that walks from the anchor op back through its dequantize nodes
and forward to its quantize node. Patterns are tried in torchao's order, over the whole graph each.

What torchao matches, and so what we match (its SubgraphMatcher rules, spelled out):
- only int8 q/dq: every pattern has the literal ``torch.int8``; uint8 q/dq are left alone;
- anchors are ``aten.linear``, ``aten.convolution``, ``aten.add.Tensor`` (+ ``aten.relu``) and
  ``aten.max_pool2d_with_indices`` + getitem. ``aten.conv2d``/``aten.max_pool2d`` (what
  ``torch.export`` produces) are not anchors: there only the q/dq nodes around them are rewritten;
- linear/conv need a per-tensor int8 weight dequantize (per-channel weights keep the float op);
- nodes inside a pattern must have no users outside it, q/dq nodes must have exactly their 6 (7)
  positional arguments, and no graph node may stand for two pattern nodes;
- add/add-relu: both inputs and the output share quant_min and quant_max;
- max_pool: padding, dilation and ceil_mode must be the defaults.

torchao's numerics, mirrored on purpose (distance from the q/dq graph in output LSB):
- linear/conv requantize with ``out_dtype(mul, int32, acc, x_scale * w_scale / out_scale)``, which
  truncates toward zero, and quantize the bias with ``out_dtype(div, int32, ...)`` (truncation
  too): up to 1 LSB;
- add rounds each rescaled input separately and clamps to a hardcoded [-128, 127]: up to 1 LSB
  (on a narrow range [-127, 127] it may also store -128, which the next dequantize's clamp to
  quant_min takes back to -127);
- add-relu truncates each rescaled input and clamps at the output zero point: up to 2 LSB;
- max_pool requantizes by truncation: exact when input and output scales agree (as quantizers
  make them), else up to 1 LSB.
Deliberate differences from torchao (neither changes a result torchao can produce):
- linear/conv without bias: torchao emits ``out_dtype(div, int32, None, ...)``, which fails at
  run time; we leave the bias term out;
- conv bias: torchao unsqueezes it twice, right only for 2-d convolutions; we unsqueeze it once
  per spatial dimension (identical for conv2d).
Not covered: torchao's int4 groupwise dynamic linear (``torchao.quantize_affine`` graphs, rewritten
to torchao's own custom op).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
from torch import fx
from torch._higher_order_ops.out_dtype import out_dtype

from ..nodes import is_call
from ..qparams import QParams
from .ops import schema_arguments

__all__ = ["to_reference_representation"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

# torchao traces its replacements with tensor bounds (aten.clamp.Tensor) and then retargets that
# overload to the packet; where its bounds were Python ints the overload stays aten.clamp.default.
CLAMP = aten.clamp
CLAMP_INT = aten.clamp.default

# torchao first retargets these overloads to their packets, in the whole graph (also nodes that
# no pattern matches), so that its traced patterns can match them. We do the same.
_TO_PACKET = {
    qd.quantize_per_tensor.default: qd.quantize_per_tensor,
    qd.quantize_per_tensor.tensor: qd.quantize_per_tensor,
    qd.quantize_per_tensor.tensor2: qd.quantize_per_tensor,
    qd.dequantize_per_tensor.default: qd.dequantize_per_tensor,
    qd.dequantize_per_tensor.tensor: qd.dequantize_per_tensor,
    qd.dequantize_per_tensor.tensor2: qd.dequantize_per_tensor,
    qd.quantize_per_channel.default: qd.quantize_per_channel,
    qd.dequantize_per_channel.default: qd.dequantize_per_channel,
    aten.clamp.Tensor: aten.clamp,
}


def _int8(scale, zero_point, quant_min, quant_max) -> QParams:
    """Per-tensor int8 QParams whose values are graph nodes or literals (as the pattern binds them)."""
    return QParams(scale=scale, zero_point=zero_point, quant_min=quant_min, quant_max=quant_max, dtype=torch.int8)


def _bound(q: QParams) -> tuple:
    """The values a pattern's placeholders bind for ``q``: scale, zero point, quant_min, quant_max."""
    return q.scale, q.zero_point, q.quant_min, q.quant_max


class _Ops:
    """``op(target, *args)`` appends one call_function node at the graph's insertion point."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph

    def __call__(self, target, *args):
        return self.graph.call_function(target, args)


# --------------------------------------------------------------------------------------------
# The integer math, one function per pattern. Inputs are graph nodes or literals.
# --------------------------------------------------------------------------------------------


def quantize_per_tensor(op, x_fp32, q: QParams, clamp=CLAMP):
    """x_i8 = clamp(round(x / scale) + zero_point, quant_min, quant_max)."""
    x = op(aten.div.Tensor, x_fp32, q.scale)
    x = op(aten.round.default, x)  # half to even, as quantize_per_tensor
    x = op(aten.to.dtype, x, torch.int32)
    x = op(aten.add.Tensor, x, q.zero_point)
    x = op(clamp, x, q.quant_min, q.quant_max)
    return op(aten.to.dtype, x, torch.int8)


def dequantize_per_tensor(op, x_i8, q: QParams):
    """x_fp32 = (x_i8 - zero_point) * scale."""
    x = op(CLAMP, x_i8, q.quant_min, q.quant_max)  # no-op on valid input; torchao keeps it
    x = op(aten.to.dtype, x, torch.float32)
    x = op(aten.sub.Tensor, x, q.zero_point)
    x = op(aten.mul.Tensor, x, q.scale)
    return op(aten.to.dtype, x, torch.float32)


def quantize_per_channel(op, x_fp32, scales, zero_points, axis, quant_min, quant_max):
    """Per-channel quantize; the channel axis is moved last so that scales [C] broadcast."""
    x = op(aten.transpose.int, x_fp32, axis, -1)
    x = op(aten.div.Tensor, x, scales)
    x = op(aten.round.default, x)
    x = op(aten.to.dtype, x, torch.int32)
    x = op(aten.add.Tensor, x, zero_points)
    x = op(CLAMP_INT, x, quant_min, quant_max)
    x = op(aten.transpose.int, x, axis, -1)
    return op(aten.to.dtype, x, torch.int8)


def dequantize_per_channel(op, x_i8, scales, zero_points, axis, quant_min, quant_max):
    """Per-channel dequantize: (x_i8 - zero_points) * scales along ``axis``."""
    x = op(CLAMP_INT, x_i8, quant_min, quant_max)
    x = op(aten.transpose.int, x, axis, -1)
    x = op(aten.to.dtype, x, torch.int32)
    x = op(aten.sub.Tensor, x, zero_points)
    x = op(aten.to.dtype, x, torch.float32)
    x = op(aten.mul.Tensor, x, scales)
    return op(aten.transpose.int, x, axis, -1)


def _centered_i16(op, v_i8, q: QParams):
    """v_i8 - zero_point in int16 (the operand of the int32-accumulating linear/conv)."""
    v = op(CLAMP, v_i8, q.quant_min, q.quant_max)
    v = op(aten.to.dtype, v, torch.int16)
    return op(aten.sub.Tensor, v, q.zero_point)


def _add_bias_i32(op, acc_i32, bias, x_scale, w_scale, spatial_dims: int):
    """acc + bias / (x_scale * w_scale), the bias cast to int32 by truncation (as torchao)."""
    if bias is None:  # torchao emits out_dtype(div, None, ...) here, which fails at run time
        return acc_i32
    bias_scale = op(aten.mul.Tensor, x_scale, w_scale)
    bias_i32 = op(out_dtype, aten.div.Tensor, torch.int32, bias, bias_scale)
    for _ in range(spatial_dims):  # torchao: always twice (conv2d); once per spatial dim is right
        bias_i32 = op(aten.unsqueeze.default, bias_i32, -1)
    return op(aten.add.Tensor, acc_i32, bias_i32)


def _requantize(op, acc_i32, x_scale, w_scale, out: QParams):
    """out_i8 = clamp(trunc(acc * x_scale * w_scale / out_scale) + out_zero_point)."""
    multiplier = op(aten.div.Tensor, op(aten.mul.Tensor, x_scale, w_scale), out.scale)
    acc = op(out_dtype, aten.mul.Tensor, torch.int32, acc_i32, multiplier)  # truncates, as torchao
    acc = op(aten.add.Tensor, acc, out.zero_point)
    acc = op(CLAMP, acc, out.quant_min, out.quant_max)
    return op(aten.to.dtype, acc, torch.int8)


def quantized_linear(op, x_i8, xq: QParams, w_i8, wq: QParams, bias, out: QParams):
    """int32 linear of the centered operands, plus the int32 bias, requantized to int8."""
    x = _centered_i16(op, x_i8, xq)
    w = _centered_i16(op, w_i8, wq)
    acc = op(out_dtype, aten.linear.default, torch.int32, x, w, None)
    acc = _add_bias_i32(op, acc, bias, xq.scale, wq.scale, spatial_dims=0)
    return _requantize(op, acc, xq.scale, wq.scale, out)


def quantized_convolution(op, x_i8, xq: QParams, w_i8, wq: QParams, bias, conv_args, out: QParams):
    """int32 convolution of the centered operands (same stride, padding, ...), as linear."""
    stride = conv_args[0]
    spatial_dims = len(stride) if isinstance(stride, (list, tuple)) else 2
    x = _centered_i16(op, x_i8, xq)
    w = _centered_i16(op, w_i8, wq)
    acc = op(out_dtype, aten.convolution.default, torch.int32, x, w, None, *conv_args)
    acc = _add_bias_i32(op, acc, bias, xq.scale, wq.scale, spatial_dims)
    return _requantize(op, acc, xq.scale, wq.scale, out)


def dynamic_quantized_linear(op, x_fp32, x_scale, x_zero_point, w_i8, wq, bias, quant_range):
    """Dynamically quantized linear: int8 x (qparams from choose_qparams), float output."""
    xq = _int8(x_scale, x_zero_point, *quant_range)
    x = quantize_per_tensor(op, x_fp32, xq, clamp=CLAMP_INT)
    x = op(aten.sub.Tensor, op(aten.to.dtype, x, torch.int16), x_zero_point)
    w = _centered_i16(op, w_i8, wq)
    acc = op(out_dtype, aten.linear.default, torch.int32, x, w, None)
    acc = _add_bias_i32(op, acc, bias, x_scale, wq.scale, spatial_dims=0)
    return op(aten.mul.Tensor, acc, op(aten.mul.Tensor, x_scale, wq.scale))


def quantized_add(op, x_i8, xq: QParams, y_i8, yq: QParams, out: QParams):
    """out = round(x_scale/out_scale*(x - x_zp)) + round(y_scale/out_scale*(y - y_zp)) + out_zp"""

    def rescaled(v_i8, q):
        v = op(aten.to.dtype, v_i8, torch.int32)
        ratio = op(aten.div.Tensor, q.scale, out.scale)
        v = op(aten.mul.Tensor, ratio, op(aten.sub.Tensor, v, q.zero_point))
        v = op(aten.round.default, v)  # rounds each term, as torchao
        return op(aten.to.dtype, v, torch.int32)

    acc = op(aten.add.Tensor, rescaled(x_i8, xq), rescaled(y_i8, yq))
    acc = op(aten.add.Tensor, acc, out.zero_point)
    acc = op(CLAMP_INT, acc, -128, 127)  # torchao hardcodes the int8 range
    return op(aten.to.dtype, acc, torch.int8)


def quantized_add_relu(op, x_i8, xq: QParams, y_i8, yq: QParams, out: QParams):
    """As quantized_add, but each term truncated (out_dtype) and relu as a clamp at out_zp."""

    def rescaled(v_i8, q):
        v = op(aten.sub.Tensor, op(aten.to.dtype, v_i8, torch.int32), q.zero_point)
        ratio = op(aten.div.Tensor, q.scale, out.scale)
        return op(out_dtype, aten.mul.Tensor, torch.int32, v, ratio)  # truncates (torchao)

    acc = op(aten.add.Tensor, rescaled(x_i8, xq), rescaled(y_i8, yq))
    acc = op(aten.add.Tensor, acc, out.zero_point)
    acc = op(CLAMP, acc, out.zero_point, out.quant_max)
    return op(aten.to.dtype, acc, torch.int8)


def quantized_max_pool2d(op, x_i8, xq: QParams, kernel_size, stride, index, out: QParams):
    """max_pool2d of x_i8 - x_zp in int32, rescaled to the output qparams (truncating)."""
    x = op(CLAMP, x_i8, xq.quant_min, xq.quant_max)
    x = op(aten.sub.Tensor, op(aten.to.dtype, x, torch.int32), xq.zero_point)
    pooled = op(aten.max_pool2d_with_indices.default, x, kernel_size, stride)
    pooled = op(operator.getitem, pooled, index)
    y = op(aten.mul.Tensor, pooled, op(aten.div.Tensor, xq.scale, out.scale))
    y = op(aten.add.Tensor, y, out.zero_point)
    y = op(CLAMP, y, out.quant_min, out.quant_max)
    return op(aten.to.dtype, y, torch.int8)  # truncates (torchao)


# --------------------------------------------------------------------------------------------
# Matching: each matcher takes an anchor node and returns a _Match or None.
# --------------------------------------------------------------------------------------------


class _Match(NamedTuple):
    output: fx.Node  # the node whose uses the replacement takes over
    inner: tuple  # the matched graph nodes (output included), erased after the rewrite
    bound: tuple  # the values the pattern's placeholders stand for
    build: Any  # op -> the replacement's output node
    kept: tuple = ()  # matched graph nodes the replacement reuses


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _same_literal(pattern, value) -> bool:
    """SubgraphMatcher's equality for literals: same type and value, elementwise for sequences."""
    if isinstance(pattern, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(pattern) == len(value) and all(map(_same_literal, pattern, value))
    return type(value) is type(pattern) and value == pattern


def _int8_qdq(node, packet, nargs=6) -> Optional[tuple]:
    """The arguments of an int8 q/dq node written exactly as torchao's patterns write it."""
    if not is_call(node, (packet,)) or node.kwargs or len(node.args) != nargs:
        return None
    if node.args[-1] is not torch.int8:
        return None
    return node.args[:-1]


def _dq_into(node, consumer) -> Optional[tuple]:
    """(x_i8, QParams) if ``node`` is an int8 per-tensor dequantize used only by ``consumer``."""
    args = _int8_qdq(node, qd.dequantize_per_tensor)
    if args is None or set(node.users) != {consumer}:
        return None
    return args[0], _int8(*args[1:])


def _q_of(node) -> Optional[tuple]:
    """(q_node, QParams) if the only user of ``node`` is an int8 per-tensor quantize of it."""
    q = _sole_user(node)
    args = _int8_qdq(q, qd.quantize_per_tensor)
    if args is None or args[0] is not node:
        return None
    return q, _int8(*args[1:])


def _match_linear(node):
    if not is_call(node, (aten.linear.default,)):
        return None
    a = schema_arguments(node)
    x, w, q = _dq_into(a["input"], node), _dq_into(a["weight"], node), _q_of(node)
    if x is None or w is None or q is None:
        return None
    (x_i8, xq), (w_i8, wq), (q_out, out) = x, w, q
    return _Match(
        q_out,
        (q_out, node, a["input"], a["weight"]),
        (x_i8, *_bound(xq), w_i8, *_bound(wq), a["bias"], *_bound(out)),
        lambda op: quantized_linear(op, x_i8, xq, w_i8, wq, a["bias"], out),
    )


def _match_convolution(node):
    if not is_call(node, (aten.convolution.default,)):
        return None
    a = schema_arguments(node)
    x, w, q = _dq_into(a["input"], node), _dq_into(a["weight"], node), _q_of(node)
    if x is None or w is None or q is None:
        return None
    (x_i8, xq), (w_i8, wq), (q_out, out) = x, w, q
    names = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")
    conv_args = tuple(a[n] for n in names)
    return _Match(
        q_out,
        (q_out, node, a["input"], a["weight"]),
        (x_i8, *_bound(xq), w_i8, *_bound(wq), a["bias"], *_bound(out), *conv_args),
        lambda op: quantized_convolution(op, x_i8, xq, w_i8, wq, a["bias"], conv_args, out),
    )


def _match_add(node, with_relu: bool):
    if not is_call(node, (aten.add.Tensor,)):
        return None
    a = schema_arguments(node)
    if not _same_literal(1, a["alpha"]):
        return None
    relu = _sole_user(node) if with_relu else None
    if with_relu and not (is_call(relu, (aten.relu.default,)) and relu.args == (node,)):
        return None
    x, y, q = _dq_into(a["self"], node), _dq_into(a["other"], node), _q_of(relu or node)
    if x is None or y is None or q is None:
        return None
    (x_i8, xq), (y_i8, yq), (q_out, out) = x, y, q
    # one quant_min and one quant_max placeholder serve all three q/dq nodes in torchao's pattern
    if not (xq.quant_min == yq.quant_min == out.quant_min):
        return None
    if not (xq.quant_max == yq.quant_max == out.quant_max):
        return None
    rewrite = quantized_add_relu if with_relu else quantized_add
    inner = (q_out, node, a["self"], a["other"]) + ((relu,) if with_relu else ())
    return _Match(
        q_out,
        inner,
        (x_i8, *xq[:2], y_i8, *yq[:2], *_bound(out)),
        lambda op: rewrite(op, x_i8, xq, y_i8, yq, out),
    )


def _match_max_pool2d(node):
    if not is_call(node, (operator.getitem,)):
        return None
    if not is_call(node.args[0], (aten.max_pool2d_with_indices.default,)):
        return None
    pool, index = node.args
    a = schema_arguments(pool)
    defaults = {"padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}
    if set(pool.users) != {node} or not all(_same_literal(v, a[k]) for k, v in defaults.items()):
        return None
    x, q = _dq_into(a["self"], pool), _q_of(node)
    if x is None or q is None:
        return None
    (x_i8, xq), (q_out, out) = x, q
    k, s = a["kernel_size"], a["stride"]
    return _Match(
        q_out,
        (q_out, node, pool, a["self"]),
        (x_i8, *_bound(xq), *_bound(out), k, s, index),
        lambda op: quantized_max_pool2d(op, x_i8, xq, k, s, index, out),
    )


def _match_dynamic_linear(node):
    """x -> choose_qparams -> q -> dq -> linear (per-tensor int8 weight), float output."""
    if not is_call(node, (aten.linear.default,)):
        return None
    a = schema_arguments(node)
    x, w = _dq_into(a["input"], node), _dq_into(a["weight"], node)
    if x is None or w is None:
        return None
    (q_x, xq), (w_i8, wq) = x, w
    q_args = _int8_qdq(q_x, qd.quantize_per_tensor)
    if q_args is None or tuple(q_args[1:]) != _bound(xq):  # q and dq share all their qparams
        return None
    x_fp32, scale, zp = q_args[0], xq.scale, xq.zero_point
    if not (is_call(scale, (operator.getitem,)) and is_call(zp, (operator.getitem,))):
        return None
    choose = scale.args[0]
    if not (is_call(choose, (qd.choose_qparams.tensor,)) and zp.args[0] is choose):
        return None
    if not (_same_literal(0, scale.args[1]) and _same_literal(1, zp.args[1])):
        return None
    c = schema_arguments(choose)
    if c["input"] is not x_fp32 or c["dtype"] is not torch.int8:
        return None
    if not (c["quant_min"] == xq.quant_min and c["quant_max"] == xq.quant_max):
        return None
    quant_range = (xq.quant_min, xq.quant_max)
    bias = a["bias"]
    return _Match(
        node,
        (node, a["input"], q_x, a["weight"]),
        (x_fp32, *quant_range, c["eps"], w_i8, *_bound(wq), bias),
        lambda op: dynamic_quantized_linear(op, x_fp32, scale, zp, w_i8, wq, bias, quant_range),
        kept=(choose, scale, zp),  # part of the pattern, but reused rather than re-emitted
    )


def _match_single(packet, nargs, rewrite):
    def match(node):
        args = _int8_qdq(node, packet, nargs)
        if args is None:
            return None
        if nargs == 6:
            return _Match(node, (node,), args, lambda op: rewrite(op, args[0], _int8(*args[1:])))
        return _Match(node, (node,), args, lambda op: rewrite(op, *args))

    return match


# In torchao's order (its _REWRITE_INFO_LIST); each runs over the whole graph before the next.
_PATTERNS = (
    _match_dynamic_linear,
    _match_linear,
    _match_convolution,
    lambda n: _match_add(n, with_relu=True),
    lambda n: _match_add(n, with_relu=False),
    _match_max_pool2d,
    _match_single(qd.quantize_per_tensor, 6, quantize_per_tensor),
    _match_single(qd.dequantize_per_tensor, 6, dequantize_per_tensor),
    _match_single(qd.quantize_per_channel, 7, quantize_per_channel),
    _match_single(qd.dequantize_per_channel, 7, dequantize_per_channel),
)


def _valid(m: _Match) -> bool:
    """SubgraphMatcher's rules: no node stands for two pattern nodes; only the output leaks."""
    matched = m.inner + m.kept
    nodes = [v for v in m.bound if isinstance(v, fx.Node)] + list(matched)
    if len(set(nodes)) != len(nodes):
        return False
    return all(set(n.users) <= set(matched) for n in matched if n is not m.output)


def _rewrite(graph: fx.Graph, m: _Match) -> None:
    with graph.inserting_before(m.output):
        new = m.build(_Ops(graph))
    m.output.replace_all_uses_with(new)
    pending = list(m.inner)
    while pending:  # erase users before what they use
        node = next(n for n in pending if not n.users)
        graph.erase_node(node)
        pending.remove(node)


def to_reference_representation(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the int8 q/dq patterns of ``gm`` in place as integer arithmetic; return ``gm``."""
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _TO_PACKET:
            node.target = _TO_PACKET[node.target]
    for match in _PATTERNS:
        erased = set()
        for node in list(graph.nodes):
            if node in erased:
                continue
            m = match(node)
            if m is not None and _valid(m):
                _rewrite(graph, m)
                erased.update(m.inner)
    graph.lint()
    gm.recompile()
    return gm
