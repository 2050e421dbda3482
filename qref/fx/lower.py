"""Reference quantized model -> the native quantized modules and ops (fbgemm, qnnpack, x86, onednn).

The engines share one set of quantized operators, so one lowering serves all.
Each pass rewrites one reference pattern; anything that matches no pattern
stays in reference form (float op between dequantize and quantize), which is
correct, only slower:

  dq -> reference module [-> relu] -> q  quantized module (Linear, Conv, fused +ReLU)
  dq, dq -> fused conv+add module -> q    quantized ConvAdd(ReLU)2d (onednn config)
  dynamic q -> dq -> reference Linear      dynamic quantized Linear (int8, or float16 weights)
  reference Embedding(Bag)                 weight-only quantized Embedding(Bag)
  dq, dq -> add/mul/matmul [-> relu] -> q  quantized::add(_relu)/mul(_relu)/matmul
  dq -> pool/relu/shape op/cat -> q        the same op on quantized tensors
  dq -> sigmoid/tanh/hardsigmoid -> q      fixed-qparams quantized op
  dq -> ConvTranspose/BN/ELU/... -> q      quantized module or quantized:: op with output qparams
A node whose qconfig is None is never lowered.
The quantized modules are the kernels under test, not the conversion: qref builds each through
its constructor, quantizes the weight itself (``quantized_weight``) and hands it over with
``set_weight_bias`` and the output ``scale``/``zero_point`` attributes; no ``from_reference``.
Not lowered (left in reference form): functional F.linear/F.conv* with weights as graph inputs.
"""

from __future__ import annotations

import operator

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.ao.nn.quantized.reference as nnqr
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization.quantization_mappings import get_quantized_operator

from .. import observers
from ..nodes import is_dequantize_method, is_torch_quantize_per_tensor
from .weighted import geometry, set_module

STATIC = {nnqr.Linear: nnq.Linear, nnqr.Conv1d: nnq.Conv1d, nnqr.Conv2d: nnq.Conv2d, nnqr.Conv3d: nnq.Conv3d}
# fused float module -> (the reference module it must hold, the quantized module)
STATIC_FUSED = {
    nni.LinearReLU: (nnqr.Linear, nniq.LinearReLU),
    nni.LinearLeakyReLU: (nnqr.Linear, nniq.LinearLeakyReLU),
    nni.LinearTanh: (nnqr.Linear, nniq.LinearTanh),
    nni.ConvReLU1d: (nnqr.Conv1d, nniq.ConvReLU1d),
    nni.ConvReLU2d: (nnqr.Conv2d, nniq.ConvReLU2d),
    nni.ConvReLU3d: (nnqr.Conv3d, nniq.ConvReLU3d),
}
TWO_INPUT_FUSED = {
    nni.ConvAdd2d: (nnqr.Conv2d, nniq.ConvAdd2d),
    nni.ConvAddReLU2d: (nnqr.Conv2d, nniq.ConvAddReLU2d),
}
DYNAMIC = {nnqr.Linear: nnqd.Linear}
DYNAMIC_FUSED = {nni.LinearReLU: (nnqr.Linear, nniqd.LinearReLU)}
WEIGHT_ONLY = {nnqr.Embedding: nnq.Embedding, nnqr.EmbeddingBag: nnq.EmbeddingBag}

BINARY = {operator.add: torch.ops.quantized.add, torch.add: torch.ops.quantized.add,
          operator.mul: torch.ops.quantized.mul, torch.mul: torch.ops.quantized.mul,
          torch.matmul: torch.ops.quantized.matmul}  # fmt: skip
BINARY_RELU = {operator.add: torch.ops.quantized.add_relu, torch.add: torch.ops.quantized.add_relu,
               operator.mul: torch.ops.quantized.mul_relu, torch.mul: torch.ops.quantized.mul_relu}  # fmt: skip
RELU_FUNCTIONS = (F.relu, torch.relu)

