"""pt2e converters that misbehave rather than compute wrongly: the suite must report each as a
failure of the property that ran it, and carry on."""

from __future__ import annotations

import time

import torch

import qref


def raises(model, use_reference_representation=False, fold_quantize=True):
    """Raises from inside the conversion."""
    raise RuntimeError("lowering pass exploded")


def hangs(model, use_reference_representation=False, fold_quantize=True):
    """Never returns (stopped by --timeout)."""
    while True:
        time.sleep(0.05)


def returns_wrong_type(model, use_reference_representation=False, fold_quantize=True):
    """Returns a plain nn.Module instead of a GraphModule."""
    return torch.nn.Identity()


def returns_nan(model, use_reference_representation=False, fold_quantize=True):
    """Returns a model whose output is NaN."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    output = next(n for n in converted.graph.nodes if n.op == "output")
    (result,) = output.args[0]
    with converted.graph.inserting_before(output):
        nan = converted.graph.call_function(torch.ops.aten.mul.Tensor, (result, float("nan")))
    output.args = ((nan,),)
    converted.recompile()
    return converted


def returns_unrunnable(model, use_reference_representation=False, fold_quantize=True):
    """Returns a graph that raises when called (a dangling shape mismatch)."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    output = next(n for n in converted.graph.nodes if n.op == "output")
    (result,) = output.args[0]
    with converted.graph.inserting_before(output):
        bad = converted.graph.call_function(torch.ops.aten.reshape.default, (result, [7, 11, 13]))
    output.args = ((bad,),)
    converted.recompile()
    return converted
