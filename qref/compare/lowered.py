"""compare_lowered(): an FX model lowered to quantized modules against its reference model.

Every reference module that runs on dequantized inputs and whose output is quantized is a point
keyed by its module path; each lowered module is isolated by default (fed the reference's
integers), so a kernel's own contract is what is measured. A lowered module is judged on its own
output qparams, other ones only where the reference graph allows them (``_other_grids``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx

from ..nodes import is_dequantize, is_quantize
from ..qparams import QParams
from .comparison import Comparison
from .depth import _depths
from .graphs import _forcing
from .grid import INT_OF_QDTYPE
from .judge import _compare_outputs, _judge_point
from .record import _Recorder, _run
from .tolerance import Tolerance

__all__ = ["compare_lowered", "ModuleInput"]


def compare_lowered(
    reference_fx: fx.GraphModule,
    lowered: fx.GraphModule,
    batches: Sequence,
    tolerance: Tolerance | None = None,
    *,
    isolate: bool = True,
) -> Comparison:
    """A lowered FX model (quantized modules) against its reference (``convert_to_reference_fx``).

    Points: every reference module that runs on dequantized inputs and whose output is
    quantized is a point keyed by its module path, compared with the ``int_repr`` of the
    lowered module at that path; quantize nodes left in the lowered graph (the input
    quantize, quantizes around float ops) are points by the usual key; then the final
    outputs. A reference module whose lowered counterpart does not produce a quantized
    tensor is listed as missing; reference quantizes fused into a lowered op (e.g. the one
    after ``add_relu``) are covered by the next point or the outputs; a quantize only the
    lowered graph has is extra (a failure). A lowered module is judged on its own output
    qparams: other ones only where the reference graph allows them (``_other_grids``).
    ``Comparison.module_inputs`` gives each module's quantized input range and qparams, from
    which a kernel deviation is judged (``qref.engines.known_deviation``).

    ``isolate`` (default): each lowered point passes the reference's integers on, so a module
    gets exactly the quantized input its reference module saw (as ``qref.compare.layers``
    does) and the kernel's own contract is what is measured; ``isolate=False`` runs the
    lowered model end to end (errors compound; use a depth budget).
    ``tolerance`` defaults to the kernel contract of the current quantized engine.
    """
    if tolerance is None:
        tolerance = Tolerance.kernel(torch.backends.quantized.engine)
    ref = _run(reference_fx, batches)
    module_key = _modules_before_points(reference_fx, ref)  # path -> reference key
    by_ref_key = {key: path for path, key in module_key.items()}
    force = None
    if isolate:
        force = _forcing(ref)
        force.update({path: ref.points[key] for path, key in module_key.items()})
    got = _run(lowered, batches, modules={path: path for path in module_key}, force=force)
    kept = {k for k in ref.points if by_ref_key.get(k, k) in got.points}
    depths, output_depths = _depths(ref, kept if isolate else None)
    inputs = _module_inputs(reference_fx, ref, module_key)
    inputs.update({p: i for p, i in _lowered_inputs(lowered, ref, module_key).items() if p not in inputs})
    results, missing, order = {}, [], []
    for key, point in ref.points.items():
        depth = depths[key]
        path = by_ref_key.get(key)
        if path is not None:
            order.append(path)
            if path in got.points:
                keeps = _other_grids(reference_fx, path, inputs[path])
                results[path] = _judge_point(path, point, got.points[path], depth, tolerance, kind="module",
                                             keeps=keeps)  # fmt: skip
            else:
                missing.append(path)
        elif key in got.points:
            order.append(key)
            results[key] = _judge_point(key, point, got.points[key], depth, tolerance)
    extra = tuple(k for k in got.points if k not in module_key and k not in ref.points)
    outputs = _compare_outputs(ref, got, tolerance, output_depths)
    return Comparison(tolerance=tolerance, points=results, outputs=outputs, missing=tuple(missing), extra=extra,
                      order=tuple(order), isolated=isolate, module_inputs=inputs)


@dataclass(frozen=True)
class ModuleInput:
    """One quantized input a reference module was fed (dequantized): its qparams and the
    smallest and largest integer over all batches (what a kernel's limits depend on)."""

    qparams: QParams | None
    low: int | None
    high: int | None
    shape: tuple | None = None  # the first batch's shape (the batches differ only in their batch size)

    @classmethod
    def of(cls, point) -> "ModuleInput":
        """The input a reference point (``None``: an unrecorded one) fed its module."""
        values = [v for v in point.values if v.numel()] if point is not None else []
        return cls(qparams=point.qparams if point is not None else None,
                   low=min((int(v.min()) for v in values), default=None),
                   high=max((int(v.max()) for v in values), default=None),
                   shape=tuple(values[0].shape) if values else None)


def _module_inputs(reference_fx: fx.GraphModule, ref: _Recorder, module_key: dict) -> dict:
    """Module path -> the ModuleInput of each dequantized input of that reference module."""
    nodes = {n.target: n for n in reference_fx.graph.nodes if n.op == "call_module" and n.target in module_key}
    found = {}
    for path, node in nodes.items():
        found[path] = []
        for dq in (a for a in node.all_input_nodes if is_dequantize(a)):
            source = dq.args[0] if dq.args and isinstance(dq.args[0], fx.Node) else None
            found[path].append(ModuleInput.of(ref.points.get(ref.key_of.get(source))))
        found[path] = tuple(found[path])
    return found


def _other_grids(reference_fx: fx.GraphModule, path: str, inputs: tuple) -> tuple:
    """The qparams besides its quantize's that the reference graph allows the lowered form of
    module ``path``: its input's, for an op that may keep it (_keeps_input_grid), and the fixed
    qparams of a sigmoid/tanh/hardsigmoid module (whose quantized kernel always outputs on them;
    the reference's quantize after it may be another, e.g. a cat's shared one)."""
    grids = [i.qparams for i in inputs if i.qparams is not None] if _keeps_input_grid(reference_fx, path) else []
    from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER

    observer = _FIXED_QPARAMS_OP_TO_OBSERVER.get(type(reference_fx.get_submodule(path)))
    if observer is not None:
        observer = observer()
        scale, zero_point = observer.calculate_qparams()
        dtype = INT_OF_QDTYPE[observer.dtype]
        info = torch.iinfo(dtype)
        grids.append(QParams(scale=float(scale), zero_point=int(zero_point), quant_min=info.min, quant_max=info.max,
                             dtype=dtype))
    return tuple(grids)


def _lowered_inputs(lowered: fx.GraphModule, ref: _Recorder, module_key: dict) -> dict:
    """Module path -> the ModuleInput of each input of a lowered module that is a point (a
    quantize, or another module point): what it was fed under isolation, for modules that are no
    point themselves (e.g. a Linear whose ReLU the reference applies before its quantize)."""
    found = {}
    for node in lowered.graph.nodes:
        if node.op != "call_module":
            continue
        fed = []
        for a in node.all_input_nodes:
            key = module_key.get(a.target) if a.op == "call_module" else (
                a.args[0].name if is_quantize(a) and isinstance(a.args[0], fx.Node) else None)
            point = ref.points.get(key)
            if point is not None:
                fed.append(ModuleInput.of(point))
        found[node.target] = tuple(fed)
    return found


def _keeps_input_grid(reference_fx: fx.GraphModule, path: str) -> bool:
    """Whether the lowered form of reference module ``path`` may keep its input's qparams: an op
    without weights (an activation or pooling, which quantized kernels run on the input's grid);
    a weighted module always requantizes to its own."""
    module = reference_fx.get_submodule(path)
    return not any(True for _ in module.parameters()) and not hasattr(module, "weight")


def _modules_before_points(reference_fx: fx.GraphModule, ref: _Recorder) -> dict:
    """Module path -> key of the quantize after it, for modules that run on dequantized inputs."""
    found = {}
    for node in reference_fx.graph.nodes:
        if node.op != "call_module" or not any(is_dequantize(a) for a in node.all_input_nodes):
            continue
        keys = [ref.key_of[u] for u in node.users if u in ref.key_of]
        if keys and node.target not in found:
            found[node.target] = keys[0]
    return found
