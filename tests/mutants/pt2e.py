"""Broken pt2e converters: ``qref.convert_pt2e`` with one realistic bug each (see MUTANTS).

Contract of each: ``fn(model, use_reference_representation=False, fold_quantize=True)``.
Numeric edits are made on the q/dq graph before weights are folded (``convert_and_edit``), so
both flags keep working; only the planted bug differs from qref.
"""

from __future__ import annotations

import copy
import itertools
from unittest import mock

import torch

import qref
import qref.pt2e.fold_qat_bn as _fold_qat_bn
from qref.observers import is_observer
from qref.pt2e.ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, is_call, schema_arguments

from ._graph import (
    activation_quantizes,
    attr,
    convert_and_edit,
    dequantizes_of,
    reference_quantize,
    set_args,
    weight_quantizes,
)

# --- numerics of activation quantize / dequantize ----------------------------------------------


def quantize_half_away(input, scale, zero_point, quant_min, quant_max, dtype):
    """quantize_per_tensor with round-half-away-from-zero (C's round) instead of half-to-even."""
    v = input * (1.0 / scale)
    rounded = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return torch.clamp(rounded + zero_point, quant_min, quant_max).to(dtype)


def quantize_wrapping(input, scale, zero_point, quant_min, quant_max, dtype):
    """quantize_per_tensor whose integer cast wraps modulo the range instead of clamping."""
    q = torch.round(input * (1.0 / scale)).to(torch.int64) + zero_point
    return ((q - quant_min) % (quant_max - quant_min + 1) + quant_min).to(dtype)


def quantize_truncated_tail(input, scale, zero_point, quant_min, quant_max, dtype):
    """quantize_per_tensor that truncates instead of rounding past the first 4096 elements
    (the second chunk of a parallel kernel takes a truncating conversion path)."""
    out = reference_quantize(input, scale, zero_point, quant_min, quant_max, dtype)
    if input.numel() > 4096:
        flat = out.reshape(-1).clone()
        tail = torch.trunc(input.reshape(-1)[4096:] * (1.0 / scale)) + zero_point
        flat[4096:] = torch.clamp(tail, quant_min, quant_max).to(dtype)
        out = flat.reshape(out.shape)
    return out


def _retarget_activation_quantizes(fn):
    def edit(gm):
        for q in activation_quantizes(gm):
            q.target = fn

    return edit


def round_half_away(model, use_reference_representation=False, fold_quantize=True):
    """Ties round away from zero (torch-xpu-ops std::round instead of rint; real-converter-bugs #16)."""
    edit = _retarget_activation_quantizes(quantize_half_away)
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def saturation_wraps(model, use_reference_representation=False, fold_quantize=True):
    """Out-of-range activations wrap instead of saturating (integer cast overflow, pytorch#111471)."""
    edit = _retarget_activation_quantizes(quantize_wrapping)
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def large_tensor_tail(model, use_reference_representation=False, fold_quantize=True):
    """Only tensors with more than 4096 elements go wrong: elements past the 4096th are truncated."""
    edit = _retarget_activation_quantizes(quantize_truncated_tail)
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def zero_point_off_by_one(model, use_reference_representation=False, fold_quantize=True):
    """The activation dequantize reads zero_point + 1 (q and dq compute the zero point differently)."""

    def edit(gm):
        for q in activation_quantizes(gm):
            for dq in dequantizes_of(q):
                set_args(dq, zero_point=schema_arguments(dq)["zero_point"] + 1)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def uint8_stored_signed(model, use_reference_representation=False, fold_quantize=True):
    """uint8 activations are stored as int8 with zero point - 128 (the same values, another dtype)."""
    # a converter that keeps every activation signed: a backend that picks its kernel by dtype
    # gets the wrong one; only a dtype check sees it

    def edit(gm):
        for q in activation_quantizes(gm):
            args = schema_arguments(q)
            if args["dtype"] == torch.uint8 and isinstance(args["zero_point"], int):
                for node in [q, *dequantizes_of(q)]:
                    set_args(node, zero_point=args["zero_point"] - 128, quant_min=-128, quant_max=127,
                             dtype=torch.int8)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def int16_as_int8(model, use_reference_representation=False, fold_quantize=True):
    """int16 activations are quantized with int8's range [-128, 127] (written for 8-bit only)."""

    def edit(gm):
        for q in activation_quantizes(gm):
            if schema_arguments(q)["dtype"] == torch.int16:
                for node in [q, *dequantizes_of(q)]:
                    set_args(node, quant_min=-128, quant_max=127)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def rank3_linear_input_float(model, use_reference_representation=False, fold_quantize=True):
    """A Linear on a 3-D/4-D input reads its float input (the q/dq matcher knows 2-D linears only)."""

    def edit(gm):
        for node in list(gm.graph.nodes):
            val = node.meta.get("val")
            if is_call(node, (torch.ops.aten.linear.default,)) and val is not None and val.dim() >= 3:
                dq = node.args[0]
                if is_call(dq, DEQUANTIZE) and is_call(dq.args[0], QUANTIZE):
                    node.replace_input_with(dq, dq.args[0].args[0])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def conv3d_input_float(model, use_reference_representation=False, fold_quantize=True):
    """A conv3d reads its float input (the q/dq matcher knows conv1d and conv2d only)."""

    def edit(gm):
        for node in list(gm.graph.nodes):
            if is_call(node, (torch.ops.aten.conv3d.default,)):
                dq = node.args[0]
                if is_call(dq, DEQUANTIZE) and is_call(dq.args[0], QUANTIZE):
                    node.replace_input_with(dq, dq.args[0].args[0])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


