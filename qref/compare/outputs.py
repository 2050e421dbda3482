"""A lowered program that is no fx graph (a compiled model, a delegate) against the reference:
only its outputs can be seen, each in LSB of the reference's output scale."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import fx

from .comparison import Comparison
from .depth import _depths
from .judge import _compare_outputs, _judge_output
from .record import _run
from .tolerance import EXACT, Tolerance


def _opaque(run: Callable, inputs: int) -> fx.GraphModule:
    """``run`` as a one-call graph, so the recorder reads its outputs like a graph's."""
    graph = fx.Graph()
    args = [graph.placeholder(f"x{i}") for i in range(inputs)]
    graph.output(graph.call_function(run, tuple(args)))
    return fx.GraphModule(torch.nn.Module(), graph)


def compare_outputs(reference: fx.GraphModule, run: Callable, batches: Sequence,
                    tolerance: Tolerance = EXACT, float_relative: float = 0.0) -> Comparison:
    """``run(*batch)`` against ``reference`` on every batch, output by output: an output ``d``
    requantizations from the inputs may be ``tolerance.allowed(d)`` steps off; a float output
    (no dequantize at the end) may differ by ``float_relative`` times its largest magnitude
    (a compiler's float reassociation), else bit for bit."""
    ref = _run(reference, batches, lowered_ops=True)
    got = _run(_opaque(run, len(batches[0])), batches)
    _, output_depths = _depths(ref, None)
    outputs = _compare_outputs(ref, got, tolerance, output_depths)
    if float_relative and len(got.outputs) == len(ref.outputs):
        for out, other, depth in zip(ref.outputs, got.outputs, output_depths):
            if out.grid is None and not outputs[out.name].ok and outputs[out.name].max_abs is not None:
                top = max((float(e.abs().max()) for e in out.floats if e.numel()), default=0.0)
                outputs[out.name] = _judge_output(out, other.floats, depth, tolerance, float_relative * top)
    return Comparison(tolerance=tolerance, points={}, outputs=outputs, missing=(), extra=(), order=())
