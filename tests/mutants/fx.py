"""Broken FX converters: ``qref.convert_fx`` with one realistic bug each (see MUTANTS).

Contract of each: ``fn(model, convert_custom_config=None, _remove_qconfig=True,
qconfig_mapping=None, backend_config=None)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import qref
from qref.fx.weighted import set_module


def output_scale_off(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                     backend_config=None):
    """Lowered quantized modules get a slightly wrong output scale (scale * (1 + 2**-10))."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    for module in converted.modules():
        if type(module).__module__.startswith("torch.ao.nn.") and isinstance(getattr(module, "scale", None), float):
            module.scale = module.scale * (1 + 2**-10)
    return converted


def none_qconfig_ignored(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                         backend_config=None):
    """None entries of the convert-time qconfig_mapping are ignored: those modules are quantized anyway."""
    return qref.convert_fx(model, convert_custom_config, _remove_qconfig, None, backend_config)


def qconfig_kept(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                 backend_config=None):
    """_remove_qconfig is ignored: converted modules keep the qconfig of the module they replace."""
    converted = qref.convert_fx(model, convert_custom_config, False, qconfig_mapping, backend_config)
    converted_modules = dict(converted.named_modules())
    for name, module in model.named_modules():
        qconfig = getattr(module, "qconfig", None)
        if name and qconfig is not None and name in converted_modules:
            converted_modules[name].qconfig = qconfig
    return converted


def preserved_attributes_dropped(model, convert_custom_config=None, _remove_qconfig=True,
                                 qconfig_mapping=None, backend_config=None):
    """convert_custom_config's preserved_attributes are dropped from the converted model."""
    config = copy.deepcopy(convert_custom_config)
    if isinstance(config, dict):
        config.pop("preserved_attributes", None)
    elif config is not None:
        config.preserved_attributes = []
    return qref.convert_fx(model, config, _remove_qconfig, qconfig_mapping, backend_config)


def backend_config_ignored(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                           backend_config=None):
    """backend_config is ignored: the native backend config is always used."""
    return qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, None)


def bn_eps_default(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                   backend_config=None):
    """The QAT conv-bn fold uses BatchNorm's default eps (1e-5) instead of the module's own eps."""
    model = copy.deepcopy(model)  # the bug is in the converter's fold, not in the caller's model
    for module in model.modules():
        bn = getattr(module, "bn", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.eps = 1e-5
    return qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, backend_config)


def _at_range_scale(activation, x):
    """``activation(x)`` quantized with a min/max observer's scale for its output range
    (range / 255) instead of the fixed one (range / 256) the quantized kernel uses."""
    fixed = activation(x)
    if not fixed.is_quantized:
        return fixed
    return torch.quantize_per_tensor(activation(x.dequantize()), fixed.q_scale() * 256 / 255,
                                     fixed.q_zero_point(), fixed.dtype)


def _sigmoid_for_range(x):
    return _at_range_scale(torch.sigmoid, x)


def _tanh_for_range(x):
    return _at_range_scale(torch.tanh, x)


class _ForRange(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x):
        return _at_range_scale(self.activation, x)


def fixed_qparams_requantized(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                              backend_config=None):
    """Lowered sigmoid/tanh outputs are requantized to a min/max scale (range/255), not kept fixed."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    # the nodes keep their names and places: only the numbers differ from qref's
    for node in converted.graph.nodes:
        if node.op == "call_module":
            module = converted.get_submodule(node.target)
            if isinstance(module, (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)):
                set_module(converted, node.target, _ForRange(module))
        elif node.op == "call_function" and node.target in (torch.sigmoid, torch.tanh):
            node.target = _sigmoid_for_range if node.target is torch.sigmoid else _tanh_for_range
    converted.recompile()
    return converted


def every_graph_input_gets_first_qparams(model, convert_custom_config=None, _remove_qconfig=True,
                                         qconfig_mapping=None, backend_config=None):
    """Every graph input is quantized with the first graph input's scale and zero point (one input assumed)."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    inputs = [n for n in converted.graph.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor
              and n.args[0].op == "placeholder"]
    for later in inputs[1:]:  # the graph is unchanged: only the values of its qparams attributes
        for first_qparam, qparam in zip(inputs[0].args[1:3], later.args[1:3]):
            setattr(converted, qparam.target, getattr(converted, first_qparam.target))
    return converted
