"""What a run covered: the (op, scheme, dtype, observer, weights, stage, quantizer) combinations
its properties compared, and what the suite can draw that a run never compared.

A combination is read from each *compared* example (``qref.tally`` calls :func:`of_example` with
the example's drawn arguments): a model case gives one combination per op of its model that the
reference conversion quantized (:func:`compared_ops`: an op the quantizer left float was not
compared at any quantize point, so it is not covered), a qparams case of the primitive
properties one for the q/dq primitive.  Imports no torch; the
universe of known values (:func:`known`) imports the strategies when asked.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, NamedTuple

__all__ = ["AXES", "Combination", "of_example", "known", "summary", "missing"]

WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose", "linear")
PRIMITIVE = "q/dq primitive"
NO_WEIGHTS = "-"


class Combination(NamedTuple):
    op: str  # a layer's op family (ModelSpec.ops), or "q/dq primitive"
    scheme: str  # activations: [dynamic] affine | symmetric [narrow] [reduce_range]
    dtype: str  # activation (or primitive) integer dtype; "int8+int16": int16 layers among int8 ones
    observer: str  # minmax | histogram | moving_average, "fake-quant (...)" in QAT
    weights: str  # per-channel | per-tensor [input-axis] [full-range | 7-bit] (weighted ops), "-" otherwise
    stage: str  # "pt2e PTQ", "fx QAT", ..., "primitive"
    quantizer: str  # pt2e x86 | qref; fx default | custom (with its engine)


AXES = Combination._fields


def of_example(arguments: dict, ops: frozenset | None = None, case=None) -> list[Combination]:
    """The combinations one compared example covers, from its drawn arguments; a model case's ops
    are ``ops`` where the property said which it compared (:func:`compared_ops`), else all of its
    model's.  ``case``: the model case the property compared, for one that drew it in its body
    (``st.data()``), where the arguments do not hold it."""
    out: list[Combination] = []
    values = list(arguments.values())
    values += [item for v in values if isinstance(v, tuple) for item in v]  # (tensor, qparams) draws
    if case is not None and not any(_is_model_case(v) for v in values):
        values.append(case)
    for value in values:
        if _is_model_case(value):
            out.extend(_of_model_case(value, ops))
        elif hasattr(value, "quant_min") and hasattr(value, "dtype") and hasattr(value, "axis"):
            out.append(_of_qparams(value))
        elif hasattr(value, "qparams") and hasattr(value.qparams, "dtype"):
            out.append(_of_qparams(value.qparams))
    return out


def _is_model_case(value) -> bool:
    return hasattr(value, "spec") and hasattr(getattr(value, "setup", None), "flow")


# QrefQuantizer's int8 weight ranges other than its default [-127, 127] (QuantSetup.weight_qrange)
WEIGHT_RANGES = {(-128, 127): "full-range", (-64, 63): "7-bit"}
DYNAMIC_OPS = ("linear", "attention")  # ops whose linears a dynamic setup quantizes at run time
X86_DYNAMIC_OPS = ("conv2d", "linear", "attention")  # X86InductorQuantizer's is_dynamic: its convs too


def _of_model_case(case, ops: frozenset | None = None) -> list[Combination]:
    setup = case.setup
    scheme = ("symmetric" if setup.symmetric else "affine") + (" narrow" if getattr(setup, "narrow_range", False)
                                                               else "") + (" reduce_range" if setup.reduce_range else "")
    observer = f"fake-quant ({setup.observer})" if setup.qat else setup.observer
    stage = f"{setup.flow} {'QAT' if setup.qat else 'PTQ'}"
    quantizer = setup.kind if setup.engine is None else f"{setup.kind} ({setup.engine})"
    weights = " ".join(part for part in (
        "per-channel" if setup.per_channel else "per-tensor",
        "input-axis" if getattr(setup, "weight_axis", "output") == "input" else "",
        WEIGHT_RANGES.get(getattr(setup, "weight_qrange", None), "")) if part)
    dtype = setup.act_dtype + ("+int16" if getattr(setup, "int16_layers", ()) else "")
    dynamic = getattr(setup, "dynamic", False)
    dynamic_ops = X86_DYNAMIC_OPS if setup.kind == "x86" else DYNAMIC_OPS
    return [Combination(op, ("dynamic " if dynamic and op in dynamic_ops else "") + scheme, dtype, observer,
                        weights if op in WEIGHTED_OPS else NO_WEIGHTS, stage, quantizer)
            for op in sorted(case.spec.ops if ops is None else ops)]


def _of_qparams(q) -> Combination:
    weights = "per-tensor" if q.axis is None else f"per-channel (axis {q.axis})"
    return Combination(PRIMITIVE, "-", str(q.dtype).replace("torch.", ""), "-", weights, "primitive", "-")


def known(flow: str | None = None) -> dict[str, tuple]:
    """Per axis, the values the suite's strategies can draw (the universe a run is measured on);
    with ``flow``, only that flow's stages."""
    from qref.strategies import models, setups

    ops = sorted({op for kind in models.layer_kinds() for op in kind.ops_drawn()
                  if flow != "fx" or op not in models.PT2E_ONLY_OPS})
    observers = list(setups.OBSERVERS) + [f"fake-quant ({o})" for o in setups.QAT_OBSERVERS]
    pt2e = flow in (None, "pt2e")  # what only pt2e's QrefQuantizer setups draw
    dtypes = tuple(setups.FLOW_ACT_DTYPES.get(flow, setups.ACT_DTYPES))
    return {
        "op": tuple(ops) + (PRIMITIVE,),
        "scheme": ("affine", "symmetric", "reduce_range") + (("narrow", "dynamic") if pt2e else ()),
        "dtype": dtypes + (tuple(f"{d}+int16" for d in dtypes if d != "int16") if pt2e else ()),
        "observer": tuple(observers),
        "weights": ("per-channel", "per-tensor") + (("input-axis", *WEIGHT_RANGES.values()) if pt2e else ()),
        "stage": tuple(s for s in ("pt2e PTQ", "pt2e QAT", "fx PTQ", "fx QAT") if flow in (None, s.split()[0]))
        + ("primitive",),
    }


