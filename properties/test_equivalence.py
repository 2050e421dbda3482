"""Property family 2: the converter under test vs. qref's reference conversion of the same model.

pt2e: both results are quantize/dequantize graphs, compared in integers at every quantize node
(``qref.compare``): exact, and a failure names the first node that diverges.  With
``use_reference_representation=True`` the candidate's integer arithmetic replaces float
requantization: against qref's own representation it must agree exactly (same integer math on
the same qparams); against the q/dq graph each requantization may round differently (a
fixed-point multiplier and shift instead of a float32 multiply), so the budget is 1 LSB per
requantization on the path, tie inputs included under a named input-rounding allowance.

FX: the candidate is lowered onto quantized kernels.  Against qref's lowering under the same
engine it must agree exactly at every lowered module and op (its integers and its output
qparams), not only at the input quantize and the outputs (same packed weights and qparams give
the same kernel output; onednn pinned to one thread, see qref.engines.ONEDNN_THREADS); its
per-layer distance to the reference-decomposed model is the kernel family's business.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import event, example, reject
from hypothesis import strategies as st

import qref
from qref.compare import EXACT, Tolerance, compare
from qref.engines import engine_limit
from qref.pt2e.ops import DEQUANTIZE, is_call, schema_arguments
from qref.strategies import conv_bn_specs, fixed_qparams_specs
from qref.strategies.models import GRAPH_KINDS, OP_KINDS, SEQUENCE_KINDS

from ._support import prop, subject  # noqa: F401 (subject: fixture)

pytestmark = pytest.mark.qref_family("equivalence")

REFERENCE_REPRESENTATION = Tolerance(
    lsb=0, per_depth=1,
    cause="reference representation requantizes with an integer multiplier and shift instead of a "
          "float32 multiply: each requantization may round 1 LSB differently",
)

INPUT_ROUNDING = (
    "input-rounding allowance: the reference representation quantizes a graph input as round(x / scale) "
    "(torchao's form), the q/dq graph as round(x * float32(1 / scale)); at exact rounding ties of the input "
    "scale the two differ by 1 LSB, which the next conv multiplies by up to sum|w| * s_x / s_y output LSB "
    "(not a requantization error), so there both forms are fed the value the representation rounds the "
    "tie to, (q - zero_point) * scale, on which they agree"
)


def _graph_input_quantizes(reference) -> dict:
    """Placeholder name -> (scale, zero_point, quant_min, quant_max) of its per-tensor quantize."""
    found = {}
    for node in reference.graph.nodes:
        if node.op == "call_function" and node.target in _PER_TENSOR_QUANTIZE and node.args[0].op == "placeholder":
            found[node.args[0].name] = tuple(node.args[1:5])
    return found


def _inputs_rounded_alike(reference, inputs: tuple) -> tuple[list, int]:
    """``inputs`` with each graph-input element on which the two quantize forms round apart (a
    tie of the input scale) replaced by the representation's rounding of it, and how many
    elements were (INPUT_ROUNDING); every input is kept."""
    quantizes = _graph_input_quantizes(reference)
    placeholders = [n.name for n in reference.graph.nodes if n.op == "placeholder"]
    replaced, out = 0, []
    for args in inputs:
        args = list(args)
        for i, (name, x) in enumerate(zip(placeholders, args)):
            if name not in quantizes or not isinstance(x, torch.Tensor):
                continue
            scale, zero_point, quant_min, quant_max = quantizes[name]
            representation = torch.round(x / scale)
            apart = representation != torch.round(x * (1.0 / scale))
            if apart.any():
                q = torch.clamp(representation + zero_point, quant_min, quant_max)
                args[i] = torch.where(apart, (q - zero_point) * scale, x)
                replaced += int(apart.sum())
        out.append(tuple(args))
    return out, replaced


_PER_TENSOR_QUANTIZE = (torch.ops.quantized_decomposed.quantize_per_tensor.default,)


def _pt2e_matches_reference(subject, case, fold_quantize: bool, premise=None):
    """``premise``: (what the property needs the case to have, checked on the reference it
    converts anyway; its cause): a case without it is not compared and drawn again."""
    subject.drew(fold_quantize=fold_quantize)
    reference = subject.reference(case, fold_quantize=fold_quantize)
    if premise is not None and not premise[0](reference):
        subject.not_compared(premise[1])
        reject()
    candidate = subject.convert(case, fold_quantize=fold_quantize)
    result = compare(reference, candidate, case.inputs, subject.tolerance(EXACT))
    subject.record.lsb(result.max_lsb)
    if not result.ok:
        subject.fail(case, f"{subject.target} vs qref reference (fold_quantize={fold_quantize}):\n"
                           f"{result.message()}", comparison=result)


def _grouped_conv_case():
    """Explicit example: per-channel scales of a grouped conv (groups=2, 2 channels per group),
    where group-major and channel-major orders differ (cf. pytorch#180995)."""
    from qref.strategies.cases import Case
    from qref.strategies.models import Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    spec = ModelSpec(input_shape=(1, 4, 5, 5), layers=(Conv(4, 4, kernel_size=3, groups=2),), seed=1)
    setup = QuantSetup("pt2e", kind="qref", per_channel=True, act_dtype="int8", observer="minmax")
    x = torch.linspace(-1, 1, 100).reshape(1, 4, 5, 5)
    return Case(spec, setup, ((x,),), ((x,), (x * 10,)), ("linspace", "linspace x10"))


@prop("pt2e", "ops", fold_quantize=st.booleans())
@example(case=_grouped_conv_case(), fold_quantize=True)
def test_single_op_matches_reference(subject, case, fold_quantize):
    _pt2e_matches_reference(subject, case, fold_quantize)


# Every op kind of the ops tier, each with its own share of the budget: a converter wrong on one
# kind only (a conv3d left float) fails at every seed and on every CPU, not only where the draws of
# single_op reach that kind (they depend on observer arithmetic, which differs between CPUs).
@pytest.mark.parametrize("op", OP_KINDS)
@prop("pt2e", "ops", variants=len(OP_KINDS), data=st.data(), fold_quantize=st.booleans())
def test_each_op_matches_reference(subject, op, data, fold_quantize):
    _pt2e_matches_reference(subject, data.draw(subject.cases(kinds=(op,)), label="case"), fold_quantize)


_CHUNK = 4096  # parallel and vectorised kernels split work here; bugs hide in the remainder


def _large_batch(spec, extra: int):
    """The same network on a batch whose input has more than ``_CHUNK`` elements (the spec
    strategies keep tensors small), ``extra`` samples beyond the first that passes it."""
    per_sample = math.prod(spec.input_shape[1:])
    return dataclasses.replace(spec, input_shape=(_CHUNK // per_sample + 1 + extra, *spec.input_shape[1:]))


@prop("pt2e", "ops", qat=False, model=lambda specs: st.builds(_large_batch, specs, st.integers(0, 3)),
      fold_quantize=st.booleans())
def test_large_tensor_matches_reference(subject, case, fold_quantize):
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "ops", model=fixed_qparams_specs("pt2e"), fold_quantize=st.booleans())  # ops, always that activation
def test_fixed_qparams_op_matches_reference(subject, case, fold_quantize):
    """Always a sigmoid, tanh or hardsigmoid whose output qparams the quantizer fixes instead of
    observing (X86InductorQuantizer leaves these ops float: such cases are drawn again)."""
    _pt2e_matches_reference(subject, case, fold_quantize,
                            premise=(_has_fixed_qparams_output, "the quantizer left the op float"))


def _has_fixed_qparams_output(gm) -> bool:
    return any(is_call(n, _PER_TENSOR_QUANTIZE) and is_call(n.args[0], _FIXED_QPARAMS_OPS)
               for n in gm.graph.nodes)


_FIXED_QPARAMS_OPS = (torch.ops.aten.sigmoid.default, torch.ops.aten.tanh.default,
                      torch.ops.aten.hardsigmoid.default)


# An add or a matmul of two activations, whose inputs each bring their own qparams.
@prop("pt2e", "patterns", kinds=("add", "matmul"), fold_quantize=st.booleans())
def test_two_input_op_matches_reference(subject, case, fold_quantize):
    """Always an op with two quantized inputs whose qparams differ (cat is left out: its inputs
    share qparams; so do inputs that are one tensor, and X86 leaves matmul float)."""
    _pt2e_matches_reference(subject, case, fold_quantize,
                            premise=(_has_op_with_two_differently_quantized_inputs,
                                     "no op with two differently quantized inputs"))


_TWO_INPUT_OPS = (torch.ops.aten.add.Tensor, torch.ops.aten.matmul.default)


def _has_op_with_two_differently_quantized_inputs(gm) -> bool:
    for node in gm.graph.nodes:
        if is_call(node, _TWO_INPUT_OPS) and all(isinstance(a, torch.fx.Node) and is_call(a, DEQUANTIZE)
                                                  for a in node.args[:2]):
            qparams = [(schema_arguments(a)["scale"], schema_arguments(a)["zero_point"]) for a in node.args[:2]]
            if qparams[0] != qparams[1]:
                return True
    return False


@prop("pt2e", "patterns", fold_quantize=st.booleans())
def test_pattern_matches_reference(subject, case, fold_quantize):
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "patterns", kinds=SEQUENCE_KINDS, fold_quantize=st.booleans())
def test_sequence_pattern_matches_reference(subject, case, fold_quantize):
    """Transformer pieces on their own budget: Linear on 3-D/4-D inputs, LayerNorm, GELU/SiLU,
    softmax, attention blocks (a pattern draw would reach them in few examples)."""
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "patterns", kinds=("shared",), fold_quantize=st.booleans())
def test_shared_weights_match_reference(subject, case, fold_quantize):
    """A module called twice (one weight read by two ops, with BatchNorms between and after:
    real-converter-bugs #5, #6) on its own budget: every use of the weight is quantized alike."""
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "patterns", kinds=("two_inputs",), fold_quantize=st.booleans())
def test_two_input_graph_matches_reference(subject, case, fold_quantize):
    """Always a second graph input (maybe through its own conv / linear) joined to the first
    later by add, cat or matmul, the two inputs quantized with their own qparams."""
    _pt2e_matches_reference(subject, case, fold_quantize,
                            premise=(_graph_inputs_quantized_apart, "no two graph inputs quantized apart"))


