"""Weighted modules (Linear, Conv*, Embedding*, fused and QAT variants) -> reference quantized modules.

qref does every numeric step itself, so that torch's conversion code is under test, not reused:
QAT modules become float with qref's own BatchNorm folding (``qref.fold``), weight qparams come
from qref's reading of the weight observer (``qref.observers``), and the reference modules are
built through their constructors. Only the module classes are torch's (the tests compare the
reference model with torch's, class by class).
"""

from __future__ import annotations

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from torch import nn

from .. import fold, observers
from .patterns import Patterns, supports

_QUANTIZED_WEIGHT = (torch.quint8, torch.qint8, torch.float16, torch.quint4x2, torch.uint8,
                     torch.int8, torch.int16, torch.int32, torch.uint16)  # fmt: skip

# Constructor keywords a module's geometry is copied with, by family (checked in order, as a
# ConvTranspose is also a _ConvNd; QAT, reference and fused-inner modules share their family's).
_GEOMETRY = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvTransposeNd, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                        "output_padding", "groups", "dilation", "padding_mode")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                               "dilation", "groups", "padding_mode")),
    (nn.EmbeddingBag, ("num_embeddings", "embedding_dim", "max_norm", "norm_type", "scale_grad_by_freq",
                       "mode", "sparse", "include_last_offset", "padding_idx")),
    (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse")),
)  # fmt: skip

# QAT class -> (float root class, how its BatchNorm folds in, float fused class wrapping root + ReLU)
_QAT_TO_FLOAT = {
    nnqat.Linear: (nn.Linear, None, None),
    nnqat.Conv1d: (nn.Conv1d, None, None),
    nnqat.Conv2d: (nn.Conv2d, None, None),
    nnqat.Conv3d: (nn.Conv3d, None, None),
    nnqat.Embedding: (nn.Embedding, None, None),
    nnqat.EmbeddingBag: (nn.EmbeddingBag, None, None),
    nniqat.LinearReLU: (nn.Linear, None, nni.LinearReLU),
    nniqat.LinearBn1d: (nn.Linear, "linear", None),
    nniqat.ConvReLU1d: (nn.Conv1d, None, nni.ConvReLU1d),
    nniqat.ConvReLU2d: (nn.Conv2d, None, nni.ConvReLU2d),
    nniqat.ConvReLU3d: (nn.Conv3d, None, nni.ConvReLU3d),
    nniqat.ConvBn1d: (nn.Conv1d, "conv", None),
    nniqat.ConvBn2d: (nn.Conv2d, "conv", None),
    nniqat.ConvBn3d: (nn.Conv3d, "conv", None),
    nniqat.ConvBnReLU1d: (nn.Conv1d, "conv", nni.ConvReLU1d),
    nniqat.ConvBnReLU2d: (nn.Conv2d, "conv", nni.ConvReLU2d),
    nniqat.ConvBnReLU3d: (nn.Conv3d, "conv", nni.ConvReLU3d),
}


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def geometry(module: nn.Module) -> dict:
    """The constructor keywords (sizes, strides, ...) that rebuild ``module``'s shape, no weights."""
    for family, names in _GEOMETRY:
        if isinstance(module, family):
            return {name: getattr(module, name) for name in names}
    raise TypeError(f"qref has no constructor geometry for {type(module).__name__}")


def _parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach())


