"""Fold QAT-simulated conv + BatchNorm into a plain conv (the ``_fold_conv_bn_qat`` step).

``prepare_qat_pt2e`` rewrites every ``conv -> batch_norm`` into torchao's QAT
simulation; once its fake-quants have become quantize/dequantize pairs the
graph holds, per conv-bn::

    sf  = bn_w / sqrt(bn_rv + eps)                       # "scale factor"
    w_q = dq(q(conv_w * sf.reshape(<out-channel axis>)))  # weight q/dq (per-tensor or per-channel)
    b0  = zeros_like(conv_b)   [-> q -> dq]               # only with a conv bias
    y   = conv(x, w_q, b0 | None)
    y   = y / sf.reshape([1, -1, 1, ...])
    y   = y + conv_b.reshape([1, -1, 1, ...])             # only with a conv bias
    out = batch_norm(y, bn_w, bn_b, bn_rm, bn_rv, training=<any>, momentum, eps)

This pass anchors on each ``batch_norm`` node, walks back through those
producers and, when the whole shape is there, rewrites it to::

    out = conv(x, dq(q(W)), B)     # same conv / q / dq nodes, so their meta is kept

where ``W, B`` are the eval-mode fold of the *float* conv weight and bias with
the running statistics (:func:`qref.fold.fold_conv_bn_weights`), stored in the
conv's weight (and bias) attributes; the weight q/dq keep the qparams learnt
during QAT.  A conv without bias gets a new ``<weight>_bias`` attribute.  The
``num_batches_tracked.add_(1)`` of each folded BN and all dead code are removed.

What is matched is exactly what torchao 0.18 matches (its subgraph patterns,
with literals such as eps, momentum, the training flag, reshape sizes and
per-tensor qparams treated as wildcards):

* conv ops: ``aten.conv1d.default``, ``aten.conv2d.default``,
  ``aten.conv_transpose1d.default``, ``aten.conv_transpose2d.input``
  (not conv3d, not the ``.padding`` overloads);
* BN op: ``aten.batch_norm.default`` (train or eval form);
* the weight is q/dq'd with ``quantize/dequantize_per_tensor.default`` or
  ``..._per_channel.default`` (an unquantized weight is not folded); a
  quantized bias must use the same per-tensor/per-channel family;
* every intermediate node is used only inside the pattern, and the nodes bound
  to distinct pattern inputs are distinct.

The eps used for folding is the BN node's eps.  (torchao's prepare replaces
the model's BN eps and momentum by the literals 1e-5 and 0.1, and its fold uses
its own 1e-5 literal; on graphs from ``prepare_qat_pt2e`` these agree.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..fold import fold_conv_bn_weights
from ..nodes import is_call
from .ops import schema_arguments

__all__ = ["fold_qat_conv_bn"]

aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed

# conv op -> is it a transposed conv
_CONV_OPS = {
    aten.conv1d.default: False,
    aten.conv2d.default: False,
    aten.conv_transpose1d.default: True,
    aten.conv_transpose2d.input: True,
}
# dequantize op -> (its quantize op, is it per-channel)
_DQ_OPS = {
    _qd.dequantize_per_tensor.default: (_qd.quantize_per_tensor.default, False),
    _qd.dequantize_per_channel.default: (_qd.quantize_per_channel.default, True),
}
# Every BN op torchao recognises; only batch_norm.default is ever folded, but
# (like torchao) a graph without any of them is returned untouched.
_ANY_BN_OPS = (
    aten.batch_norm.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit_no_training.default,
    aten.cudnn_batch_norm.default,
    aten.miopen_batch_norm.default,
)


@dataclasses.dataclass
class _QatConvBn:
    """One matched QAT conv-bn (nodes of the graph being rewritten)."""

    bn: Node
    conv: Node
    weight: Node  # get_attr: float conv weight
    weight_q: Node  # quantize node fed by `weight * scale factor`
    bias: Node | None  # get_attr: float conv bias (None: conv has no bias)
    bias_q: Node | None  # quantize node fed by zeros_like(bias) (None: bias not quantized)
    bn_params: tuple[Node, Node, Node, Node]  # get_attr: weight, bias, running mean, running var
    eps: float


def _is_get_attr(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def _q_dq(dq) -> tuple[Node, Node, bool] | None:
    """For ``dq(q(v))`` return ``(q, v, per_channel)``, else None."""
    if not (isinstance(dq, Node) and dq.op == "call_function" and dq.target in _DQ_OPS):
        return None
    q_op, per_channel = _DQ_OPS[dq.target]
    q = dq.args[0]
    if not is_call(q, (q_op,)):
        return None
    # per-channel scale / zero-point are graph inputs shared by q and dq
    if per_channel and (q.args[1] is not dq.args[1] or q.args[2] is not dq.args[2]):
        return None
    return q, q.args[0], per_channel


def _match(bn: Node) -> _QatConvBn | None:
    """Match the QAT conv-bn simulation that ends in ``bn``; None if it is not there."""
    if not is_call(bn, (aten.batch_norm.default,)):
        return None
    a = schema_arguments(bn)
    bn_w, bn_b, bn_rm, bn_rv = a["weight"], a["bias"], a["running_mean"], a["running_var"]
    if not all(_is_get_attr(n) for n in (bn_w, bn_b, bn_rm, bn_rv)):
        return None
    inputs = [bn_w, bn_b, bn_rm, bn_rv]  # graph nodes bound to pattern inputs
    inner = []  # nodes of the pattern other than its inputs and its output `bn`

    # y + conv_b.reshape(...)   (only when the conv has a bias)
    y = a["input"]
    conv_b = None
    if is_call(y, (aten.add.Tensor,)) and is_call(y.args[1], (aten.reshape.default,)):
        bias_reshape = y.args[1]
        conv_b = bias_reshape.args[0]
        inner += [y, bias_reshape]
        y = y.args[0]

    # conv / sf.reshape(...)
    if not (is_call(y, (aten.div.Tensor,)) and is_call(y.args[1], (aten.reshape.default,))):
        return None
    conv, out_reshape = y.args
    sf = out_reshape.args[0]
    inner += [y, out_reshape]

    # sf = bn_w / sqrt(bn_rv + eps)
    if not (is_call(sf, (aten.div.Tensor,)) and sf.args[0] is bn_w and is_call(sf.args[1], (aten.sqrt.default,))):
        return None
    sqrt = sf.args[1]
    add_eps = sqrt.args[0]
    if not (is_call(add_eps, (aten.add.Tensor,)) and add_eps.args[0] is bn_rv):
        return None
    inner += [sf, sqrt, add_eps]

    # conv(x, dq(q(conv_w * sf.reshape(...))), bias)
    if not (isinstance(conv, Node) and conv.op == "call_function" and conv.target in _CONV_OPS):
        return None
    ca = schema_arguments(conv)
    inputs.append(ca["input"])
    weight_qdq = _q_dq(ca["weight"])
    if weight_qdq is None:
        return None
    weight_q, mul, per_channel = weight_qdq
    if not (is_call(mul, (aten.mul.Tensor,)) and is_call(mul.args[1], (aten.reshape.default,))):
        return None
    conv_w, weight_reshape = mul.args
    if not (_is_get_attr(conv_w) and weight_reshape.args[0] is sf):
        return None
    inputs.append(conv_w)
    inputs += weight_q.args[1:3] if per_channel else []
    inner += [conv, ca["weight"], weight_q, mul, weight_reshape]

    bias_q = None
    if conv_b is None:
        if ca["bias"] is not None:
            return None
    else:
        if not _is_get_attr(conv_b):
            return None
        inputs.append(conv_b)
        zero_bias = ca["bias"]
        bias_qdq = _q_dq(zero_bias)
        if bias_qdq is not None:
            bias_q, zero_bias, bias_per_channel = bias_qdq
            if bias_per_channel != per_channel:  # torchao has no mixed pattern
                return None
            inputs += bias_q.args[1:3] if per_channel else []
            inner += [ca["bias"], bias_q]
        if not (is_call(zero_bias, (aten.zeros_like.default,)) and zero_bias.args[0] is conv_b):
            return None
        inner.append(zero_bias)

    # Like a subgraph match: each pattern node is a different graph node, and no
    # intermediate value is used outside the pattern (bn's users are free).
    matched = [n for n in inputs + inner + [bn] if isinstance(n, Node)]
    if len(set(matched)) != len(matched):
        return None
    if any(user not in matched for n in inner for user in n.users):
        return None
    return _QatConvBn(bn, conv, conv_w, weight_q, conv_b, bias_q, (bn_w, bn_b, bn_rm, bn_rv), a["eps"])


def _get(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _set_param(gm: GraphModule, target: str, value: torch.Tensor, requires_grad: bool) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    setattr(owner, name, torch.nn.Parameter(value, requires_grad=requires_grad))


def _set_conv_bias(conv: Node, bias: Node) -> None:
    if "bias" in conv.kwargs:
        conv.update_kwarg("bias", bias)
    else:
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[2] = bias
        conv.args = tuple(args)


def _fold(gm: GraphModule, m: _QatConvBn) -> None:
    graph = gm.graph
    conv_w = _get(gm, m.weight.target)
    conv_b = None if m.bias is None else _get(gm, m.bias.target)
    bn_w, bn_b, bn_rm, bn_rv = (_get(gm, n.target) for n in m.bn_params)
    w, b = fold_conv_bn_weights(
        conv_w.detach(),
        None if conv_b is None else conv_b.detach(),
        bn_rm,
        bn_rv,
        m.eps,
        bn_w.detach(),
        bn_b.detach(),
        transpose=_CONV_OPS[m.conv.target],
        groups=schema_arguments(m.conv)["groups"],
    )
    _set_param(gm, m.weight.target, w, conv_w.requires_grad)

    # q/dq now quantize the folded float weight (and bias), with the QAT qparams
    m.weight_q.args = (m.weight, *m.weight_q.args[1:])
    if m.bias is None:  # new parameter `<weight>_bias`, as torchao names it
        bias_target = m.weight.target + "_bias"
        _set_param(gm, bias_target, b, False)
        with graph.inserting_before(m.conv):
            bias_node = graph.get_attr(bias_target)
        if "val" in m.conv.meta:
            fake_mode = m.conv.meta["val"].fake_mode
            bias_node.meta["val"] = fake_mode.from_tensor(b, static_shapes=True)
        _set_conv_bias(m.conv, bias_node)
    else:
        _set_param(gm, m.bias.target, b, conv_b.requires_grad)
        if m.bias_q is None:
            _set_conv_bias(m.conv, m.bias)  # instead of zeros_like(bias)
        else:
            m.bias_q.args = (m.bias, *m.bias_q.args[1:])  # conv keeps reading the bias dq

    m.bn.replace_all_uses_with(m.conv)
    graph.erase_node(m.bn)


def _is_num_batches_tracked_update(node: Node, num_batches_tracked: set[str]) -> bool:
    return (
        is_call(node, (aten.add_.Tensor,))
        and _is_get_attr(node.args[0])
        and node.args[0].target in num_batches_tracked
        and node.args[1] == 1
    )


def fold_qat_conv_bn(gm: GraphModule) -> GraphModule:
    """Fold every QAT conv-bn of a q/dq'd ``prepare_qat_pt2e`` graph; returns ``gm``
    (modified in place, like torchao).  A graph without BN is returned untouched."""
    graph = gm.graph
    if not any(n.op == "call_function" and n.target in _ANY_BN_OPS for n in graph.nodes):
        return gm
    graph.eliminate_dead_code()  # dead users would block matches, as in torchao

    num_batches_tracked = set()
    for bn in list(graph.nodes):
        match = _match(bn)
        if match is None:
            continue
        _fold(gm, match)
        bn_module = match.bn_params[2].target.rpartition(".")[0]  # owner of running_mean
        num_batches_tracked.add(f"{bn_module}.num_batches_tracked" if bn_module else "num_batches_tracked")

    for node in list(graph.nodes):
        if _is_num_batches_tracked_update(node, num_batches_tracked) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