_CALLS = itertools.count()


def nondeterministic_scale(model, use_reference_representation=False, fold_quantize=True):
    """Every second call nudges one activation scale (qparams chosen by unstable ordering)."""
    odd_call = next(_CALLS) % 2 == 1

    def edit(gm):
        quantizes = activation_quantizes(gm)
        if odd_call and quantizes:
            q = quantizes[0]
            scale = schema_arguments(q)["scale"] * (1 + 2**-6)
            for node in [q, *dequantizes_of(q)]:
                set_args(node, scale=scale)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def keeps_state_between_calls(model, use_reference_representation=False, fold_quantize=True):
    """Each call scales the last quantized activation by a buffer it grows in place (a model that keeps state)."""

    def edit(gm):
        quantizes = activation_quantizes(gm)
        if not quantizes:
            return
        q = quantizes[-1]
        gm.register_buffer("_qref_mutant_gain", torch.tensor(1.0 - 2**-10))
        with gm.graph.inserting_before(q):
            gain = gm.graph.get_attr("_qref_mutant_gain")
            grown = gm.graph.call_function(torch.ops.aten.add_.Tensor, (gain, 2**-10))
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (q.args[0], grown))
        q.replace_input_with(q.args[0], scaled)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


_FIXED_QPARAMS_OPS = (torch.ops.aten.sigmoid.default, torch.ops.aten.tanh.default,
                      torch.ops.aten.hardsigmoid.default)


def fixed_qparams_recomputed(model, use_reference_representation=False, fold_quantize=True):
    """sigmoid/tanh outputs get a min/max scale for their range (range/255), not their fixed qparams."""

    def edit(gm):
        for q in activation_quantizes(gm):
            if is_call(q.args[0], _FIXED_QPARAMS_OPS):
                scale = schema_arguments(q)["scale"] * 256 / 255
                for node in [q, *dequantizes_of(q)]:
                    set_args(node, scale=scale)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


_TWO_INPUT_OPS = (torch.ops.aten.add.Tensor, torch.ops.aten.matmul.default)


def second_input_reads_first_qparams(model, use_reference_representation=False, fold_quantize=True):
    """A two-input op (add, matmul) dequantizes its second input with its first input's qparams."""

    def edit(gm):
        quantizes = set(activation_quantizes(gm))
        for node in gm.graph.nodes:
            inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if (is_call(node, _TWO_INPUT_OPS) and len(inputs) == 2
                    and all(is_call(a, DEQUANTIZE) and a.args[0] in quantizes for a in inputs)):
                first = schema_arguments(inputs[0])
                set_args(inputs[1], scale=first["scale"], zero_point=first["zero_point"])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


# --- weights and biases -------------------------------------------------------------------------


def _edit_weight_scales(change):
    """Apply ``change(scale_tensor, quantize_node)`` to each per-channel weight's scale buffer
    (shared by the weight's quantize and dequantize, so both see it)."""

    def edit(gm):
        for q in weight_quantizes(gm):
            scale = attr(gm, q.args[1])
            scale.copy_(change(scale, q))

    return edit


