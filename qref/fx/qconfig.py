"""The convert-time ``qconfig_mapping``: check it against prepare's, resolve it per node.

Rules (convert_fx's documentation): the keys must include prepare's, each with the
same qconfig or ``None``; extra keys may be added with ``None``. A node whose
resolved qconfig is ``None`` stays in float.
Resolution order, most specific first: (module, object type, call index) >
module name (walking up the parents, up to the root "") > first matching
module-name regex > object type > global.
Unlike torch 2.13, a module name "" entry applies (to the whole model), as the
convert_fx documentation says: ``set_module_name("", None)`` leaves the model float.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import torch
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.qconfig import qconfig_equals

from .patterns import Patterns


def _same_or_none(prepare_qconfig, convert_qconfig) -> bool:
    return convert_qconfig is None or qconfig_equals(prepare_qconfig, convert_qconfig)


def check_mapping(prepare: QConfigMapping, convert: QConfigMapping) -> None:
    """Raise ``ValueError`` naming the first key of prepare's mapping that convert contradicts."""
    if not qconfig_equals(prepare.global_qconfig, convert.global_qconfig):
        raise ValueError(
            "qconfig_mapping: the global qconfig must be the one given to prepare_fx "
            f"(prepare: {prepare.global_qconfig}, convert: {convert.global_qconfig}); "
            "to leave parts of the model in float, add keys set to None instead"
        )
    for kind in ("object_type", "module_name", "module_name_regex", "module_name_object_type_order"):
        ours, theirs = getattr(convert, f"{kind}_qconfigs"), getattr(prepare, f"{kind}_qconfigs")
        for key, qconfig in theirs.items():
            if key not in ours:
                raise ValueError(
                    f"qconfig_mapping is missing the {kind} key {key!r} given to prepare_fx; "
                    "repeat it with the same qconfig or with None"
                )
            if not _same_or_none(qconfig, ours[key]):
                raise ValueError(
                    f"qconfig_mapping changes the {kind} key {key!r}: prepare_fx used {qconfig}, "
                    f"convert got {ours[key]}; use the same qconfig or None"
                )


def _effective_object_types(mapping, model, patterns: Patterns, is_qat: bool) -> dict:
    """Object-type entries as prepare saw them: QAT classes and fused classes inherit theirs."""
    types = dict(mapping.object_type_qconfigs)
    if is_qat:
        for float_cls, qat_cls in patterns.float_to_qat.items():
            if float_cls in types:
                types[qat_cls] = types[float_cls]
    for mod in model.modules():
        if isinstance(mod, _FusedModule) and types:
            parts = [type(m) for m in mod._modules.values()]
            qconfigs = [types.get(p) for p in parts]
            if any(not qconfig_equals(q, qconfigs[0]) for q in qconfigs[1:]):
                raise ValueError(
                    f"qconfig_mapping gives the parts of fused module {type(mod).__name__} "
                    f"different object_type qconfigs ({[p.__name__ for p in parts]}); "
                    "give them all the same qconfig"
                )
            if qconfigs[0] is not None:
                types[type(mod)] = qconfigs[0]
    return types


def _by_name(mapping, object_types, obj_type, module_name: str, fallback):
    qconfig = object_types.get(obj_type, fallback)
    for pattern, q in mapping.module_name_regex_qconfigs.items():
        if re.match(pattern, module_name):
            qconfig = q
            break
    name = module_name
    while True:  # a module name entry applies to all of its submodules; "" is the root
        if name in mapping.module_name_qconfigs:
            return mapping.module_name_qconfigs[name]
        if not name:
            return qconfig
        name = name.rpartition(".")[0]


def resolve(model, mapping, scopes, patterns: Patterns, is_qat: bool, is_observer) -> dict:
    """Node name -> qconfig under ``mapping`` (observer nodes are left out)."""
    mapping = copy.deepcopy(mapping)
    types = _effective_object_types(mapping, model, patterns, is_qat)
    modules = dict(model.named_modules(remove_duplicate=False))
    order = mapping.module_name_object_type_order_qconfigs
    seen = defaultdict(int)  # (module path, object type) -> calls so far
    glob = mapping.global_qconfig
    result = {}

    def by_order(path, obj, qconfig):
        index = seen[(path, obj)]
        seen[(path, obj)] += 1
        return order.get((path, obj, index), qconfig)

    for node in model.graph.nodes:
        if node.op == "get_attr":
            parent = node.target.rpartition(".")[0]
            q = _by_name(mapping, types, type(modules[parent]), parent, glob)
        elif node.op == "call_function":
            path, scope_type = scopes[node.name]
            q = _by_name(mapping, types, scope_type, path, types.get(node.target, glob))
            q = by_order(path, node.target, q)
        elif node.op == "call_method":
            path, scope_type = scopes[node.name]
            q = _by_name(mapping, types, node.target, path, glob)
            q = _by_name(mapping, types, scope_type, path, q)
        elif node.op == "call_module":
            module = modules[node.target]
            if is_observer(module):
                continue
            q = _by_name(mapping, types, type(module), node.target, glob)
            path, scope_type = scopes[node.name]
            q = by_order(path.rpartition(".")[0], scope_type, q)
        else:
            q = None
        result[node.name] = q
    return result


def check_nodes(prepared: dict, converted: dict) -> None:
    """Every node keeps prepare's qconfig or gets ``None``."""
    for name, qconfig in prepared.items():
        if name not in converted:
            raise ValueError(f"qconfig_mapping: node {name!r} from prepare_fx is not in the model")
        if not _same_or_none(qconfig, converted[name]):
            raise ValueError(
                f"qconfig_mapping resolves node {name!r} to {converted[name]}, but prepare_fx "
                f"quantized it with {qconfig}; only None (skip) may differ"
            )


def quant_type(qconfig):
    """'static', 'dynamic' or 'weight_only', as ConvertCustomConfig keys its mappings."""
    from torch.ao.quantization.quant_type import QuantType

    act = qconfig.activation()
    if getattr(act, "is_dynamic", False):
        return QuantType.DYNAMIC
    if act.dtype in (torch.quint8, torch.qint8, torch.qint32, torch.uint8, torch.int8,
                     torch.uint16, torch.int16, torch.int32):  # fmt: skip
        return QuantType.STATIC
    return QuantType.WEIGHT_ONLY
