"""A converted model against qref's reference conversion, in integers, at every quantize node.

Float rtol/atol are the wrong unit for converter checks (design notes, section 2). Here both
graphs run on the same batches and the *integer* output of every quantize node is compared,
so a failure names the first node that diverges, in the reference's topological order, and
every difference is an exact count of quantization steps (LSB) of that node's scale.

Points, and how they are keyed so that two converters' graphs line up:

* activation point: a quantize op (``quantized_decomposed.quantize_per_tensor``/``.tensor``/
  ``quantize_per_channel``; ``torch.quantize_per_tensor``/``_per_channel`` in FX graphs, read
  through ``int_repr``) whose input depends on a graph input. Key: the name of the float node
  it quantizes, plus ``#k`` for the k-th further quantize of the same node. A converter that
  replaced the quantize op by its own callable is still seen: any call whose first argument
  is a float tensor and whose result is an integer tensor is a quantize.
* weight point: an integer constant that a dequantize turns into float, whether folded into a
  ``get_attr`` (``fold_quantize=True``) or still a quantize of a constant. Key: the
  dequantize's user and the argument it fills, ``"conv2d.weight"``, ``"linear.bias"``.
  Folded and unfolded weights so get the same key.
* node names are no part of a converter's contract: points the two graphs key differently
  (torchao's QAT fold calls a conv ``conv1d`` where qref keeps ``conv1d_1``) are paired in
  order when their names differ only in the numeric suffix and each such group has as many
  unpaired points on both sides; whatever stays unpaired is missing or extra.
* lowered point (``compare`` of lowered FX models): every module or op that takes quantized
  tensors and returns one, keyed by module path (or node name for an op), compared with its
  output qparams.
* outputs ``"output[i]"``: compared in LSB of the output scale when the reference output is a
  dequantize; NaN/inf in the candidate is a failure of its own. A float output is compared bit
  for bit, or under a relaxed tolerance within the allowed steps times the scale of each quantize
  feeding it through non-expanding float ops (``float_bound``).

Integers are not all a point promises: a point whose dtype or qparams differ from the
reference's fails even where every integer agrees (and the message says what differs, by how
much); a lowered op may carry other qparams only where the reference graph allows them
(``_other_grids``: the input's grid of an op without weights, a sigmoid's fixed qparams).

A point's *depth* is the number of requantizations between the graph inputs and it, itself
included (the input quantize and weights: 0); a depth budget allows more steps further in.
With ``isolate=True`` every candidate point passes the reference's integers on, so each
point only shows its own error (its depth counts back to the last point both graphs share).
``compare_lowered`` does that for FX models lowered to quantized modules, keyed by module path.
``layers.layer_errors`` checks each weighted lowered module on its own through forward hooks
(also where ``compare_lowered`` has no module point).

Exact by default. Each relaxation is a :class:`Tolerance` with a named cause, and the observed
maximum is reported whether or not the check passes.

The modules, one thing each: ``tolerance`` (Tolerance, EXACT), ``grid`` (the qparams and style
of a recorded quantize/dequantize call), ``record`` (running a graph and keeping its points),
``pairing`` (points keyed differently by fx's numbering), ``depth`` (requantization depths),
``judge`` (a point's result), ``float_bound`` (how far a float output may be off), ``results``
(PointResult, Worst), ``messages``, ``comparison`` (Comparison), ``graphs`` (:func:`compare`),
``lowered`` (:func:`compare_lowered`) and ``layers`` (per-layer kernel errors).
"""

from __future__ import annotations

from ..qparams import QParams
from .comparison import Comparison
from .graphs import compare
from .judge import qparams_difference
from .lowered import ModuleInput, compare_lowered
from .outputs import compare_outputs
from .record import output_quantization, quantize_points
from .results import PointResult, Worst
from .tolerance import EXACT, Tolerance

__all__ = [
    "Tolerance",
    "EXACT",
    "QParams",
    "Worst",
    "PointResult",
    "Comparison",
    "quantize_points",
    "output_quantization",
    "compare",
    "compare_lowered",
    "compare_outputs",
    "ModuleInput",
    "qparams_difference",
]
