"""Reject inputs convert_fx cannot convert, saying what to do instead."""

from __future__ import annotations

import warnings

from torch import fx
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig

_ATTRS = "_observed_graph_module_attrs"


def observed_attrs(model, api: str):
    """The prepare-time record ``prepare_fx`` leaves in ``model.meta``."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"{api} expects the GraphModule returned by prepare_fx or prepare_qat_fx, got "
            f"{type(model).__name__}; run prepare_fx(model, qconfig_mapping, example_inputs) "
            "and calibrate it first"
        )
    if _ATTRS not in model.meta:
        raise ValueError(
            f"{api} got a GraphModule that prepare_fx/prepare_qat_fx did not produce (no "
            f"'{_ATTRS}' in model.meta; a symbolic_trace'd, exported or already converted model "
            "has none); prepare it with prepare_fx and calibrate it, then convert"
        )
    attrs = model.meta[_ATTRS]
    if any(q is not None for q in (attrs.equalization_node_name_to_qconfig or {}).values()):
        raise NotImplementedError(f"{api}: equalization (_equalization_config) is not supported by qref")
    return attrs


def custom_config(config) -> ConvertCustomConfig:
    if config is None:
        return ConvertCustomConfig()
    if isinstance(config, dict):
        warnings.warn("pass a ConvertCustomConfig rather than a dict", FutureWarning, stacklevel=3)
        return ConvertCustomConfig.from_dict(config)
    if not isinstance(config, ConvertCustomConfig):
        raise TypeError(f"convert_custom_config must be a ConvertCustomConfig, got {type(config).__name__}")
    return config


def qconfig_mapping(mapping) -> QConfigMapping | None:
    if mapping is None or isinstance(mapping, QConfigMapping):
        return mapping
    if isinstance(mapping, dict):
        warnings.warn("pass a QConfigMapping rather than a dict", FutureWarning, stacklevel=3)
        return QConfigMapping.from_dict(mapping) if mapping else None
    raise TypeError(f"qconfig_mapping must be a QConfigMapping, got {type(mapping).__name__}")
