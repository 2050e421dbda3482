"""Eval-mode folding of a BatchNorm into the convolution that feeds it.

In eval mode a BatchNorm is a per-channel affine map

    bn(y)[c] = (y[c] - mean[c]) * gamma[c] / sqrt(var[c] + eps) + beta[c]

so ``bn(conv(x))`` is again a convolution whose output channel ``c`` has
weight ``w[c] * s[c]`` and bias ``(b[c] - mean[c]) * s[c] + beta[c]`` with
``s = gamma / sqrt(var + eps)``.

Numerics.  The float32 operations are done in exactly the order of
``torch.nn.utils.fusion.fuse_conv_bn_weights``, which is what torchao's pt2e
QAT convert calls, so results are bit-identical to it::

    r  = rsqrt(var + eps)                  # rsqrt, not 1 / sqrt
    w' = w * (gamma * r)                   # the scale is formed first
    b' = ((b - mean) * r) * gamma + beta   # left to right; NOT (b - mean) * (gamma * r)

Weight layout.  A convolution weight is ``[out, in / groups, *k]``: output
channel ``c`` is row ``c``.  A transposed convolution weight is
``[in, out / groups, *k]``: the rows of group ``g`` are
``in / groups * g ... in / groups * (g + 1)`` and output channel
``c = g * (out / groups) + j`` is column ``j`` of those rows.  Scaling "axis 1"
with a length-``out`` vector is therefore only right for ``groups == 1``
(pytorch#180995); here the scale is laid out per group.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_conv_bn", "fold_conv_bn_weights", "fold_linear_bn_weights"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _per_output_channel(
    scale: torch.Tensor, weight_shape: torch.Size, transpose: bool, groups: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Return ``(scale_view, weight_view_shape)`` such that
    ``weight.reshape(weight_view_shape) * scale_view`` multiplies every weight
    element by the scale of its output channel."""
    spatial = [1] * (len(weight_shape) - 2)
    if not transpose:
        # [out, in/groups, *k]: output channel is axis 0, whatever groups is.
        return scale.reshape([-1, 1] + spatial), tuple(weight_shape)
    # [in, out/groups, *k] viewed as [groups, in/groups, out/groups, *k].
    in_channels, out_per_group = weight_shape[0], weight_shape[1]
    view = (groups, in_channels // groups, out_per_group, *weight_shape[2:])
    return scale.reshape([groups, 1, out_per_group] + spatial), view


def fold_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm statistics into convolution weight and bias.

    ``conv_b``/``bn_w``/``bn_b`` may be ``None`` (no conv bias: 0; non-affine
    BN: gamma 1, beta 0).  ``transpose`` selects the ConvTranspose weight
    layout; ``groups`` matters only for it.  Returns new tensors ``(w, b)``
    in the dtypes of ``conv_w`` and ``conv_b`` (``conv_w``'s if no bias); the
    inputs are not modified.  Bit-identical to ``fuse_conv_bn_weights`` where
    that is correct (every non-transposed conv, and transposed with groups 1).
    """
    if conv_w.dim() < 3:
        raise ValueError(f"conv weight must have >= 3 dims, got shape {tuple(conv_w.shape)}")
    if groups < 1 or conv_w.shape[0] % groups:
        bad = "in" if transpose else "out"
        raise ValueError(
            f"groups={groups} does not divide the weight's {bad}-channel dim {conv_w.shape[0]}"
        )
    out_channels = conv_w.shape[1] * groups if transpose else conv_w.shape[0]
    for name, t in (("running_mean", bn_rm), ("running_var", bn_rv), ("bn weight", bn_w),
                    ("bn bias", bn_b), ("conv bias", conv_b)):
        if t is not None and t.shape != (out_channels,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({out_channels},) "
                "= the convolution's output channels"
            )

    w_dtype = conv_w.dtype
    b_dtype = conv_b.dtype if conv_b is not None else w_dtype
    if conv_b is None:
        conv_b = torch.zeros_like(bn_rm)
    if bn_w is None:
        bn_w = torch.ones_like(bn_rm)
    if bn_b is None:
        bn_b = torch.zeros_like(bn_rm)

    var_rsqrt = torch.rsqrt(bn_rv + bn_eps)
    scale = bn_w * var_rsqrt
    scale_view, weight_view = _per_output_channel(scale, conv_w.shape, transpose, groups)
    w = (conv_w.reshape(weight_view) * scale_view).reshape(conv_w.shape).to(w_dtype)
    b = ((conv_b - bn_rm) * var_rsqrt * bn_w + bn_b).to(b_dtype)
    return w, b


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a new convolution equal to ``bn(conv(x))`` for an eval-mode ``bn``.

    ``conv`` is a ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d`` (any groups);
    ``bn`` a ``BatchNorm{1,2,3}d`` of matching dimension (affine or not).  The
    result is a deep copy of ``conv`` with folded weight and bias (a bias is
    added if ``conv`` had none); ``conv`` and ``bn`` are not modified.
    """
    if isinstance(conv, _CONV_TRANSPOSE_TYPES):
        transpose = True
    elif isinstance(conv, _CONV_TYPES):
        transpose = False
    else:
        raise TypeError(
            f"fold_conv_bn: expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d, got {type(conv).__name__}"
        )
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_conv_bn: expected a BatchNorm module, got {type(bn).__name__}")
    dim = len(conv.kernel_size)
    for bn_dim, bn_type in _BN_BY_DIM.items():
        if isinstance(bn, bn_type) and bn_dim != dim:
            raise ValueError(
                f"fold_conv_bn: {type(bn).__name__} cannot follow a {dim}d convolution "
                f"({type(conv).__name__}); use BatchNorm{dim}d"
            )
    if bn.training:
        raise ValueError(
            "fold_conv_bn: the BatchNorm is in training mode, where it normalises with batch "
            "statistics and cannot be folded; call bn.eval() (or model.eval()) first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_conv_bn: the BatchNorm has no running statistics "
            "(track_running_stats=False), so eval mode uses batch statistics and cannot be folded"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fold_conv_bn: BatchNorm has {bn.num_features} features but the convolution has "
            f"{conv.out_channels} output channels"
        )

    w, b = fold_conv_bn_weights(
        conv.weight.detach(),
        None if conv.bias is None else conv.bias.detach(),
        bn.running_mean,
        bn.running_var,
        bn.eps,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
        transpose=transpose,
        groups=conv.groups,
    )
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
    bias_grad = conv.bias.requires_grad if conv.bias is not None else conv.weight.requires_grad
    folded.bias = nn.Parameter(b, requires_grad=bias_grad)
    return folded


def fold_linear_bn_weights(
    linear_w: torch.Tensor,
    linear_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm1d statistics into a Linear's weight ``[out, in]`` and bias.

    Output feature ``c`` is row ``c`` of the weight, so with ``s = gamma * rsqrt(var + eps)``::

        w' = w * s[:, None]
        b' = (b - mean) * s + beta     # the scale is formed first, unlike the conv bias

    That is the order of ``torch.nn.utils.fusion.fuse_linear_bn_weights`` (what FX QAT's
    ``LinearBn1d`` conversion computes), so results are bit-identical to it; note that it
    differs from the conv order above, ``((b - mean) * r) * gamma``, in the last bit.
    ``None`` means: no bias (0), non-affine BN (gamma 1, beta 0). Returns new tensors in the
    dtypes of ``linear_w`` and ``linear_b`` (``linear_w``'s if no bias).
    """
    if linear_w.dim() != 2:
        raise ValueError(f"linear weight must be 2-d [out, in], got shape {tuple(linear_w.shape)}")
    out_features = linear_w.shape[0]
    for name, t in (("running_mean", bn_rm), ("running_var", bn_rv), ("bn weight", bn_w),
                    ("bn bias", bn_b), ("linear bias", linear_b)):
        if t is not None and t.shape != (out_features,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({out_features},) "
                "= the linear's output features"
            )
    w_dtype = linear_w.dtype
    b_dtype = linear_b.dtype if linear_b is not None else w_dtype
    if linear_b is None:
        linear_b = torch.zeros_like(bn_rm)
    if bn_w is None:
        bn_w = torch.ones_like(bn_rm)
    if bn_b is None:
        bn_b = torch.zeros_like(bn_rm)
    scale = bn_w * torch.rsqrt(bn_rv + bn_eps)
    w = linear_w * scale.unsqueeze(-1).to(w_dtype)
    b = ((linear_b - bn_rm) * scale + bn_b).to(b_dtype)
    return w, b
