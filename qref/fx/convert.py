"""``convert_to_reference_fx`` and ``convert_fx``: a prepared, calibrated FX model -> quantized.

Reference conversion, in order: validate -> resolve the convert-time qconfig
mapping -> observe weights of functional ops -> for each node: observer ->
quantize/dequantize, weighted module -> reference quantized module, observed
custom module -> quantized custom module -> drop dead code. ``convert_fx``
then lowers the reference model onto the quantized kernels (lower.py).
The model passed in is left unchanged (torch converts it in place).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import fx
from torch.ao.quantization import DeQuantStub

from .. import observers
from ..nodes import is_dequantize_method
from . import qconfig as qc
from . import validate
from .lower import lower_to_native
from .patterns import backend_patterns
from .qdq import is_none_qconfig, replace_observer
from .weighted import set_module, to_reference

_PRESERVED = "_user_preserved_attributes"  # the meta key torch uses, so deepcopy keeps them


def convert_to_reference_fx(
    graph_module,
    convert_custom_config=None,
    _remove_qconfig=True,
    qconfig_mapping=None,
    backend_config=None,
) -> fx.GraphModule:
    """A reference quantized model: float ops between quantize/dequantize, reference modules."""
    return _convert(graph_module, "convert_to_reference_fx", False, convert_custom_config,
                    _remove_qconfig, qconfig_mapping, backend_config)  # fmt: skip


def convert_fx(
    graph_module,
    convert_custom_config=None,
    _remove_qconfig=True,
    qconfig_mapping=None,
    backend_config=None,
) -> fx.GraphModule:
    """The reference model lowered onto fbgemm/qnnpack/x86/onednn quantized modules and ops."""
    return _convert(graph_module, "convert_fx", True, convert_custom_config,
                    _remove_qconfig, qconfig_mapping, backend_config)  # fmt: skip


def _convert(model, api, lower, custom_config, remove_qconfig, mapping, backend_config):
    torch._C._log_api_usage_once(f"qref.{api}")
    validate.observed_attrs(model, api)
    custom_config = validate.custom_config(custom_config)
    mapping = validate.qconfig_mapping(mapping)
    patterns = backend_patterns(backend_config)
    preserved = {a: getattr(model, a) for a in custom_config.preserved_attributes if hasattr(model, a)}

    model = copy.deepcopy(model)
    attrs = model.meta["_observed_graph_module_attrs"]
    scopes = attrs.node_name_to_scope
    qconfigs = attrs.node_name_to_qconfig
    if mapping is not None:
        qc.check_mapping(attrs.qconfig_mapping, mapping)
        resolved = qc.resolve(model, mapping, scopes, patterns, attrs.is_qat, observers.is_observer)
        qc.check_nodes(qconfigs, resolved)
        qconfigs = resolved

    _observe_functional_weights(model)
    custom = _custom_classes(custom_config)
    quantized_custom_nodes = set()
    input_idxs = attrs.prepare_custom_config.input_quantized_indexes
    output_idxs = attrs.prepare_custom_config.output_quantized_indexes
    placeholders = 0
    for node in list(model.graph.nodes):
        if node.op == "placeholder":
            if placeholders in input_idxs:  # the caller passes a quantized tensor here
                _insert_dequantize_after(model.graph, node)
            placeholders += 1
        elif node.op == "output" and output_idxs:
            _keep_outputs_quantized(node, output_idxs)
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, DeQuantStub) or (
                observers.is_observer(module) and node.args[0] in quantized_custom_nodes
            ):
                # a quantized custom module already outputs a quantized tensor
                source = node.args[0]
                node.replace_all_uses_with(source)
                model.graph.erase_node(node)
                _insert_dequantize_after(model.graph, source)
            elif observers.is_observer(module):
                replace_observer(model, node, module, qconfigs, scopes)
            elif "_observed_graph_module_attrs" in getattr(module, "meta", {}):
                raise NotImplementedError(f"{api}: standalone modules are not supported by qref")
            elif patterns.is_weighted(module):
                skip = is_none_qconfig(node, qconfigs) or node.name not in attrs.observed_node_names
                to_reference(model, node, patterns, skip)
            elif type(module) in custom:
                _convert_custom(model, node, module, custom_config, quantized_custom_nodes)

    model.graph.eliminate_dead_code()
    model = fx.GraphModule(model, model.graph)
    if lower:
        model = lower_to_native(model, qconfigs)
    if remove_qconfig:
        _strip_qconfig(model)
    model.delete_all_unused_submodules()
    model.meta.pop("_observed_graph_module_attrs", None)
    model.meta[_PRESERVED] = dict(preserved)
    for name, value in preserved.items():
        setattr(model, name, value)
    return model


def _insert_dequantize_after(graph: fx.Graph, node: fx.Node) -> None:
    with graph.inserting_after(node):
        dq = graph.call_method("dequantize", (node,))
    for user in list(node.users):
        if user is not dq:
            user.replace_input_with(node, dq)


def _keep_outputs_quantized(output: fx.Node, idxs) -> None:
    """Drop the final dequantize of the outputs prepare was told to keep quantized."""
    result = output.args[0]
    picked = [result[i] for i in idxs] if isinstance(result, (list, tuple)) else [result]
    for value in picked:
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if is_dequantize_method(v):
                output.replace_input_with(v, v.args[0])


def _observe_functional_weights(model: fx.GraphModule) -> None:
    """Run observers on weights of functional ops (F.linear(x, self.w)) once more, as torch does."""
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        index = node.meta.get("target_dtype_info", {}).get("weight_index")
        weight = node.args[index] if index is not None and index < len(node.args) else node.kwargs.get("weight")
        if isinstance(weight, fx.Node):
            _evaluate_constant(model, weight)


def _evaluate_constant(model, node):
    """The value of ``node`` if it depends on attributes only (else None), computed by running it."""
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        return functools.reduce(getattr, node.target.split("."), model)
    args = []
    for arg in node.args:
        value = _evaluate_constant(model, arg) if isinstance(arg, fx.Node) else arg
        if isinstance(arg, fx.Node) and value is None:
            return None
        args.append(value)
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args)
    if node.op == "call_function":
        return node.target(*args, **node.kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **node.kwargs)
    return None


def _custom_classes(custom_config) -> set:
    return {cls for by_type in custom_config.observed_to_quantized_mapping.values() for cls in by_type}


def _convert_custom(model, node, module, custom_config, quantized_custom_nodes) -> None:
    """Observed custom module -> the user's quantized class (``from_observed``)."""
    qconfig = module.qconfig
    kind = qc.quant_type(qconfig)
    target_cls = custom_config.observed_to_quantized_mapping.get(kind, {}).get(type(module))
    if target_cls is None:
        raise ValueError(
            f"convert_custom_config maps no {kind.name.lower()} quantized class for observed "
            f"custom module {type(module).__name__} ({node.target}); add it with "
            "set_observed_to_quantized_mapping"
        )
    if kind.name == "STATIC":
        quantized_custom_nodes.add(node)
        source = node.args[0]
        if is_dequantize_method(source):
            node.replace_input_with(source, source.args[0])  # it takes the quantized tensor
            if not source.users:
                model.graph.erase_node(source)
        obs_nodes = [u for u in node.users if u.op == "call_module"
                     and observers.is_observer(model.get_submodule(u.target))]  # fmt: skip
        if not obs_nodes:
            raise ValueError(f"observed custom module {node.target} has no output observer")
        module.activation_post_process = model.get_submodule(obs_nodes[0].target)
    set_module(model, node.target, target_cls.from_observed(module))


def _strip_qconfig(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "qconfig"):
            del module.qconfig
        post = getattr(module, "activation_post_process", None)
        if post is not None and observers.is_observer(post):
            del module.activation_post_process