# Ops that run on quantized tensors as they are. (functions, method names, module classes)
FIXED_QPARAMS = (
    {F.hardsigmoid, F.sigmoid, torch.sigmoid, torch.tanh},
    {"hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_"},
    {nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softmax},
)
# Ops with a quantized counterpart that needs the output qparams.
NEEDS_QPARAMS = (
    {F.elu, F.hardswish, F.instance_norm, F.layer_norm, F.leaky_relu, F.dropout},
    set(),
    {nnqr.ConvTranspose1d, nnqr.ConvTranspose2d, nnqr.ConvTranspose3d, nn.ELU, nn.LeakyReLU,
     nn.Hardswish, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
     nn.Dropout, nn.PReLU, nn.BatchNorm2d, nn.BatchNorm3d, nni.BNReLU2d, nni.BNReLU3d},
)  # fmt: skip
# Ops whose output qparams equal their input's (pooling, relu, clamp, reshaping, cat).
PASSTHROUGH = (
    {torch.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.hardtanh,
     F.hardtanh_, F.interpolate, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.relu, F.relu6,
     torch.avg_pool1d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d, torch.clamp,
     torch.flatten, torch.mean, operator.floordiv, torch.channel_shuffle,
     torch.narrow, torch.transpose, torch.repeat_interleave, torch.squeeze, torch.stack,
     torch.unsqueeze, F.pixel_shuffle, F.pixel_unshuffle, torch.cat},
    {"clamp", "mean", "relu", "relu_", "contiguous", "detach", "detach_", "permute", "repeat",
     "repeat_interleave", "reshape", "resize_", "shape", "size", "squeeze", "squeeze_",
     "transpose", "unsqueeze", "unsqueeze_", "view"},
    {nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d,
     nn.AvgPool2d, nn.AvgPool3d, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
     nn.ReLU, nn.ReLU6, nn.ChannelShuffle, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle},
)  # fmt: skip


# --- building the quantized modules -----------------------------------------------


def quantized_weight(ref) -> torch.Tensor:
    """A reference module's float weight in its own weight qparams:
    ``q = clamp(round(w / scale) + zero_point, dtype min, dtype max)`` per tensor, or per channel
    along ``weight_axis`` (embeddings: the float-zero-point variant of the same affine map).

    Clamped to the dtype's range, not to the observer's quant_min/quant_max: the qparams were
    chosen for this weight's range, and the reference module's own forward (which the lowered
    model must equal) clamps the same way.
    """
    qscheme, dtype = ref.weight_qscheme, ref.weight_dtype
    if dtype == torch.float16:  # a cast, as the reference module's forward rounds it
        return ref.weight.detach().to(torch.float16)
    if qscheme == torch.per_tensor_affine:
        return torch.quantize_per_tensor(ref.weight, ref.weight_scale, ref.weight_zero_point, dtype)
    if qscheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams):
        return torch.quantize_per_channel(
            ref.weight, ref.weight_scale, ref.weight_zero_point, ref.weight_axis_int, dtype
        )
    raise ValueError(f"qref cannot lower a weight with qscheme {qscheme} and dtype {dtype}")


# Constructor keywords beyond the geometry: (module as matched, its reference part) -> kwargs.
_EXTRA_KWARGS = {
    nniq.LinearLeakyReLU: lambda module, ref: {"negative_slope": module[1].negative_slope},
    nnqd.Linear: lambda module, ref: {"dtype": ref.weight_dtype},
    nniqd.LinearReLU: lambda module, ref: {"dtype": ref.weight_dtype},
}


def build_weighted(cls, module, scale=None, zero_point=None):
    """A quantized Linear/Conv/ConvTranspose (plain, fused or dynamic) of class ``cls``.

    ``module`` is the reference module or the fused module holding it first; the result has
    its geometry, its weight quantized by ``quantized_weight``, its float bias, and (static
    only) the output ``scale``/``zero_point`` of the quantize node that followed it.
    """
    ref = module[0] if isinstance(module, nni._FusedModule) else module
    kwargs = _EXTRA_KWARGS.get(cls, lambda *_: {})(module, ref)
    if not isinstance(ref, nn.Linear):  # a Linear's bias comes with set_weight_bias only
        kwargs.update(geometry(ref), bias=ref.bias is not None, device=ref.weight.device, dtype=ref.weight.dtype)
    else:
        kwargs.update(in_features=ref.in_features, out_features=ref.out_features)
    quantized = cls(**kwargs)
    quantized.set_weight_bias(quantized_weight(ref), ref.bias)
    if scale is not None:
        quantized.scale, quantized.zero_point = float(scale), int(zero_point)
    return quantized