def _graph_inputs_quantized_apart(gm) -> bool:
    return len(set(_graph_input_quantizes(gm).values())) >= 2


@prop("pt2e", "patterns", kinds=("two_outputs",), fold_quantize=st.booleans())
def test_two_output_graph_matches_reference(subject, case, fold_quantize):
    """Always two graph outputs (an intermediate value and the final one), each compared: the
    forward returns a tuple whose later outputs are quantized too."""
    _pt2e_matches_reference(subject, case, fold_quantize,
                            premise=(_later_output_quantized, "no quantized output after the first"))


def _later_output_quantized(gm) -> bool:
    (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    return isinstance(outputs, (tuple, list)) and any(is_call(o, DEQUANTIZE) for o in outputs[1:])


@prop("pt2e", "patterns", kinds=("embedding",), fold_quantize=st.booleans())
def test_embedding_matches_reference(subject, case, fold_quantize):
    """Always an embedding lookup on drawn integer indices whose table the quantizer quantizes
    per row (uint8, float scales and zero points: torchao's EmbeddingQuantizer scheme), then a
    linear; the Inductor quantizers leave the table float (such cases are drawn again)."""
    _pt2e_matches_reference(subject, case, fold_quantize,
                            premise=(_embedding_table_quantized, "the quantizer left the embedding table float"))


def _embedding_table_quantized(gm) -> bool:
    return any(is_call(n, (torch.ops.aten.embedding.default,)) and is_call(n.args[0], DEQUANTIZE)
               for n in gm.graph.nodes)


@prop("pt2e", "patterns", qat=True, model=conv_bn_specs(qat=True), fold_quantize=st.booleans())
def test_qat_conv_bn_matches_reference(subject, case, fold_quantize):
    """Always a QAT conv-bn: the fold conversion does (bias, eps, running statistics, groups and
    transposed weights), compared at every point, as ``test_fx_qat_conv_bn_matches_reference``."""
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "models", fold_quantize=st.booleans())
def test_model_matches_reference(subject, case, fold_quantize):
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("pt2e", "patterns", qat=False)
def test_reference_representation_matches_reference(subject, case):
    """The candidate's representation against qref's, exactly (outputs, and every integer point
    both have: where both are integer math on the same qparams they must agree bit for bit, so a
    systematic rounding bias within 1 LSB fails), and against the q/dq reference within
    REFERENCE_REPRESENTATION on the outputs (its inner quantize points are integer math, not
    quantize nodes), tie inputs included under INPUT_ROUNDING; a float output is bounded by the
    allowed steps times the scale of the quantizes feeding it (qref.compare.float_bound)."""
    subject.require("use_reference_representation")
    qdq = subject.reference(case)
    ours = subject.reference(case, use_reference_representation=True)
    candidate = subject.convert(case, use_reference_representation=True)
    exact = compare(ours, candidate, case.inputs, subject.tolerance(EXACT)).shared()
    subject.record.lsb(exact.max_lsb)
    if not exact.ok:
        subject.fail(case, f"{subject.target}(use_reference_representation=True) vs qref's reference "
                           f"representation:\n{exact.message()}", comparison=exact)
    inputs, replaced = _inputs_rounded_alike(qdq, case.inputs)
    if replaced:
        event("graph-input ties fed as the representation rounds them (input-rounding allowance)")
    result = compare(qdq, candidate, inputs, subject.tolerance(REFERENCE_REPRESENTATION))
    subject.record.lsb(result.output_lsb or 0)
    if not result.outputs_ok:
        allowance = f"\n  {replaced} graph-input elements at ties: {INPUT_ROUNDING}" if replaced else ""
        subject.fail(case, f"{subject.target}(use_reference_representation=True) vs qref's q/dq reference:\n"
                           f"{result.outputs_message()}{allowance}", comparison=result)


