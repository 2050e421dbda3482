"""Broken FX converters: ``qref.convert_fx`` with one realistic bug each (see MUTANTS).

Contract of each: ``fn(model, convert_custom_config=None, _remove_qconfig=True,
qconfig_mapping=None, backend_config=None)``.
"""

from __future__ import annotations

import copy

from torch import nn

import qref


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