def build_weight_only(cls, ref):
    """A quantized Embedding(Bag): the reference's geometry and its weight in its qparams."""
    kwargs = geometry(ref)
    if cls is nnq.EmbeddingBag:
        del kwargs["padding_idx"]  # the quantized EmbeddingBag takes none
    return cls(**kwargs, _weight=quantized_weight(ref), dtype=ref.weight_dtype)


def _batch_norm(cls):
    """A quantized BatchNorm (or BN+ReLU) sharing the float BN's affine parameters and statistics
    (a non-affine BN keeps the new module's gamma 1 and beta 0: the kernel needs a weight)."""

    def build(module, scale, zero_point):
        bn = module[0] if isinstance(module, nni._FusedModule) else module
        # no device/dtype: every tensor of the new module is replaced by the float BN's own
        quantized = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        if bn.affine:
            quantized.weight, quantized.bias = bn.weight, bn.bias
        quantized.running_mean, quantized.running_var = bn.running_mean, bn.running_var
        quantized.scale, quantized.zero_point = scale, zero_point  # its buffers: tensors
        return quantized

    return build


def _instance_norm(cls):
    def build(m, scale, zero_point):
        return cls(m.num_features, m.weight, m.bias, float(scale), int(zero_point), eps=m.eps, affine=m.affine)

    return build


def _prelu(m, scale, zero_point):
    """Quantized PReLU: its slope quantized per tensor to quint8 (what the kernel takes) with the
    qparams qref reads from a fresh weight observer of the module's qconfig that observed the slope.

    The default mappings give PReLU a quint8 per-tensor weight observer; with another dtype the
    qparams do not fit quint8 (torch warns and goes on; qref does the same computation).
    """
    qconfig = getattr(m, "qconfig", None)
    if qconfig is None:
        raise ValueError("qref: a PReLU to lower needs its qconfig (for its weight observer)")
    slope = m.weight.float()
    observer = qconfig.weight()
    observer(slope)
    q = observers.observer_qparams(observer)
    quantized = nnq.PReLU(float(scale), int(zero_point), m.num_parameters)
    quantized.set_weight(torch.quantize_per_tensor(slope, float(q.scale), int(q.zero_point), torch.quint8))
    return quantized


def _conv_transpose(cls):
    return lambda module, scale, zero_point: build_weighted(cls, module, scale, zero_point)


# module class -> (module, output scale, output zero point) -> its quantized module
SPECIAL_MODULES = {
    nn.BatchNorm2d: _batch_norm(nnq.BatchNorm2d), nn.BatchNorm3d: _batch_norm(nnq.BatchNorm3d),
    nni.BNReLU2d: _batch_norm(nniq.BNReLU2d), nni.BNReLU3d: _batch_norm(nniq.BNReLU3d),
    nnqr.ConvTranspose1d: _conv_transpose(nnq.ConvTranspose1d),
    nnqr.ConvTranspose2d: _conv_transpose(nnq.ConvTranspose2d),
    nnqr.ConvTranspose3d: _conv_transpose(nnq.ConvTranspose3d),
    nn.ELU: lambda m, s, z: nnq.ELU(float(s), int(z), alpha=m.alpha),
    nn.LeakyReLU: lambda m, s, z: nnq.LeakyReLU(float(s), int(z), negative_slope=m.negative_slope, inplace=m.inplace),
    nn.Hardswish: lambda m, s, z: nnq.Hardswish(float(s), int(z)),
    nn.InstanceNorm1d: _instance_norm(nnq.InstanceNorm1d),
    nn.InstanceNorm2d: _instance_norm(nnq.InstanceNorm2d),
    nn.InstanceNorm3d: _instance_norm(nnq.InstanceNorm3d),
    nn.LayerNorm: lambda m, s, z: nnq.LayerNorm(m.normalized_shape, m.weight, m.bias, float(s), int(z),
                                                eps=m.eps, elementwise_affine=m.elementwise_affine),
    nn.Dropout: lambda m, s, z: nnq.Dropout(p=m.p, inplace=m.inplace),
    nn.Softmax: lambda m, s, z: nnq.Softmax(dim=m.dim, scale=float(s), zero_point=int(z)),
    nn.PReLU: _prelu,
}  # fmt: skip


# quantized:: ops that take fewer arguments than their float op.
DROP_KWARGS = {
    torch.ops.quantized.hardswish: ("inplace",), torch.ops.quantized.elu: ("inplace",),
    torch.ops.quantized.dropout: ("inplace",),
    torch.ops.quantized.instance_norm: ("running_mean", "running_var", "use_input_stats", "momentum"),
}  # fmt: skip