def per_channel_scales_reversed(model, use_reference_representation=False, fold_quantize=True):
    """Per-channel weight scales applied in reversed channel order (read along the wrong axis end)."""
    edit = _edit_weight_scales(lambda scale, q: scale.flip(0))
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def per_channel_collapsed(model, use_reference_representation=False, fold_quantize=True):
    """Per-channel weight scales collapsed to one per-tensor scale (the max over channels)."""
    edit = _edit_weight_scales(lambda scale, q: torch.full_like(scale, scale.max().item()))
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def _groups_of_weight(q) -> int:
    for dq in dequantizes_of(q):
        for conv in dq.users:
            if conv.op == "call_function" and "groups" in schema_arguments(conv):
                return schema_arguments(conv)["groups"]
    return 1


def _group_major(scale, q):
    groups = _groups_of_weight(q)
    per_group = scale.numel() // groups  # channel c = g * per_group + j  ->  read j * groups + g
    return scale.reshape(per_group, groups).t().reshape(-1) if groups > 1 else scale


def grouped_conv_scales_misindexed(model, use_reference_representation=False, fold_quantize=True):
    """Grouped convs (groups > 1) read their per-channel scales group-major (cf. pytorch#180995)."""
    edit = _edit_weight_scales(_group_major)
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def bias_scale_input_only(model, use_reference_representation=False, fold_quantize=True):
    """The int32 bias is quantized with the input scale only, not input_scale * weight_scale."""

    def edit(gm):
        for op in [n for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "_schema")]:
            args = schema_arguments(op)
            bias, x = args.get("bias"), args.get("input")
            if not all(isinstance(n, torch.fx.Node) and is_call(n, DEQUANTIZE) for n in (bias, x)):
                continue
            if bias.args[-2] != 2**31 - 1:  # an int32 bias (quant_max), not a float one
                continue
            input_scale = schema_arguments(x)["scale"]  # a literal: activations are per-tensor
            for node in (bias.args[0], bias):  # the bias quantize (not yet folded) and dequantize
                if isinstance(node.args[1], torch.fx.Node):
                    attr(gm, node.args[1]).fill_(input_scale)  # per-channel scale buffer
                else:
                    set_args(node, scale=input_scale)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


# --- QAT conv-bn folding ------------------------------------------------------------------------


def _with_fold(change, model, use_reference_representation, fold_quantize):
    """qref.convert_pt2e with the QAT fold's weight arithmetic replaced by ``change``."""
    real = _fold_qat_bn.fold_conv_bn_weights

    def broken(conv_w, conv_b, bn_rm, bn_rv, eps, bn_w, bn_b, **kw):
        return real(*change(conv_w, conv_b, bn_rm, bn_rv, eps, bn_w, bn_b), **kw)

    with mock.patch.object(_fold_qat_bn, "fold_conv_bn_weights", broken):
        return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def bn_running_mean_ignored(model, use_reference_representation=False, fold_quantize=True):
    """The QAT conv-bn fold ignores the BN running mean (folds as if it were zero)."""

    def change(w, b, rm, rv, eps, gamma, beta):
        return w, b, torch.zeros_like(rm), rv, eps, gamma, beta

    return _with_fold(change, model, use_reference_representation, fold_quantize)


def shared_weight_quantized_once(model, use_reference_representation=False, fold_quantize=True):
    """A weight used by two ops is quantized for its first user only; the second reads it float."""
    from ._graph import is_constant

    def edit(gm):
        for q in [n for n in gm.graph.nodes if is_call(n, QUANTIZE) and is_constant(n.args[0])
                  and n.args[-2] != 2**31 - 1]:  # constant weights, not int32 biases
            users = [user for dq in dequantizes_of(q) for user in dq.users]
            for later in users[1:]:
                for dq in dequantizes_of(q):
                    later.replace_input_with(dq, q.args[0])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def bn_beta_dropped(model, use_reference_representation=False, fold_quantize=True):
    """The QAT conv-bn fold leaves out the BN's beta (right only where beta is zero)."""

    def change(w, b, rm, rv, eps, gamma, beta):
        return w, b, rm, rv, eps, gamma, None if beta is None else torch.zeros_like(beta)

    return _with_fold(change, model, use_reference_representation, fold_quantize)


def conv_bias_added_twice(model, use_reference_representation=False, fold_quantize=True):
    """The QAT conv-bn fold adds the conv bias twice (pytorch#48514, fixed by PR #48661)."""

    def change(w, b, rm, rv, eps, gamma, beta):
        return w, (None if b is None else 2 * b), rm, rv, eps, gamma, beta

    return _with_fold(change, model, use_reference_representation, fold_quantize)


