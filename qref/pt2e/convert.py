"""``convert_pt2e``: a prepared, calibrated pt2e model -> its quantized q/dq form.

The steps, in the order the specification gives them:
validate -> observers to q/dq -> fold QAT conv-bn -> duplicate dq -> port metadata
-> (fold quantized weights) -> (reference representation) -> metadata, train/eval off.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx

from ..observers import is_observer
from . import validate
from .annotations import rebind
from .duplicate_dq import duplicate_dequantize
from .fold_qat_bn import fold_qat_conv_bn
from .fold_quantize import fold_quantized_weights
from .metadata import port_metadata
from .qdq import replace_observers

log = logging.getLogger("qref")


def convert_pt2e(
    model: fx.GraphModule,
    use_reference_representation: bool = False,
    fold_quantize: bool = True,
) -> fx.GraphModule:
    """Convert a calibrated/trained pt2e model; the model passed in is left unchanged."""
    torch._C._log_api_usage_once("qref.convert_pt2e")
    log.info(
        "convert_pt2e(use_reference_representation=%r, fold_quantize=%r)",
        use_reference_representation,
        fold_quantize,
    )
    validate.check_flags(
        use_reference_representation=use_reference_representation, fold_quantize=fold_quantize
    )
    validate.check_model(model)
    original_meta = dict(model.meta)
    prepared, model = model, _graph_copy(model)

    model = replace_observers(model)
    model = fold_qat_conv_bn(model)
    model = duplicate_dequantize(model)
    model = port_metadata(model)
    if fold_quantize:
        model = fold_quantized_weights(model)
    if use_reference_representation:
        from .reference_representation import to_reference_representation

        model = to_reference_representation(model)

    _remove_unused(model)
    model = fx.GraphModule(model, model.graph, class_name=type(prepared).__name__)  # its code, once
    model.meta.update(original_meta)
    _unshare_tensors(model, prepared)
    return validate.disallow_train_eval(model)


class _Editing(fx.GraphModule):
    """The module the passes edit: only its graph and attributes change, so its Python code is
    generated once, for the result, not after every pass (that costs as much as a pass)."""

    def recompile(self):
        return None


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A module over a copy of the graph; tensors are shared until _unshare_tensors.

    Deep-copying the module would also copy every node's metadata (fake tensors
    included), which costs more than the whole conversion.  The copy's annotations name its
    own nodes where the prepared model's name the prepared model's (as torchao's in-place
    conversion reads them): an input annotated with a key of some other graph (a deep copy's
    stale annotation) stays unmatched, as it does in torchao.
    """
    copied = _Editing(gm, copy.deepcopy(gm.graph))
    originals = set(gm.graph.nodes)
    by_name = {n.name: n for n in copied.graph.nodes}  # a graph's copy keeps its node names
    rebind(copied.graph, lambda key: by_name.get(key.name) if key in originals else None)
    return copied


def _remove_unused(gm: fx.GraphModule) -> None:
    """Dead nodes, then the attributes and submodules (observers) nothing reads any more."""
    graph = gm.graph
    graph.eliminate_dead_code()
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.users:
            if hasattr(gm, node.target):  # top-level attributes only, like torchao
                delattr(gm, node.target)
            graph.erase_node(node)
    gm.delete_all_unused_submodules()
    # That walk sees a module shared under two names (an observer shared through a
    # SharedQuantizationSpec, e.g. around a cat) only once, so the second name survives it.
    called = {node.target for node in graph.find_nodes(op="call_module")}
    for name, child in list(gm._modules.items()):  # named_children() also skips aliases
        if name not in called and is_observer(child):
            delattr(gm, name)


def _unshare_tensors(converted: fx.GraphModule, prepared: fx.GraphModule) -> None:
    """Give the result its own copy of every tensor it still shares with the prepared model."""
    shared = {id(t) for t in prepared.state_dict(keep_vars=True).values()}
    for module in converted.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) in shared:
                    clone = tensor.detach().clone()
                    store[name] = torch.nn.Parameter(clone, tensor.requires_grad) if isinstance(
                        tensor, torch.nn.Parameter
                    ) else clone