def _fx_matches_reference(subject, case, premise=None):
    """Every lowered module's and op's output is a point (``qref.compare``: quantized in,
    quantized out), with its qparams, besides the quantizes left in the graph and the outputs.
    ``premise``: as for :func:`_pt2e_matches_reference`."""
    with qref.use_engine(case.setup.engine, threads=1):
        reference = subject.reference(case)
        if premise is not None and not premise[0](reference):
            subject.not_compared(premise[1])
            reject()
        try:  # what the engine refuses to run (qref.engines.ENGINE_LIMITS) is not the converter's
            reference(*case.inputs[0])
        except RuntimeError as error:
            cause = engine_limit(case.setup.engine, error, reference)
            if cause is None:
                raise
            subject.not_compared(f"{case.setup.engine} cannot run this model: {cause}")
            reject()
        candidate = subject.convert(case)
        result = compare(reference, candidate, case.inputs, subject.tolerance(EXACT))
    subject.record.lsb(result.max_lsb)
    if not result.ok:
        subject.fail(case, f"{subject.target} vs qref.convert_fx, both lowered on {case.setup.engine}:\n"
                           f"{result.message()}", comparison=result)


@prop("fx", "ops")
def test_fx_single_op_matches_reference(subject, case):
    _fx_matches_reference(subject, case)