def _folded_weights(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The QAT module's float weight and bias, with its BatchNorm folded in (running statistics):
    ``w' = w * s``, ``b' = (b - mean) * s + beta`` per output channel, ``s = gamma / sqrt(var + eps)``,
    in the float32 operation order of torch's helpers (see ``qref.fold``), so bit-equal to them."""
    _, bn_kind, _ = _QAT_TO_FLOAT[type(module)]
    bias = getattr(module, "bias", None)  # embeddings have none
    weight, bias = module.weight.detach(), None if bias is None else bias.detach()
    if bn_kind is None:
        return weight, bias
    bn = module.bn
    gamma, beta = (None if t is None else t.detach() for t in (bn.weight, bn.bias))  # non-affine: None
    stats = (bn.running_mean, bn.running_var, bn.eps, gamma, beta)
    if bn_kind == "linear":
        return fold.fold_linear_bn_weights(weight, bias, *stats)
    return fold.fold_conv_bn_weights(weight, bias, *stats)


def float_from_qat(module) -> nn.Module:
    """The float module a QAT module stands for: same geometry, BN folded, ReLU kept as a fused pair.

    A folded BN always yields a bias (``b' = (b - mean) * s + beta``, ``b = 0`` if absent).
    """
    root_cls, bn_kind, fused_cls = _QAT_TO_FLOAT[type(module)]
    weight, bias = _folded_weights(module)
    kwargs = geometry(module)
    if root_cls not in (nn.Embedding, nn.EmbeddingBag):
        kwargs["bias"] = bias is not None
    root = root_cls(**kwargs)
    root.weight = _parameter(weight)
    if bias is not None:
        root.bias = _parameter(bias)
    result = root if fused_cls is None else fused_cls(root, nn.ReLU())
    return result.train(module.training)


def weight_qparams(obs) -> dict:
    """The ``weight_qparams`` dict of a reference module, with qparams read by qref.

    A float16 weight (``float16_dynamic_qconfig``: a PlaceholderObserver) has no qparams: it is
    cast, so the dict names its dtype only (the reference module's own spelling of a cast)."""
    if obs.dtype == torch.float16:
        return {"qscheme": None, "dtype": torch.float16}
    q = observers.observer_qparams(obs)
    if q.axis is None:
        qscheme = torch.per_tensor_affine
    elif obs.qscheme == torch.per_channel_affine_float_qparams:  # embeddings: float zero points
        qscheme = torch.per_channel_affine_float_qparams
    else:  # symmetric or affine: the reference module only needs scale and zero point
        qscheme = torch.per_channel_affine
    qparams = {
        "qscheme": qscheme,
        "dtype": obs.dtype,
        "scale": q.scale,
        "zero_point": q.zero_point,
        "quant_min": q.quant_min,
        "quant_max": q.quant_max,
        "is_decomposed": False,
    }
    if q.axis is not None:
        qparams["axis"] = q.axis
    return qparams


def reference_module(reference_cls, float_module: nn.Module, qparams: dict) -> nn.Module:
    """``reference_cls`` with ``float_module``'s geometry and (shared, detached) weight and bias."""
    kwargs = geometry(float_module)
    weight = float_module.weight
    if isinstance(float_module, nn.Embedding | nn.EmbeddingBag):
        kwargs["_weight"] = weight.detach()  # given at construction: no pointless random init
    elif isinstance(float_module, nn.Linear):
        kwargs["bias_"] = float_module.bias is not None  # the reference Linear's spelling
    else:
        kwargs["bias"] = float_module.bias is not None
    reference = reference_cls(**kwargs, device=weight.device, dtype=weight.dtype, weight_qparams=qparams)
    reference.weight = _parameter(weight)
    if getattr(float_module, "bias", None) is not None:
        reference.bias = _parameter(float_module.bias)
    return reference


def to_reference(model, node, patterns: Patterns, skip: bool) -> None:
    """Swap ``node``'s module for its reference quantized module (QAT modules become float first).

    ``skip`` (a ``None`` qconfig at convert time, or a node prepare did not observe), a
    dtype the backend does not support, or a float weight leave it float.
    """
    module = model.get_submodule(node.target)
    prepared_qconfig = getattr(module, "qconfig", None)
    weight_obs = None
    if isinstance(module, patterns.qat_classes):
        if type(module) not in _QAT_TO_FLOAT:
            raise NotImplementedError(
                f"qref.convert_fx does not know the QAT module {type(module).__name__}; "
                "use torch's convert_fx for this model"
            )
        # its weight fake-quant ran in training: it holds the weight statistics
        weight_obs = module.weight_fake_quant
        module = float_from_qat(module)
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
    reference = reference_module(reference_cls, float_module, weight_qparams(weight_obs))
    if fused is not None:
        fused[0] = reference
    else:
        set_module(model, node.target, reference)
