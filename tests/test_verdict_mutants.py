"""The mutants of tests/mutants/verdicts.py plant their bug on their witness, and hide it from the
comparisons the suite made before issue 11 (final outputs only, engines against each other only,
the q/dq graph within 1 LSB per requantization only): only comparing what was promised, where it
was promised, sees them.  (tests/test_suite_proof.py runs ``qref check`` on each.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qref
from fixtures import fx_setups
from fixtures.prepare import inputs
from fixtures.zoo import ZOO
from qref.compare import EXACT, Tolerance, compare, compare_lowered
from qref.pt2e.ops import schema_arguments
from tests.mutants import MUTANTS

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)


def _fx_both(name, engine="fbgemm"):
    mutant = MUTANTS[name]
    model_name, setup_name, qat = mutant.witness
    model = fx_setups.prepared(model_name, setup_name, qat)[0]
    g = torch.Generator().manual_seed(100)
    batches = [ZOO[model_name].example_inputs(g) for _ in range(3)]
    with qref.use_engine(engine, threads=1):
        ours = qref.convert_fx(copy.deepcopy(model))
        theirs = mutant.load()(copy.deepcopy(model))
        reference = qref.convert_to_reference_fx(copy.deepcopy(model))
    return reference, ours, theirs, batches


def _final_outputs_equal(ours, theirs, batches) -> bool:
    with torch.no_grad():
        return all(torch.equal(ours(*b), theirs(*b)) for b in batches)


def test_inner_scale_hidden_shows_only_at_the_module_points():
    reference, ours, theirs, batches = _fx_both("inner_scale_hidden")
    assert _final_outputs_equal(ours, theirs, batches)  # what the outputs-only comparison saw
    with qref.use_engine("fbgemm", threads=1):
        result = compare(ours, theirs, batches, EXACT)
    assert not result.ok and result.max_lsb == 0, result.message()  # not one integer differs
    assert result.first_divergence == "fc1" and "scale" in result.points["fc1"].mismatch
    assert result.points["fc3"].ok  # the last module (feeding only the output) is left alone
    assert "the integers agree" in result.message()


@pytest.mark.skipif("qnnpack" not in qref.engines(), reason="qnnpack does not run here")
def test_same_scale_error_on_every_engine_agrees_across_engines_but_not_with_the_reference():
    reference, _, fbgemm, batches = _fx_both("same_scale_error_on_every_engine", "fbgemm")
    _, _, qnnpack, _ = _fx_both("same_scale_error_on_every_engine", "qnnpack")
    with qref.use_engine("qnnpack", threads=1):
        engines = compare(fbgemm, qnnpack, batches, Tolerance.within(2, "test: two contracts"), isolate=True)
        against = compare_lowered(reference, qnnpack, batches, Tolerance.kernel("qnnpack"))
    assert engines.ok, engines.message()
    assert not against.ok and "x1.01" in against.points[against.first_divergence].mismatch


def test_representation_rounds_half_up_shows_only_at_ties(prepared_cache):
    """Off ties the mutant is qref's representation; the old property fed it only inputs on which
    the two quantize forms round alike, i.e. no ties of the input scale; at ties it is 1 LSB off
    at the representation's own input quantize."""
    from properties.test_equivalence import REFERENCE_REPRESENTATION, _graph_input_quantizes

    mutant = MUTANTS["representation_rounds_half_up"]
    model_name, setup, _ = mutant.witness
    qdq = qref.convert_pt2e(prepared_cache.get(model_name, setup))
    ours = qref.convert_pt2e(prepared_cache.get(model_name, setup), use_reference_representation=True)
    theirs = mutant.load()(prepared_cache.get(model_name, setup), use_reference_representation=True)
    (scale, *_), = _graph_input_quantizes(qdq).values()
    x = inputs(model_name, 0)[0]
    ties = (torch.round(x / scale) + 0.5) * scale  # halves of the input scale, in the input's shape
    assert compare(ours, theirs, [(x,)], EXACT).shared().ok  # off ties they agree
    assert compare(qdq, theirs, [(x,)], REFERENCE_REPRESENTATION).outputs_ok  # what the old property saw
    exact = compare(ours, theirs, [(ties,)], EXACT).shared()
    assert not exact.ok and exact.points[exact.first_divergence].max_lsb == 1, exact.message()
    plain = mutant.load()(prepared_cache.get(model_name, setup))  # the q/dq form is qref's
    assert compare(qdq, plain, [(x,)], EXACT).ok


def _float_output_scales(gm) -> list:
    from tests.mutants.verdicts import _float_output_dequantizes

    return [schema_arguments(dq)["scale"] for dq in _float_output_dequantizes(gm)]


def check_float_output_dequantize_rescaled(w):
    ours, theirs = _float_output_scales(w.ours), _float_output_scales(w.theirs)
    assert ours and theirs == [s * (1 + 2**-8) for s in ours], "the witness's last linear reads a rescaled input"
    result = compare(w.ours, w.theirs, [inputs(w.model_name, s) for s in range(3)], EXACT)
    assert not result.missing and not result.extra and all(p.ok for p in result.points.values())
    (output,) = result.outputs.values()  # a float output: nothing but the float-output verdict sees it
    assert not output.ok and output.max_lsb is None and "float output" in output.note, result.message()
    assert w.same_elsewhere("linear", "qref_int8_sym")  # every output there is a dequantize


def check_float_op_input_requantized(w):
    result = compare(w.ours, w.theirs, [inputs(w.model_name, s) for s in range(3)], EXACT)
    assert result.extra and not result.missing, result.message()
    assert result.failures == list(result.extra), "only the extra point fails"
    assert not w.outputs_differ() and not w.outputs_differ(w.calibration())  # requantized on its own grid
    assert w.same_elsewhere("linear", "qref_int8_sym")  # no float output there


def check_weighted_output_keeps_input_qparams(w):
    from tests.mutants.fx import _input_qparams

    ours, theirs = w.both()
    pairs = [(ours.get_submodule(n.target), theirs.get_submodule(n.target), _input_qparams(ours, n))
             for n in ours.graph.nodes if n.op == "call_module"]
    assert len(pairs) == 3  # fc1, fc2, fc3: each weighted
    for a, b, (scale, zero_point) in pairs:
        assert (b.scale, b.zero_point) == (scale, zero_point) != (a.scale, a.zero_point)
    with qref.use_engine("fbgemm", threads=1):
        reference = qref.convert_to_reference_fx(w.prepared())
        result = compare_lowered(reference, theirs, w.batches(), Tolerance.kernel("fbgemm"))
    assert "output qparams differ" in result.points["fc1"].mismatch, result.message()


# Witness checks for tests/test_mutants_sanity.py's PLANTED registry (which covers every mutant):
# each takes that file's witness object (FxWitness, or Pt2eWitness with its prepared cache).
PLANTED = {
    "inner_scale_hidden": lambda w: test_inner_scale_hidden_shows_only_at_the_module_points(),
    "same_scale_error_on_every_engine":
        lambda w: test_same_scale_error_on_every_engine_agrees_across_engines_but_not_with_the_reference(),
    "representation_rounds_half_up": lambda w: test_representation_rounds_half_up_shows_only_at_ties(w.cache),
    "float_output_dequantize_rescaled": check_float_output_dequantize_rescaled,
    "float_op_input_requantized": check_float_op_input_requantized,
    "weighted_output_keeps_input_qparams": check_weighted_output_keeps_input_qparams,
}