def summary(counts: Counter) -> dict[str, dict[str, int]]:
    """Per axis, how many compared examples covered each value."""
    out: dict[str, Counter] = {axis: Counter() for axis in AXES}
    for combination, n in counts.items():
        for axis, value in zip(AXES, combination):
            out[axis][value] += n
    return {axis: dict(sorted(c.items())) for axis, c in out.items()}


def _covers(value: str) -> set:
    """What a combination's value covers: itself and, for the scheme and weights axes, each of
    its words ("symmetric narrow reduce_range" covers "narrow")."""
    return {value, *value.split(" ")}


def missing(covered: Iterable[Combination], universe: dict[str, tuple] | None = None) -> dict[str, list[str]]:
    """Per axis, the known values no compared example covered."""
    universe = known() if universe is None else universe
    seen: dict[str, set] = {axis: set() for axis in AXES}
    for combination in covered:
        for axis, value in zip(AXES, combination):
            seen[axis] |= _covers(value) if axis in ("scheme", "weights") else {value}
    return {axis: [v for v in values if v not in seen.get(axis, ())] for axis, values in universe.items()
            if any(v not in seen.get(axis, ()) for v in values)}


# --------------------------------------------------------------------------- a whole run


def of_run(outcomes: Iterable) -> Counter:
    """Combination -> compared examples, over every test of a run (``qref.report.TestOutcome``)."""
    total: Counter = Counter()
    for outcome in outcomes:
        for *combination, n in outcome.coverage or ():
            total[Combination(*combination)] += n
    return total


def to_json(counts: Counter, universe: dict[str, tuple] | None = None) -> dict:
    """The report's ``coverage``: every combination compared (with its examples), the examples per
    value of each axis, and the known values never compared."""
    return {
        "axes": list(AXES),
        "combinations": [[*c, n] for c, n in sorted(counts.items())],
        "by_axis": summary(counts),
        "never_compared": missing(counts, universe),
    }


_SHORT_DTYPE = {"uint8": "u8", "int8": "i8", "int16": "i16", "int32": "i32", "uint8+int16": "u8+i16",
                "int8+int16": "i8+i16"}


def matrix_lines(counts: Counter, universe: dict[str, tuple] | None = None) -> list[str]:
    """A compact matrix: one row per op compared at all, one column per stage, each cell the
    activation dtypes compared there (``.`` none); then the known values this run never compared
    (the ops without a row among them)."""
    universe = known() if universe is None else universe
    stages = [s for s in universe["stage"] if any(c.stage == s for c in counts)] or list(universe["stage"])
    ops = [op for op in universe["op"] if op != PRIMITIVE] + [PRIMITIVE]
    ops += sorted({c.op for c in counts} - set(ops))
    cells = {}
    for c in counts:
        cells.setdefault((c.op, c.stage), set()).add(_SHORT_DTYPE.get(c.dtype, c.dtype))
    width = max(len(op) for op in ops)
    widths = [max(len(s), 9) for s in stages]
    lines = ["coverage (activation dtypes compared per op and stage):",
             "  " + " " * width + "  " + "  ".join(s.ljust(w) for s, w in zip(stages, widths))]
    for op in ops:
        row = [",".join(sorted(cells.get((op, s), ()))) or "." for s in stages]
        if all(r == "." for r in row):
            continue  # listed under "never compared"
        lines.append("  " + op.ljust(width) + "  " + "  ".join(r.ljust(w) for r, w in zip(row, widths)))
    gaps = missing(counts, universe)
    if gaps:
        lines.append("  never compared: " + "; ".join(f"{axis} {', '.join(v)}" for axis, v in gaps.items()))
    return lines


def all_values(universe: dict[str, tuple] | None = None) -> set[str]:
    """Every value of every axis (what ``--coverage-at-least`` accepts)."""
    universe = known() if universe is None else universe
    return {v for values in universe.values() for v in values}


