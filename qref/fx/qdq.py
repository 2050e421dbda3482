"""Observer calls -> ``torch.quantize_per_tensor``/``per_channel`` + ``.dequantize()``.

Scale and zero point become buffers of the root module read by ``get_attr``
(the lowering pass reads them back as the quantized modules' output qparams),
named after the module the observer belongs to, as torch names them.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import observers

# torch.quantize_per_tensor takes the quantized dtypes; integer ones map onto them.
_QDTYPE = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}


def is_none_qconfig(node, qconfigs: dict) -> bool:
    return isinstance(node, fx.Node) and node.name in qconfigs and qconfigs[node.name] is None


def _attr_prefix(obs_node: fx.Node, qconfigs: dict, scopes: dict) -> str:
    """``<module path>`` for an output observer, ``<module path>_input`` for an input-only one."""
    observed = obs_node.args[0]
    input_only = observed.name in qconfigs and qconfigs[observed.name] is None
    owner = observed
    if input_only:
        users = list(obs_node.users)
        linear = [u for u in users if u.op == "call_function" and u.target is torch.nn.functional.linear]
        owner = linear[0] if linear else (users[0] if users else None)
    path = scopes[owner.name][0] if owner is not None and owner.name in scopes else ""
    return path + ("_input" if input_only else "")


def _buffer(model: fx.GraphModule, prefix: str, value) -> fx.Node:
    prefix = prefix.replace(".", "_")
    i = 0
    while hasattr(model, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    model.register_buffer(name, tensor)
    return model.graph.get_attr(name)


def replace_observer(model: fx.GraphModule, node: fx.Node, obs, qconfigs: dict, scopes: dict) -> None:
    graph = model.graph
    source = node.args[0]
    skip = all(is_none_qconfig(n, qconfigs) for n in list(node.args) + list(node.users))
    kind = observers.kind(obs)
    if skip or kind == "drop":
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        return
    with graph.inserting_before(node):
        if kind == "static":
            q = observers.observer_qparams(obs)
            prefix = _attr_prefix(node, qconfigs, scopes)
            dtype = obs.dtype if obs.dtype not in _QDTYPE else _QDTYPE[obs.dtype]
            if q.axis is None:
                scale = _buffer(model, prefix + "_scale_", float(q.scale))
                zero_point = _buffer(model, prefix + "_zero_point_", int(q.zero_point))
                args = (source, scale, zero_point, dtype)
                quantized = graph.call_function(torch.quantize_per_tensor, args)
            else:
                scale = _buffer(model, prefix + "_scale_", q.scale)
                zero_point = _buffer(model, prefix + "_zero_point_", q.zero_point)
                args = (source, scale, zero_point, q.axis, dtype)
                quantized = graph.call_function(torch.quantize_per_channel, args)
        elif kind == "dynamic":
            # torch decides reduce_range from the engine at convert time, not from the observer.
            reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")
            quantized = graph.call_function(
                torch.quantize_per_tensor_dynamic, (source, obs.dtype, reduce_range)
            )
        else:  # float16
            quantized = graph.call_method("to", (source, torch.float16))
        dequantized = graph.call_method("dequantize", (quantized,))
    node.replace_all_uses_with(dequantized)
    graph.erase_node(node)