class _Graph:
    """The model, its modules and the per-node qconfigs, with the pattern predicates."""

    def __init__(self, model: fx.GraphModule, qconfigs: dict):
        self.model, self.graph, self.qconfigs = model, model.graph, qconfigs

    def module(self, node):
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.model.get_submodule(node.target)
        return None

    def in_table(self, node, table) -> bool:
        functions, methods, modules = table
        if not isinstance(node, fx.Node):
            return False
        if node.op == "call_function":
            return node.target in functions
        if node.op == "call_method":
            return node.target in methods
        return node.op == "call_module" and type(self.module(node)) in modules

    def skipped(self, node) -> bool:
        return self.qconfigs.get(node.name, True) is None

    def attr(self, node):
        return getattr(self.model, node.target)

    def erase(self, *nodes):
        for node in nodes:
            if isinstance(node, fx.Node):
                self.graph.erase_node(node)


def _is_relu(g: _Graph, node) -> bool:
    return (node.op == "call_function" and node.target in RELU_FUNCTIONS) or type(g.module(node)) is nn.ReLU


def _bypass_dequantize(node: fx.Node, args) -> int:
    """Feed ``node`` the quantized tensors behind the dequantize nodes among ``args``."""
    count = 0
    for arg in args:
        if is_dequantize_method(arg):
            node.replace_input_with(arg, arg.args[0])
            count += 1
    return count


def _quantized_class(module, table_plain, table_fused):
    if type(module) in table_fused:
        inner, cls = table_fused[type(module)]
        return cls if type(module[0]) is inner else None
    return table_plain.get(type(module))


def lower_weighted_modules(g: _Graph) -> None:
    """dq -> reference module -> q (and the two-input conv+add) -> one quantized module."""
    for q in list(g.graph.nodes):
        if not is_torch_quantize_per_tensor(q):
            continue
        ref, relu = q.args[0], None
        if isinstance(ref, fx.Node) and _is_relu(g, ref):
            relu, ref = ref, ref.args[0]
        module = g.module(ref)
        if module is None or g.skipped(ref):
            continue
        two_inputs = type(module) in TWO_INPUT_FUSED
        cls = _quantized_class(module, {} if two_inputs else STATIC, TWO_INPUT_FUSED if two_inputs else STATIC_FUSED)
        if cls is None or not ref.args or not all(is_dequantize_method(a) for a in ref.args):
            continue
        if len(ref.args) != (2 if two_inputs else 1):
            continue
        _, scale, zero_point, _ = q.args
        set_module(g.model, ref.target, build_weighted(cls, module, g.attr(scale), g.attr(zero_point)))
        _bypass_dequantize(ref, ref.args)
        # torch drops an unfused ReLU here, which is right only when the zero point is the
        # dtype's minimum (the quantize's clamp is the ReLU then): so does qref, point for point
        # like torch; otherwise ReLU on the quantized output is kept (torch is wrong there)
        keep = relu is not None and int(g.attr(zero_point)) != torch.iinfo(q.args[3]).min
        q.replace_all_uses_with(relu if keep else ref)
        g.erase(q, scale, zero_point)


def lower_dynamic_modules(g: _Graph) -> None:
    """dynamic quantize -> dq -> reference Linear -> dynamic quantized Linear on the float input."""
    for ref in g.graph.nodes:
        module = g.module(ref)
        cls = _quantized_class(module, DYNAMIC, DYNAMIC_FUSED) if module is not None else None
        if cls is None or not ref.args or not is_dequantize_method(ref.args[0]):
            continue
        dq = ref.args[0]
        dynamic_q = dq.args[0]
        if dynamic_q.op != "call_function" or dynamic_q.target is not torch.quantize_per_tensor_dynamic:
            continue
        if dynamic_q.args[1] not in (torch.quint8, torch.qint8, torch.float16):
            continue
        set_module(g.model, ref.target, build_weighted(cls, module))
        ref.replace_input_with(dq, dynamic_q.args[0])


def lower_weight_only_modules(g: _Graph) -> None:
    for node in g.graph.nodes:
        cls = WEIGHT_ONLY.get(type(g.module(node)))
        if cls is not None:
            set_module(g.model, node.target, build_weight_only(cls, g.module(node)))


