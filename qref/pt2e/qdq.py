"""Step 2 of convert: every observer / fake-quantize call becomes a quantize -> dequantize pair.

Per-tensor qparams are literals in the graph; per-channel scales and zero points
are buffers on the root module (``_scale_N`` / ``_zero_point_N``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .. import observers
from .ops import qd


def _new_buffer(gm: fx.GraphModule, prefix: str, value: torch.Tensor, counters: dict) -> str:
    """Register ``value`` as ``{prefix}{N}`` with the first free N (counted on, not re-searched)."""
    i = counters.get(prefix, 0)
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    counters[prefix] = i + 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, value.detach().clone())
    return name


def _dequantize_kwargs(source: fx.Node) -> dict:
    """A dequantize restores the dtype its input had (only non-float32 needs saying)."""
    val = source.meta.get("val")
    dtype = getattr(val, "dtype", torch.float32)
    return {} if dtype == torch.float32 else {"out_dtype": dtype}


def _static_pair(gm, graph, source, module, qparams_of, counters):
    q = qparams_of(module)
    if q.axis is None:
        args = (float(q.scale), int(q.zero_point), q.quant_min, q.quant_max, q.dtype)
        quantize, dequantize = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
    else:
        scale = graph.get_attr(_new_buffer(gm, "_scale_", q.scale, counters))
        zero_point = graph.get_attr(_new_buffer(gm, "_zero_point_", q.zero_point, counters))
        args = (scale, zero_point, q.axis, q.quant_min, q.quant_max, q.dtype)
        quantize, dequantize = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
    qnode = graph.call_function(quantize, (source, *args))
    return graph.call_function(dequantize, (qnode, *args), _dequantize_kwargs(source))


def _dynamic_pair(graph, source, module):
    dtype = observers.underlying_dtype(module.dtype)
    if dtype not in (torch.uint8, torch.int8):
        raise NotImplementedError(f"dynamic quantization to {dtype} (only uint8/int8 are supported)")
    symmetric = getattr(module, "qscheme", None) == torch.per_tensor_symmetric
    choose = qd.choose_qparams_symmetric.tensor if symmetric else qd.choose_qparams.tensor
    eps = getattr(module, "eps", torch.finfo(torch.float32).eps)
    eps = float(eps) if isinstance(eps, torch.Tensor) else eps
    qparams = graph.call_function(choose, (source, module.quant_min, module.quant_max, eps, dtype))
    scale = graph.call_function(operator.getitem, (qparams, 0))
    zero_point = graph.call_function(operator.getitem, (qparams, 1))
    args = (scale, zero_point, module.quant_min, module.quant_max, dtype)
    qnode = graph.call_function(qd.quantize_per_tensor.tensor, (source, *args))
    return graph.call_function(
        qd.dequantize_per_tensor.tensor, (qnode, *args), _dequantize_kwargs(source)
    )


def _float16_pair(graph, source):
    to_half = graph.call_function(qd.convert_element_type.no_fuse, (source, torch.float16))
    return graph.call_function(qd.convert_element_type.no_fuse, (to_half, torch.float32))


def replace_observers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each observer call in ``gm`` (in place) and drop the observer modules."""
    graph = gm.graph
    modules = dict(gm.named_modules(remove_duplicate=False))
    cache: dict[int, object] = {}  # shared observers: one qparams computation each
    counters: dict[str, int] = {}

    def qparams_of(module):
        if id(module) not in cache:
            cache[id(module)] = observers.observer_qparams(module)
        return cache[id(module)]

    for node in list(graph.nodes):
        if node.op != "call_module" or not observers.is_observer(modules.get(node.target)):
            continue
        module = modules[node.target]
        source = node.args[0]
        how = observers.kind(module)
        with graph.inserting_before(node):
            if how == "static":
                replacement = _static_pair(gm, graph, source, module, qparams_of, counters)
            elif how == "dynamic":
                replacement = _dynamic_pair(graph, source, module)
            elif how == "float16":
                replacement = _float16_pair(graph, source)
            else:
                replacement = source
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    return gm