def folded_weights_written_back(model, use_reference_representation=False, fold_quantize=True):
    """The fold writes through to the prepared model's parameters (pytorch#104593, ao PR #2795)."""

    def set_in_place(gm, target, value, requires_grad):
        try:
            existing = _fold_qat_bn._get(gm, target)  # still shared with the prepared model
        except AttributeError:  # a new bias: nothing to write through
            return real_set(gm, target, value, requires_grad)
        with torch.no_grad():
            existing.copy_(value)

    real_set = _fold_qat_bn._set_param
    with mock.patch.object(_fold_qat_bn, "_set_param", set_in_place):
        return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def consumes_and_writes_back(model, use_reference_representation=False, fold_quantize=True):
    """Converts in place like torchao (a rewritten graph), and its fold writes through the prepared model's weights."""
    # a consumed model is no licence to write into tensors the user's float model may share
    converted = folded_weights_written_back(model, use_reference_representation, fold_quantize)
    model.graph = copy.deepcopy(converted.graph)
    return converted


# --- graph structure and contract ---------------------------------------------------------------


def dropped_qdq(model, use_reference_representation=False, fold_quantize=True):
    """The q/dq pair of one intermediate activation is missing (a pattern not matched, pytorch#99524)."""

    def edit(gm):
        inner = [q for q in activation_quantizes(gm) if q.args[0].op != "placeholder"]
        if inner:
            q = inner[0]
            for dq in dequantizes_of(q):
                dq.replace_all_uses_with(q.args[0])
                gm.graph.erase_node(dq)
            gm.graph.erase_node(q)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def observer_left(model, use_reference_representation=False, fold_quantize=True):
    """One activation observer stays in the converted graph instead of becoming a q/dq pair."""
    observer_of = {
        n.args[0].name: n.target for n in model.graph.nodes
        if n.op == "call_module" and is_observer(model.get_submodule(n.target))
    }

    def edit(gm):
        for q in activation_quantizes(gm):
            target = observer_of.get(q.args[0].name)
            if target is not None:
                gm.add_submodule(target, copy.deepcopy(model.get_submodule(target)))
                with gm.graph.inserting_before(q):
                    observed = gm.graph.call_module(target, (q.args[0],))
                for dq in dequantizes_of(q):
                    dq.replace_all_uses_with(observed)
                return

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def shared_dequantize(model, use_reference_representation=False, fold_quantize=True):
    """A dequantize stays shared by several quantized ops: a CSE pass undoes DuplicateDQ (PR #103759)."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    graph = converted.graph
    for q in list(graph.nodes):
        first = {}
        for dq in [u for u in q.users if is_call(u, DEQUANTIZE)]:
            key = (dq.target, dq.args[1:], tuple(dq.kwargs.items()))
            if key in first:
                dq.replace_all_uses_with(first[key])
                graph.erase_node(dq)
            else:
                first[key] = dq
    converted.recompile()
    return converted


def metadata_lost(model, use_reference_representation=False, fold_quantize=True):
    """q/dq nodes get no stack_trace / quantization_tag from the ops they quantize (step skipped)."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    for node in converted.graph.nodes:
        if is_call(node, QUANTIZE + DEQUANTIZE) or node.name.startswith(("quantize_", "dequantize_")):
            node.meta.pop("stack_trace", None)
            node.meta.pop("quantization_tag", None)
    return converted


def fold_quantize_ignored(model, use_reference_representation=False, fold_quantize=True):
    """fold_quantize is ignored: weights are always folded to integer constants."""
    return qref.convert_pt2e(model, use_reference_representation, fold_quantize=True)


def reference_representation_ignored(model, use_reference_representation=False, fold_quantize=True):
    """use_reference_representation is ignored: the q/dq form is always returned."""
    return qref.convert_pt2e(model, use_reference_representation=False, fold_quantize=fold_quantize)


# --- quantization ranges, weight axes, dynamic and mixed-dtype graphs -----------------------------


def quantize_dtype_range(input, scale, zero_point, quant_min, quant_max, dtype):
    """quantize_per_tensor clamping to the dtype's full range, whatever quant_min/quant_max say."""
    info = torch.iinfo(dtype)
    return reference_quantize(input, scale, zero_point, info.min, info.max, dtype)


