"""Broken FX converters: ``qref.convert_fx`` with one realistic bug each (see MUTANTS).

Contract of each: ``fn(model, convert_custom_config=None, _remove_qconfig=True,
qconfig_mapping=None, backend_config=None)``.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.quantized.dynamic as nnqd
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


def _first_call_qparams(module):
    """``module``'s forward, quantizing its input with the qparams of the first input it saw."""
    dynamic_forward = module.forward
    frozen = {}

    def forward(x):
        if not frozen:
            first = torch.quantize_per_tensor_dynamic(x, torch.quint8, module._reduce_range_for_qref)
            frozen.update(scale=first.q_scale(), zero_point=first.q_zero_point())
        held = torch.quantize_per_tensor(x, frozen["scale"], frozen["zero_point"], torch.quint8)
        return dynamic_forward(held.dequantize())

    return forward


def dynamic_activation_qparams_frozen(model, convert_custom_config=None, _remove_qconfig=True,
                                      qconfig_mapping=None, backend_config=None):
    """Dynamic int8 Linear inputs are quantized with the qparams of the first call, not each call's own."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")
    for module in converted.modules():
        if isinstance(module, nnqd.Linear) and module._packed_params.dtype == torch.qint8:
            module._reduce_range_for_qref = reduce_range
            module.forward = _first_call_qparams(module)  # the class stays: only the numbers differ
    return converted


def weight_scales_collapsed(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                            backend_config=None):
    """Per-channel weights of lowered convs and linears are packed with one scale, the largest channel's."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    for module in converted.modules():
        weight = getattr(module, "weight", None)
        if not (callable(weight) and hasattr(module, "set_weight_bias")):
            continue
        w = weight()
        if w.is_quantized and w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = torch.full_like(w.q_per_channel_scales(), float(w.q_per_channel_scales().max()))
            packed = torch.quantize_per_channel(w.dequantize(), scales, w.q_per_channel_zero_points(),
                                                w.q_per_channel_axis(), w.dtype)
            module.set_weight_bias(packed, module.bias())
    return converted


def _truncated_to_float16(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float16 rounded toward zero (mantissa bits cut) instead of to nearest."""
    nearest = weight.to(torch.float16)
    away = nearest.float().abs() > weight.abs()
    return torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _linear_weights(model) -> dict:
    """Path -> float weight of each Linear of ``model`` (a fused Linear + ReLU under its own path)."""
    weights = {}
    for name, module in model.named_modules():
        linear = module[0] if isinstance(module, nni.LinearReLU) else module
        if isinstance(linear, nn.Linear):
            weights[name] = linear.weight.detach()
    return weights


def float16_weights_truncated(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                              backend_config=None):
    """float16 dynamic Linear weights are cast toward zero (mantissa truncated) instead of rounded to nearest."""
    float_weights = _linear_weights(model)
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    for name, module in converted.named_modules():
        if isinstance(module, nnqd.Linear) and module._packed_params.dtype == torch.float16 and name in float_weights:
            module.set_weight_bias(_truncated_to_float16(float_weights[name]), module.bias())
    return converted


def regex_none_entries_ignored(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                               backend_config=None):
    """module_name_regex None entries of convert_fx's qconfig_mapping are ignored (module names and types honoured)."""
    mapping = copy.deepcopy(qconfig_mapping)
    if mapping is not None:
        for pattern, qconfig in list(mapping.module_name_regex_qconfigs.items()):
            if qconfig is None:
                del mapping.module_name_regex_qconfigs[pattern]
    return qref.convert_fx(model, convert_custom_config, _remove_qconfig, mapping, backend_config)


def preserved_attributes_not_recorded(model, convert_custom_config=None, _remove_qconfig=True,
                                      qconfig_mapping=None, backend_config=None):
    """Preserved attributes are set on the converted model but not recorded in its meta: a deepcopy loses them."""
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    converted.meta.pop("_user_preserved_attributes", None)
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


def _input_qparams(converted, node) -> tuple | None:
    """(scale, zero_point) of the quantized tensor ``node`` reads first: a quantize's or a lowered module's."""
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node):
        return None
    if source.op == "call_function" and source.target is torch.quantize_per_tensor:
        scale, zero_point = (getattr(converted, a.target) for a in source.args[1:3])
        return float(scale), int(zero_point)
    if source.op == "call_module":
        module = converted.get_submodule(source.target)
        if isinstance(getattr(module, "scale", None), float):
            return module.scale, int(module.zero_point)
    return None


def weighted_output_keeps_input_qparams(model, convert_custom_config=None, _remove_qconfig=True,
                                        qconfig_mapping=None, backend_config=None):
    """Lowered convs and linears output on their input's scale and zero point instead of their own."""
    # qparams propagated through a weighted op as through an activation or a pool, which may keep
    # its input's grid: the reference graph allows that for ops without weights only
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping,
                                backend_config)
    changes = []
    for node in converted.graph.nodes:
        if node.op == "call_module":
            module = converted.get_submodule(node.target)
            qparams = _input_qparams(converted, node)
            if hasattr(module, "set_weight_bias") and isinstance(getattr(module, "scale", None), float) and qparams:
                changes.append((module, qparams))
    for module, (scale, zero_point) in changes:  # each its input's qparams as qref lowered them
        module.scale, module.zero_point = scale, zero_point
    return converted


def conv3d_not_lowered(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                       backend_config=None):
    """Conv3d and ConvReLU3d stay reference modules: the lowering table knows 1-D and 2-D convs only."""
    import torch.ao.nn.quantized.reference as nnqr
    from unittest import mock

    from qref.fx import lower

    static = {k: v for k, v in lower.STATIC.items() if k is not nnqr.Conv3d}
    fused = {k: v for k, v in lower.STATIC_FUSED.items() if k is not nni.ConvReLU3d}
    with mock.patch.object(lower, "STATIC", static), mock.patch.object(lower, "STATIC_FUSED", fused):
        return qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, backend_config)
