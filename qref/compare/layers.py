"""Per-layer kernel errors: each weighted lowered module against its reference module, alone.

Each weighted module is checked on its own: forward hooks on the reference model catch the float
input and output of its reference module, the lowered module gets exactly that input quantized
with the reference's input qparams, and its output is compared with the reference output on the
lowered module's grid, in integer steps. So errors do not compound across layers and the kernel's
own contract (<= 1 LSB) is what is measured, also where :func:`~qref.compare.compare_lowered` has
no module point (a Linear with a ReLU before its quantize, degenerate-scale pins).

It measures and does not judge: the statistics of the contract tables (docs/kernel-contracts.md,
tests/test_fx_kernels.py), over every weighted module, where ``compare_lowered`` judges each
quantize point with a Tolerance for the properties.  Merging the two would give the judge
points that do not exist in the reference graph, or the measurement fewer modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..nodes import is_dequantize_method, is_torch_quantize_per_tensor

__all__ = ["LayerError", "layer_errors"]


@dataclass(frozen=True)
class LayerError:
    name: str
    kind: str  # the lowered module's class name
    max_lsb: int  # largest |lowered - reference| in output steps
    off_fraction: float  # fraction of output elements that differ at all
    elements: int
    input_max: int  # largest quantized input value fed to the module


def _input_qparams(reference: fx.GraphModule, target: str):
    """(scale, zero point, dtype) of the quantize feeding ``target`` in the reference graph."""
    for node in reference.graph.nodes:
        if node.op == "call_module" and node.target == target and node.args and is_dequantize_method(node.args[0]):
            q = node.args[0].args[0]
            if is_torch_quantize_per_tensor(q):
                _, scale, zero_point, dtype = q.args
                return getattr(reference, scale.target), getattr(reference, zero_point.target), dtype
    return None


def layer_errors(reference: fx.GraphModule, lowered: fx.GraphModule, inputs: list[tuple]) -> list[LayerError]:
    """Per lowered static module: max LSB and fraction of differing outputs over ``inputs``."""
    targets = {}
    for name, module in lowered.named_modules():
        if hasattr(module, "scale") and hasattr(module, "zero_point") and hasattr(module, "weight"):
            qparams = _input_qparams(reference, name)
            if qparams is not None:
                targets[name] = (module, qparams)
    seen = {name: [] for name in targets}
    hooks = [
        reference.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen[name].append((args[0].detach(), out.detach()))
        )
        for name in targets
    ]
    try:
        with torch.no_grad():
            for batch in inputs:
                reference(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    results = []
    for name, (module, (in_scale, in_zp, in_dtype)) in targets.items():
        worst, differing, total, input_max = 0, 0, 0, 0
        for x, ref_out in seen[name]:
            qx = torch.quantize_per_tensor(x, in_scale, in_zp, in_dtype)
            input_max = max(input_max, int(qx.int_repr().max()))
            with torch.no_grad():
                out = module(qx)
            want = torch.quantize_per_tensor(ref_out, module.scale, module.zero_point, out.dtype)
            diff = (out.int_repr().to(torch.int64) - want.int_repr().to(torch.int64)).abs()
            worst = max(worst, int(diff.max()))
            differing += int((diff > 0).sum())
            total += diff.numel()
        results.append(LayerError(name=name, kind=type(module).__name__, max_lsb=worst,
                                  off_fraction=differing / max(total, 1), elements=total, input_max=input_max))
    return results

