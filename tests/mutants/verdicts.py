"""Broken converters whose bug only a property that compares what was promised, where it was
promised, catches (issue 11): each is ``qref.convert_fx`` or ``qref.convert_pt2e`` with one edit.

* ``inner_scale_hidden``: an inner lowered module's output scale a hair off, invisible in the
  integers and at the final output (the next layer reads it with the same wrong scale): only
  module points with their qparams see it.
* ``same_scale_error_on_every_engine``: every engine lowers with the same wrong output scales,
  so engines agree with each other: only comparing each engine with the reference sees it.
* ``representation_rounds_half_up``: the reference representation's quantizes round ties up: a
  systematic bias of 1 LSB at a quantize, only at ties, which the property left out before
  (inputs on which the two quantize forms round apart): only tie inputs, compared with qref's
  own representation, see it.
* ``float_output_dequantize_rescaled``: the dequantizes before a float graph output (an op the
  quantizer left float) a hair off: no quantize point changes, only the float-output verdict sees it.
* ``float_op_input_requantized``: a redundant q/dq pair on its own grid before such an op: no value
  changes, only the extra quantize point the reference lacks.
"""

from __future__ import annotations

import torch
from torch import fx

import qref
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call, schema_arguments

from ._graph import activation_quantizes, convert_and_edit, dequantizes_of, set_args

qd = torch.ops.quantized_decomposed


def _lowered_modules(converted):
    """(node, module) of lowered quantized modules with an output scale, in graph order."""
    for node in converted.graph.nodes:
        if node.op == "call_module":
            module = converted.get_submodule(node.target)
            if type(module).__module__.startswith("torch.ao.nn.") and isinstance(getattr(module, "scale", None), float):
                yield node, module


def _feeds_another_lowered_op(node) -> bool:
    """Its quantized output is read by another op, not only dequantized for the output."""
    return any(not (u.op == "call_method" and u.target == "dequantize") and u.target is not torch.dequantize
               and u.op != "output" for u in node.users)


def inner_scale_hidden(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                       backend_config=None):
    """Inner lowered modules (read by another lowered op) get output scale * (1 + 2**-20)."""
    # qparams recomputed with another float rounding: the integers almost never change
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, backend_config)
    for node, module in list(_lowered_modules(converted)):
        if _feeds_another_lowered_op(node):
            module.scale = module.scale * (1 + 2**-20)
    return converted


def same_scale_error_on_every_engine(model, convert_custom_config=None, _remove_qconfig=True,
                                     qconfig_mapping=None, backend_config=None):
    """Every lowered module's output scale * 1.01, the same on every engine."""
    # an output scale derived from the observer with an extra margin, whatever the backend
    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, backend_config)
    for _, module in list(_lowered_modules(converted)):
        module.scale = module.scale * 1.01
    return converted


def _round_half_up(x):
    """aten.round, but ties toward +inf (floor(x + 0.5)) instead of to even."""
    return torch.floor(x + 0.5)


def representation_rounds_half_up(model, use_reference_representation=False, fold_quantize=True):
    """The reference representation's quantizes round ties up (floor(x + 0.5)), not to even."""
    # a common integer idiom; qref's and torchao's aten.round rounds half to even: +1 LSB at the
    # ties it rounds differently, and only there
    converted = qref.convert_pt2e(model, use_reference_representation=use_reference_representation,
                                  fold_quantize=fold_quantize)
    if not use_reference_representation:
        return converted
    for node in converted.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.round.default:
            node.target = _round_half_up
    converted.recompile()
    return converted


def _feeds_a_float_output(dq, outputs: set) -> bool:
    """Some graph output that is no dequantize is computed from ``dq`` without passing a quantize."""
    todo, seen = [dq], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                if node in outputs:
                    return True
            elif not is_call(user, QUANTIZE):
                todo.append(user)
    return False


def _float_output_dequantizes(gm) -> list:
    """The activation dequantizes after which the graph computes a float output (the quantizer left
    the op producing it float, e.g. X86InductorQuantizer's last conv or linear)."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves = torch.utils._pytree.tree_flatten(output.args[0])[0]
    outputs = {leaf for leaf in leaves if isinstance(leaf, fx.Node) and not is_call(leaf, DEQUANTIZE)}
    return [dq for q in activation_quantizes(gm) for dq in dequantizes_of(q) if _feeds_a_float_output(dq, outputs)]


def float_output_dequantize_rescaled(model, use_reference_representation=False, fold_quantize=True):
    """The last dequantizes before a float graph output use scale * (1 + 2**-8)."""
    # a lowering that recomputes the scale of a dequantize no quantize follows (its own float32
    # division): no quantize point changes, only the float output computed from it

    def edit(gm):
        for dq in _float_output_dequantizes(gm):
            set_args(dq, scale=schema_arguments(dq)["scale"] * (1 + 2**-8))

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def float_op_input_requantized(model, use_reference_representation=False, fold_quantize=True):
    """The input of each op whose float output the graph returns is quantized again, on its own grid."""
    # a redundant quantize/dequantize pair (a pattern matcher that quantizes every input of a
    # "quantized" op once more): requantizing on the same grid changes no value, but the
    # candidate has a quantize point the reference does not

    def edit(gm):
        for dq in _float_output_dequantizes(gm):
            args = schema_arguments(dq)
            qparams = tuple(args[k] for k in ("scale", "zero_point", "quant_min", "quant_max", "dtype"))
            users = list(dq.users)
            with gm.graph.inserting_after(dq):
                q = gm.graph.call_function(qd.quantize_per_tensor.default, (dq, *qparams))
            with gm.graph.inserting_after(q):
                again = gm.graph.call_function(dq.target, (q, *qparams))
            for user in users:
                user.replace_input_with(dq, again)
            again.meta.update(dq.meta)
            q.meta.update(dq.meta)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)
