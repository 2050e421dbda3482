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
"""

from __future__ import annotations

import torch

import qref


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