def not_covered(required: Iterable[str], counts: Counter) -> list[str]:
    """The required values (an op, dtype, observer, weights or stage value) no compared example had."""
    seen = {value for c in counts for axis, v in zip(AXES, c)
            for value in (_covers(v) if axis in ("scheme", "weights") else {v})}
    return [value for value in required if value not in seen]


# ----------------------------------------------------------------- ops the reference quantized

# The op families of ModelSpec.ops, by the names of the graph targets that compute them: an aten
# overload's name in a pt2e graph, a function's or module class's name in a lowered FX graph.
# A family with none of these targets (attention, shared, flatten, a graph input or output) is
# structure, not an op a quantizer leaves float: it keeps its place in the case's ops.
FAMILY_TARGETS = {
    "conv1d": ("conv1d", "Conv1d", "ConvReLU1d", "ConvBn1d", "ConvBnReLU1d"),
    "conv2d": ("conv2d", "Conv2d", "ConvReLU2d", "ConvBn2d", "ConvBnReLU2d", "ConvAdd2d", "ConvAddReLU2d"),
    "conv_transpose": ("conv_transpose1d", "conv_transpose2d", "ConvTranspose1d", "ConvTranspose2d"),
    "linear": ("linear", "Linear", "LinearReLU", "LinearBn1d"),
    "relu": ("relu", "relu_", "ReLU", "ConvReLU1d", "ConvReLU2d", "LinearReLU", "BNReLU2d", "add_relu"),
    "relu6": ("relu6", "hardtanh", "hardtanh_", "ReLU6", "Hardtanh"),
    "hardtanh": ("hardtanh", "hardtanh_", "Hardtanh"),
    "sigmoid": ("sigmoid", "Sigmoid"), "tanh": ("tanh", "Tanh"),
    "hardsigmoid": ("hardsigmoid", "Hardsigmoid"), "gelu": ("gelu", "GELU"), "silu": ("silu", "SiLU"),
    "bn": ("batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
           "BatchNorm1d", "BatchNorm2d", "BNReLU2d"),
    "cat": ("cat", "concat"), "embedding": ("embedding", "Embedding"),
    "layer_norm": ("layer_norm", "LayerNorm"), "matmul": ("matmul", "bmm"),
    "pool": ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
             "adaptive_avg_pool2d", "max_pool2d_with_indices", "MaxPool1d", "MaxPool2d", "AvgPool1d",
             "AvgPool2d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d"),
    "add": ("add", "add_", "add_relu", "iadd"), "softmax": ("softmax", "_softmax", "Softmax"),
}

_QUANTIZE = ("quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic")
_DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel", "dequantize")


def _target_name(graph_module, node) -> str | None:
    """An aten overload's op name (``aten.conv2d.default`` -> ``conv2d``), a function's or method's
    name, or a called module's class name."""
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", str(node.target))
    parts = str(node.target).split(".")
    if len(parts) >= 3 and parts[0] in ("aten", "quantized", "quantized_decomposed"):  # op.name.overload
        return parts[1]
    return name


def _quantized_module(graph_module, node) -> bool:
    return node.op == "call_module" and ".quantized" in type(graph_module.get_submodule(node.target)).__module__


def quantized_ops(graph_module) -> frozenset:
    """The op families (:data:`FAMILY_TARGETS`) the converted ``graph_module`` computes on quantized
    values: in a q/dq graph an op fed by a dequantize or feeding a quantize; in a lowered FX graph a
    quantized module or an op on a value that a quantize or quantized op produced and no dequantize
    took back to float.  Families with no node at all in the graph (a BatchNorm folded away) are
    not named: :func:`compared_ops` keeps them."""
    names = {n: _target_name(graph_module, n) for n in graph_module.graph.nodes}
    quantized_value: dict = {}
    out = set()
    for node in graph_module.graph.nodes:
        name = names[node] or ""
        inputs = node.all_input_nodes
        is_q = name in _QUANTIZE or _quantized_module(graph_module, node) or str(node.target).startswith("quantized.")
        quantized_value[node] = name not in _DEQUANTIZE and (is_q or any(quantized_value.get(a) for a in inputs))
        on_quantized = (any(names[a] in _DEQUANTIZE for a in inputs) or any(names[u] in _QUANTIZE for u in node.users)
                        or _quantized_module(graph_module, node) or any(quantized_value.get(a) for a in inputs))
        if on_quantized and name not in _QUANTIZE + _DEQUANTIZE:
            out.update(family for family, targets in FAMILY_TARGETS.items() if name in targets)
    return frozenset(out)


def graph_families(graph_module) -> frozenset:
    """The op families of :data:`FAMILY_TARGETS` that ``graph_module`` has a node of."""
    names = {_target_name(graph_module, n) for n in graph_module.graph.nodes}
    return frozenset(family for family, targets in FAMILY_TARGETS.items() if names & set(targets))


def compared_ops(case_ops, graph_module) -> frozenset:
    """The case's ops less those the converted ``graph_module`` computes in float only: what an
    example that compared that graph covered."""
    present, quantized = graph_families(graph_module), quantized_ops(graph_module)
    return frozenset(op for op in case_ops if op not in present or op in quantized)
