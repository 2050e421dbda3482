"""Step 4a: give each annotated consumer of a shared dequantize its own copy.

A backend's pattern matcher sees [dq -> op -> q] as one quantized op only if the
dq belongs to that op alone. Consumers the quantizer did not annotate keep
sharing the original; dynamic-quantization dq nodes stay shared.
"""

from torch import fx

from .annotations import annotation
from .ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, is_call, real_users


def _is_dynamic(dq: fx.Node) -> bool:
    q = dq.args[0]
    if not is_call(q, QUANTIZE) or not isinstance(q.args[1], fx.Node):
        return False
    getitem = q.args[1]  # a dynamic quantize reads choose_qparams(...)[0]; a weight's scale is a get_attr
    return bool(getitem.args) and isinstance(getitem.args[0], fx.Node) and is_call(getitem.args[0], CHOOSE_QPARAMS)


def duplicate_dequantize(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    for dq in list(graph.nodes):
        if not is_call(dq, DEQUANTIZE):
            continue
        users = real_users(dq)
        if len(users) <= 1 or _is_dynamic(dq):
            continue
        for user in users:
            if annotation(user) is None:
                continue
            with graph.inserting_after(dq):
                copy = graph.node_copy(dq)
            user.replace_input_with(dq, copy)
        if not dq.users:
            graph.erase_node(dq)
    return gm