def clamps_to_dtype_range(model, use_reference_representation=False, fold_quantize=True):
    """Activation quantizes clamp to the dtype's range, not the spec's quant_min/quant_max (a kernel reading only the dtype)."""
    edit = _retarget_activation_quantizes(quantize_dtype_range)
    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def weight_axis_assumed_zero(model, use_reference_representation=False, fold_quantize=True):
    """Per-channel weights off axis 0 are quantized per channel of axis 0 (scales recomputed there: the spec's axis ignored)."""

    def edit(gm):
        for q in weight_quantizes(gm):
            a = schema_arguments(q)
            if a["axis"] == 0:
                continue
            w = attr(gm, a["input"])
            bound = w.detach().abs().amax(dim=tuple(range(1, w.dim())))  # symmetric, per row of axis 0
            scale = torch.clamp(bound / ((a["quant_max"] - a["quant_min"]) / 2), min=2**-12)
            names = []
            for prefix, value in (("_axis0_scale_", scale), ("_axis0_zero_point_", torch.zeros_like(scale).long())):
                names.append(f"{prefix}{len([b for b in dict(gm.named_buffers()) if b.startswith(prefix)])}")
                gm.register_buffer(names[-1], value)
            with gm.graph.inserting_before(q):
                scale_node, zp_node = (gm.graph.get_attr(n) for n in names)
            for node in [q, *dequantizes_of(q)]:
                set_args(node, scales=scale_node, zero_points=zp_node, axis=0)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def one_activation_dtype(model, use_reference_representation=False, fold_quantize=True):
    """Every activation is quantized with the first quantize's dtype and range (one activation dtype assumed per graph)."""

    def edit(gm):
        quantizes = activation_quantizes(gm)
        if not quantizes:
            return
        first = schema_arguments(quantizes[0])
        for q in quantizes[1:]:
            for node in [q, *dequantizes_of(q)]:
                set_args(node, dtype=first["dtype"], quant_min=first["quant_min"], quant_max=first["quant_max"])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def _computed_once(choose_qparams):
    """``choose_qparams`` evaluated on the first call only; every later call gets that result."""
    first = []

    def choose_qparams_once(*args):
        if not first:
            first.append(choose_qparams(*args))
        return first[0]

    return choose_qparams_once


def dynamic_qparams_frozen(model, use_reference_representation=False, fold_quantize=True):
    """Dynamic activations keep the qparams chosen on the first call (choose_qparams folded as if constant)."""

    def edit(gm):
        for node in gm.graph.nodes:
            if is_call(node, CHOOSE_QPARAMS):
                node.target = _computed_once(node.target)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


# --- graphs beyond a chain ----------------------------------------------------------------------


def every_graph_input_gets_first_qparams(model, use_reference_representation=False, fold_quantize=True):
    """Every graph input is quantized with the first graph input's scale and zero point (one input assumed)."""

    def edit(gm):
        inputs = [q for q in activation_quantizes(gm) if q.args[0].op == "placeholder"]
        if inputs:
            first = schema_arguments(inputs[0])
            for q in inputs[1:]:
                for node in (q, *dequantizes_of(q)):
                    set_args(node, scale=first["scale"], zero_point=first["zero_point"])

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def later_outputs_left_float(model, use_reference_representation=False, fold_quantize=True):
    """Only the first graph output keeps its quantize/dequantize: later outputs return their float value."""

    def edit(gm):
        (output,) = [n for n in gm.graph.nodes if n.op == "output"]
        values = output.args[0]
        if not isinstance(values, (tuple, list)):
            return
        kept = [values[0]]
        for value in values[1:]:
            if is_call(value, DEQUANTIZE) and is_call(value.args[0], QUANTIZE):
                value = value.args[0].args[0]  # the float value the quantize read
            kept.append(value)
        output.args = (type(values)(kept),)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def embedding_zero_points_rounded(model, use_reference_representation=False, fold_quantize=True):
    """An embedding table's per-row float zero points are rounded to integers (read as an affine weight's)."""

    def edit(gm):
        for q in weight_quantizes(gm):
            if any(is_call(u, (torch.ops.aten.embedding.default,)) and u.args[0] is dq
                   for dq in dequantizes_of(q) for u in dq.users):
                zero_points = attr(gm, q.args[2])
                zero_points.copy_(zero_points.round())

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)