@pytest.mark.parametrize("op", OP_KINDS)
@prop("fx", "ops", variants=len(OP_KINDS), data=st.data())
def test_fx_each_op_matches_reference(subject, op, data):
    """As each_op_matches_reference, lowered."""
    _fx_matches_reference(subject, data.draw(subject.cases(kinds=(op,)), label="case"))


@prop("fx", "ops", model=fixed_qparams_specs("fx"))
def test_fx_fixed_qparams_op_matches_reference(subject, case):
    """Always a sigmoid, tanh or hardsigmoid: lowered to the engine's fixed-qparams kernel."""
    _fx_matches_reference(subject, case)


@prop("fx", "patterns")
def test_fx_pattern_matches_reference(subject, case):
    _fx_matches_reference(subject, case)


@prop("fx", "patterns", kinds=("two_inputs",))
def test_fx_two_input_graph_matches_reference(subject, case):
    """Always a second graph input joined later, the lowered model quantizing the two graph
    inputs with their own qparams."""
    _fx_matches_reference(subject, case, premise=(_fx_graph_inputs_quantized_apart,
                                                  "no two graph inputs quantized apart"))


def _fx_graph_inputs_quantized_apart(gm) -> bool:
    """Two placeholders quantized (``torch.quantize_per_tensor`` on attributes) with other qparams."""
    qparams = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.quantize_per_tensor and node.args[0].op == "placeholder":
            scale, zero_point = (getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args[1:3])
            qparams.add((float(scale), int(zero_point)))
    return len(qparams) >= 2


@prop("fx", "patterns", kinds=GRAPH_KINDS)
def test_fx_graph_pattern_matches_reference(subject, case):
    """A second graph input joined later, a second graph output, or an embedding lookup on
    integer indices (FX's mappings leave the lookup float and quantize the linear after it)."""
    _fx_matches_reference(subject, case)


@prop("fx", "patterns", qat=True, model=conv_bn_specs(flow="fx", qat=True))
def test_fx_qat_conv_bn_matches_reference(subject, case):
    """Always a QAT conv-bn (the fused module's fold, with the BatchNorm's own eps)."""
    _fx_matches_reference(subject, case)


@prop("fx", "models")
def test_fx_model_matches_reference(subject, case):
    _fx_matches_reference(subject, case)


# --- fx: dynamic Linear (int8 per-call activations, float16 weights) --------------------------

# the tier's pattern kinds that draw a Linear (the dynamic setups quantize nn.Linear only)
_LINEAR_KINDS = ("linear_act", "flatten_linear", "linear_seq")