def lower_binary_ops(g: _Graph) -> None:
    """dq, dq -> add/mul/matmul [-> relu] -> q  ->  quantized::add(_relu) etc. with output qparams."""
    for q in list(g.graph.nodes):
        if not is_torch_quantize_per_tensor(q):
            continue
        op, relu = q.args[0], None
        if _is_relu(g, op):
            relu, op = op, op.args[0]
        if not isinstance(op, fx.Node) or op.op != "call_function" or g.skipped(op):
            continue
        table = BINARY_RELU if relu is not None else BINARY
        if op.target not in table:
            continue
        operands = op.args[:2]
        if any(isinstance(a, fx.Node) and not is_dequantize_method(a) for a in operands):
            continue
        if not any(is_dequantize_method(a) for a in operands):
            continue
        n_quantized = _bypass_dequantize(op, operands)
        _, scale, zero_point, _ = q.args
        args = tuple(op.args) + ((scale, zero_point) if n_quantized == 2 else ())
        with g.graph.inserting_after(q):
            qop = g.graph.call_function(table[op.target], args)
        qop.meta = dict(op.meta)
        q.replace_all_uses_with(qop)
        g.erase(q, relu, op)


def skip_dequantize_for_shape_queries(g: _Graph) -> None:
    """``x.shape`` / ``x.size()`` read the quantized tensor directly."""
    for node in g.graph.nodes:
        is_query = (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
            node.op == "call_method" and node.target in ("shape", "size")
        )
        if is_query and is_dequantize_method(node.args[0]):
            node.args = (node.args[0].args[0],) + tuple(node.args[1:])


def lower_quantized_tensor_ops(g: _Graph) -> None:
    """dq -> op -> q where the op runs on quantized tensors: drop the dq and the q."""
    for q in list(g.graph.nodes):
        to_fp16 = q.op == "call_method" and q.target == "to" and q.args[1:] == (torch.float16,)
        if not (is_torch_quantize_per_tensor(q) or to_fp16):
            continue
        ref = q.args[0]
        if not isinstance(ref, fx.Node) or not (ref.args or ref.kwargs):
            continue
        if to_fp16 and (g.in_table(ref, FIXED_QPARAMS) or g.in_table(ref, NEEDS_QPARAMS)):
            continue
        if not any(g.in_table(ref, t) for t in (FIXED_QPARAMS, NEEDS_QPARAMS, PASSTHROUGH)):
            continue
        first = ref.args[0] if ref.args else next(iter(ref.kwargs.values()))
        inputs = list(first) if isinstance(first, (list, tuple)) else [first]
        if not all(is_dequantize_method(x) for x in inputs):
            continue
        qparams = q.args[1:]
        module = g.module(ref)
        if is_torch_quantize_per_tensor(q) and type(module) in SPECIAL_MODULES:
            quantized = SPECIAL_MODULES[type(module)](module, g.attr(qparams[0]), g.attr(qparams[1]))
            set_module(g.model, ref.target, quantized)
        for dq in inputs:
            ref.replace_input_with(dq, dq.args[0])
        q.replace_all_uses_with(ref)
        g.erase(q)
        if ref.op == "call_function" and ref.target in NEEDS_QPARAMS[0]:
            qop = get_quantized_operator(ref.target)
            kwargs = {k: v for k, v in ref.kwargs.items() if k not in DROP_KWARGS.get(qop, ())}
            kwargs.update(output_scale=qparams[0], output_zero_point=qparams[1])
            with g.graph.inserting_after(qparams[1]):
                new = g.graph.call_function(qop, tuple(ref.args), kwargs)
            new.meta = dict(ref.meta)
            ref.replace_all_uses_with(new)
            g.erase(ref)
        else:
            g.erase(*qparams)


def lower_to_native(model: fx.GraphModule, qconfigs: dict) -> fx.GraphModule:
    """Lower a reference quantized model in place and return it recompiled."""
    g = _Graph(model, qconfigs)
    lower_weighted_modules(g)
    lower_dynamic_modules(g)
    lower_weight_only_modules(g)
    lower_binary_ops(g)
    skip_dequantize_for_shape_queries(g)
    lower_quantized_tensor_ops(g)
    model.graph.eliminate_dead_code()
    model.recompile()
    model.graph.lint()
    return model
