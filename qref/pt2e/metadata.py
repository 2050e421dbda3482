"""Step 4b: q/dq nodes inherit the metadata of the op they quantize.

A dequantize feeding an annotated op takes that op's metadata; a quantize after
an annotated op's output takes the op's; a weight's quantize takes the weight's
(through any view ops in between). Only ``stack_trace`` and ``quantization_tag``
travel: the rest describes the original op, not the q/dq node.
"""

from torch import fx
import torch

from .annotations import annotation
from .ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, is_call, real_users

PORTED = ("stack_trace", "quantization_tag")
_VIEWS = {
    torch.ops.aten.flatten.using_ints, torch.ops.aten.permute.default,
    torch.ops.aten.permute_copy.default, torch.ops.aten.slice_copy.Tensor,
    torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze_copy.dim,
    torch.ops.aten.transpose.int, torch.ops.aten.view_copy.default,
    torch.ops.aten.view.default,
}  # fmt: skip
_QDQ = QUANTIZE + DEQUANTIZE + (CHOOSE_QPARAMS[0],)


def _copy_meta(to: fx.Node, source: fx.Node) -> None:
    for key in PORTED:
        if key in source.meta:
            to.meta[key] = source.meta[key]


def _origin(node: fx.Node) -> fx.Node:
    """The producer behind a chain of q/dq nodes."""
    while is_call(node, _QDQ):
        node = node.args[0]
    return node


def _dequantize_of(producer: fx.Node, consumer: fx.Node):
    for arg in (*consumer.args, *consumer.kwargs.values()):
        if isinstance(arg, fx.Node) and is_call(arg, DEQUANTIZE) and _origin(arg) is producer:
            return arg
    return None


def _port_input(producer: fx.Node, consumer: fx.Node, qspec) -> None:
    if qspec is None:
        return
    if getattr(qspec, "is_dynamic", False):
        _port_dynamic_input(producer, consumer)
        return
    dq = _dequantize_of(producer, consumer)
    if dq is None:
        return
    q = dq.args[0]
    if is_call(q, QUANTIZE):
        chain, source = [q], q.args[0]
        while isinstance(source, fx.Node) and is_call(source, _VIEWS):
            chain.append(source)
            source = source.args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr":
            for n in chain:
                _copy_meta(n, source)
    _copy_meta(dq, consumer)


def _port_dynamic_input(producer: fx.Node, consumer: fx.Node) -> None:
    choose = next((u for u in _reachable(producer) if is_call(u, CHOOSE_QPARAMS)), None)
    if choose is None:
        raise ValueError(f"dynamically quantized input of {consumer} has no choose_qparams node")
    scale = real_users(choose)[0]
    q = next(iter(scale.users))
    dq = real_users(q)[0]
    for n in (choose, q, dq):
        _copy_meta(n, consumer)


def _reachable(node: fx.Node):
    """Nodes downstream of ``node``, breadth first."""
    seen, frontier = set(), list(node.users)
    while frontier:
        n = frontier.pop(0)
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        yield n
        frontier.extend(n.users)


def _port_output(producer: fx.Node, qspec) -> None:
    users = real_users(producer)
    # A quantized output has exactly one user, its quantize; anything else is left alone.
    if qspec is None or not users or not is_call(users[-1], QUANTIZE):
        return
    _copy_meta(users[-1], producer)


def port_metadata(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        a = annotation(node)
        if a is None:
            continue
        for producer, qspec in a.input_qspec_map.items():
            _port_input(producer, node, qspec)
        _port_output(node, a.output_qspec)
    return gm