def _with_dynamic_setup(static_cases, kinds):
    """The case again under a dynamic setup of ``kinds`` (its model, calibration and inputs; the
    engine drawn again, as float16 is lowered on two engines only), prepared again; a spec
    prepare_fx refuses under it is drawn again, as ``cases`` does."""
    from qref.strategies.setups import fx_dynamic_setups

    @st.composite
    def swap(draw):
        case = draw(static_cases, label="static case")
        try:
            setup = draw(fx_dynamic_setups(kinds, model=case.spec), label="dynamic setup")
        except ValueError:  # this spec's Linear is fused with a module the dynamic mapping leaves float
            reject()
        dynamic = dataclasses.replace(case, setup=setup)
        try:
            dynamic.prepared()
        except Exception:  # noqa: BLE001 - preparation is not under test
            reject()
        return dynamic

    return swap()


def _dynamic_weight_differences(reference, candidate) -> list[str]:
    """Each dynamic quantized module of the reference whose counterpart (same path) in the
    candidate is missing, of another class or holds other weights: int8 integers and qparams,
    or the float16 values; and the bias."""
    import torch.ao.nn.quantized.dynamic as nnqd

    found = dict(candidate.named_modules())
    problems = []
    for path, ours in reference.named_modules():
        if not isinstance(ours, nnqd.Linear):
            continue
        theirs = found.get(path)
        if type(theirs) is not type(ours):
            problems.append(f"{path}: {type(theirs).__name__} instead of {type(ours).__module__}.{type(ours).__name__}")
            continue
        (w, b), (w2, b2) = ours._weight_bias(), theirs._weight_bias()
        if w.is_quantized != w2.is_quantized or w.dtype != w2.dtype:
            problems.append(f"{path}: weight dtype {w2.dtype}, the reference's {w.dtype}")
        elif w.is_quantized and not (torch.equal(w.int_repr(), w2.int_repr()) and _same_qparams(w, w2)):
            problems.append(f"{path}: weight integers or qparams differ (max |int difference| "
                            f"{(w.int_repr().int() - w2.int_repr().int()).abs().max().item()})")
        elif not w.is_quantized and not torch.equal(w, w2):
            problems.append(f"{path}: float16 weight values differ (max |difference| {(w - w2).abs().max().item():g})")
        if (b is None) != (b2 is None) or (b is not None and not torch.equal(b, b2)):
            problems.append(f"{path}: bias differs")
    return problems


def _same_qparams(a, b) -> bool:
    if a.qscheme() != b.qscheme():
        return False
    if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
    return (torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()))


def _fx_dynamic_matches_reference(subject, case):
    with qref.use_engine(case.setup.engine, threads=1):
        reference = subject.reference(case)
        candidate = subject.convert(case)
        problems = _dynamic_weight_differences(reference, candidate)
        result = compare(reference, candidate, case.inputs, subject.tolerance(EXACT))
    subject.record.lsb(result.max_lsb)
    if problems:
        subject.fail(case, f"{subject.target}'s dynamic modules differ from qref's on {case.setup.engine}:\n  "
                           + "\n  ".join(problems))
    if not result.ok:
        subject.fail(case, f"{subject.target} vs qref.convert_fx, {case.setup.kind}, both lowered on "
                           f"{case.setup.engine}:\n{result.message()}", comparison=result)


@prop("fx", "patterns", qat=False, kinds=_LINEAR_KINDS, data=st.data())
def test_fx_dynamic_linear_matches_reference(subject, data):
    """Always a Linear under ``default_dynamic_qconfig`` / ``per_channel_dynamic_qconfig``: int8
    weights, activations the kernel quantizes per call.  The lowered dynamic modules must hold
    the reference's weights (integers and qparams) and compute its float outputs exactly: the
    same packed weights on the same engine give the same output, one thread (measured against
    torch's convert_fx in tests/test_fx_dynamic.py)."""
    _fx_dynamic_matches_reference(subject, data.draw(_with_dynamic_setup(subject.cases(), ("dynamic",)), label="case"))


@prop("fx", "patterns", qat=False, kinds=_LINEAR_KINDS, data=st.data())
def test_fx_float16_linear_matches_reference(subject, data):
    """Always a Linear under ``float16_dynamic_qconfig`` (fbgemm, x86: the engines that lower
    it): the lowered module's float16 weights must be the reference's (each weight cast to
    nearest) and its float outputs exactly the reference's (measured as for int8)."""
    _fx_dynamic_matches_reference(subject, data.draw(_with_dynamic_setup(subject.cases(), ("float16",)), label="case"))
