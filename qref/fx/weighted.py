"""Weighted modules (Linear, Conv*, fused and QAT variants) -> reference quantized modules."""

from __future__ import annotations

import torch
from torch import nn

from .. import observers
from .patterns import Patterns, supports

_QUANTIZED_WEIGHT = (torch.quint8, torch.qint8, torch.float16, torch.quint4x2, torch.uint8,
                     torch.int8, torch.int16, torch.int32, torch.uint16)  # fmt: skip


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def weight_qparams(obs) -> dict:
    """The dict a reference module's ``from_float`` takes, with qparams read by qref."""
    q = observers.observer_qparams(obs)
    per_channel = q.axis is not None
    qparams = {
        "qscheme": torch.per_channel_affine if per_channel else torch.per_tensor_affine,
        "dtype": obs.dtype,
        "scale": q.scale,
        "zero_point": q.zero_point,
        "quant_min": q.quant_min,
        "quant_max": q.quant_max,
    }
    if per_channel:
        qparams["axis"] = q.axis
    return qparams


def to_reference(model, node, patterns: Patterns, skip: bool) -> None:
    """Swap ``node``'s module for its reference quantized module (QAT modules become float first).

    ``skip`` (a ``None`` qconfig at convert time, or a node prepare did not observe), a
    dtype the backend does not support, or a float weight leave it float.
    """
    module = model.get_submodule(node.target)
    prepared_qconfig = getattr(module, "qconfig", None)
    weight_obs = None
    if isinstance(module, patterns.qat_classes):
        # QAT: BN is folded by the module's own to_float(); its weight fake-quant ran in training.
        weight_obs = module.weight_fake_quant
        module = module.to_float()
        set_module(model, node.target, module)
    if prepared_qconfig is None or skip:
        return
    if not supports(prepared_qconfig, patterns.dtype_configs.get(type(module), [])):
        return
    if prepared_qconfig.weight().dtype not in _QUANTIZED_WEIGHT:
        return
    fused = module if type(module) in patterns.fused_classes else None
    float_module = module[0] if fused is not None else module
    if isinstance(float_module, (nn.RNNCellBase, nn.RNNBase)):
        raise NotImplementedError(
            f"qref.convert_fx does not convert recurrent modules ({type(float_module).__name__}); "
            "use torch's convert_fx for this model"
        )
    if weight_obs is None:
        weight_obs = prepared_qconfig.weight()
    # torch observes the weight once more at convert time (also for QAT, pytorch#73941);
    # a moving-average fake-quant moves a little, so qref must do the same to agree.
    weight_obs(float_module.weight)
    reference_cls = patterns.reference_of[type(float_module)]
    reference = reference_cls.from_float(float_module, {"is_decomposed": False, **weight_qparams(weight_obs)})
    if fused is not None:
        fused[0] = reference
    else:
        set_module(model, node.target, reference)
