"""Step 5 (``fold_quantize=True``): weights are stored already quantized.

A quantize node whose inputs are all constants (attributes, possibly through
pure ops such as a transpose) is evaluated once and replaced by an integer
buffer ``_frozen_paramN``. Dequantize nodes stay: they are the graph's record
of how to read the integers.
"""

from __future__ import annotations

import torch
from torch import fx

from .ops import QUANTIZE, SYM_SIZE, is_call


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Constants:
    """Values of the nodes computable from attributes alone (None when not constant)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[fx.Node, object] = {}

    def value(self, node: fx.Node):
        if node not in self.values:
            self.values[node] = self._evaluate(node)
        return self.values[node]

    def _evaluate(self, node: fx.Node):
        if node.op == "get_attr":
            return _attr(self.gm, node.target)
        if node.op != "call_function" or is_call(node, SYM_SIZE):
            return None
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and (
            target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags
        ):
            return None  # mutating or random ops are never folded
        inputs = [a for a in node.all_input_nodes]
        vals = [self.value(a) for a in inputs]
        if any(v is None for v in vals):
            return None
        env = dict(zip(inputs, vals))
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        return node.target(*args, **kwargs)


def fold_quantized_weights(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    constants = _Constants(gm)
    count = getattr(gm, "_frozen_param_count", 0)
    for node in list(graph.nodes):
        if not is_call(node, QUANTIZE) or not node.all_input_nodes:
            continue
        with torch.no_grad():
            value = constants.value(node)
        if value is None:
            continue
        while hasattr(gm, f"_frozen_param{count}"):
            count += 1
        name = f"_frozen_param{count}"
        count += 1
        gm.register_buffer(name, value)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        attr.name = node.name
    gm._frozen_param_count = count
    return gm
