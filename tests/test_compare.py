"""qref.compare: integer comparison at every quantize point, and the failures it names.

Honest both ways: two converters that agree compare exact with many points, and each kind
of tampering (one weight integer, one quantize scale, a dropped q/dq pair, a shifted
quantize, a NaN output) is caught and named at the point where it was made.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import qref
from fixtures.prepare import inputs
from qref._quiet import import_torchao_quietly
from qref.compare import EXACT, Tolerance, compare, compare_lowered, output_quantization, quantize_points
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402

qd = torch.ops.quantized_decomposed


def batches(model_name):
    """In range, and ten times beyond the calibrated range (saturation)."""
    return [inputs(model_name, 0), inputs(model_name, 1, 10.0)]


def converted(prepared_cache, model_name, setup_name, **kwargs):
    return qref.convert_pt2e(prepared_cache.get(model_name, setup_name), **kwargs)


def quantize_of(gm, input_name):
    """The quantize node of the float node ``input_name``."""
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANTIZE
                and n.args[0].name == input_name)  # fmt: skip


def edited(gm, edit):
    """A copy of ``gm`` (own tensors, own graph) with ``edit(copy)`` applied."""
    gm = copy.deepcopy(gm)
    edit(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# Two converters that agree
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name,setup_name,weight_key",
    [("residual_add", "x86_ptq_pc", "conv2d.weight"),  # per-channel int8 weights, uint8 acts
     ("cat_branches", "qref_int16", "conv2d.bias")],  # int16 activations, int32 bias  # fmt: skip
)
def test_qref_and_torchao_agree_exactly_at_every_point(prepared_cache, model_name, setup_name, weight_key):
    prepared = prepared_cache.get(model_name, setup_name)
    reference = qref.convert_pt2e(prepared)
    candidate = torchao_convert(copy.deepcopy(prepared))
    result = compare(reference, candidate, batches(model_name))
    assert result.ok, result.message()
    assert len(result.points) >= 4 and weight_key in result.points and "x" in result.points
    assert result.max_lsb == 0 and result.first_divergence is None
    assert not result.missing and not result.extra
    assert "matches the reference within exact" in result.message()


@pytest.mark.parametrize("fold_quantize", [True, False])
def test_qat_folded_convs_pair_with_torchao(fold_quantize):
    """Two QAT-folded convs (found by the suite): torchao numbers them conv2d_4, conv2d where qref
    has conv2d_3, conv2d_2, and unfolded, qref's weight dequantizes come first, second conv's first."""
    from qref.strategies.cases import prepare_case
    from qref.strategies.models import BatchNorm, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    spec = ModelSpec((2, 2, 1, 1), (Conv(2, 1, bias=False), BatchNorm(1), Conv(1, 1), BatchNorm(1)))
    setup = QuantSetup(flow="pt2e", qat=True, kind="qref", per_channel=False, act_dtype="int8",
                       symmetric=False, observer="minmax", engine=None, reduce_range=False)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 2, 1, 1, generator=g),) for _ in range(3)]
    prepared = prepare_case(spec, setup, data[:2])
    reference = qref.convert_pt2e(copy.deepcopy(prepared), fold_quantize=fold_quantize)
    candidate = torchao_convert(copy.deepcopy(prepared), fold_quantize=fold_quantize)
    result = compare(reference, candidate, data)
    assert result.ok and not result.missing and not result.extra, result.message()
    assert sum(key.endswith(".weight") for key in result.points) == 2


def test_folded_and_unfolded_weights_share_keys(prepared_cache):
    """fold_quantize only moves the weight quantize to convert time: same points, same integers."""
    prepared = prepared_cache.get("mlp", "qref_int8_sym")
    folded = qref.convert_pt2e(copy.deepcopy(prepared))
    unfolded = torchao_convert(prepared, fold_quantize=False)
    result = compare(folded, unfolded, batches("mlp"))
    assert result.ok, result.message()
    assert {"linear.weight", "linear.bias", "linear_2.weight"} <= set(result.points)
    assert result.points["linear.bias"].kind == "weight"


def test_quantize_points_leaves_the_graph_alone_and_keys_by_input(prepared_cache):
    gm = converted(prepared_cache, "mlp", "qref_int8_sym")
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    points = quantize_points(gm, batches("mlp"))
    assert gm.code == code and all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    activations = [k for k in points if "." not in k]
    assert activations == ["x", "relu", "relu_1", "linear_2"]
    assert points["x"][0].dtype == torch.int8 and points["linear.bias"][0].dtype == torch.int32
    assert len(points["relu"]) == 2  # one per batch


def test_fx_reference_points_read_int_repr():
    from fixtures.fx_setups import prepared

    model, _ = prepared("mlp", "fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = qref.convert_to_reference_fx(model)
        points = quantize_points(reference, batches("mlp"))  # torch.quantize_per_tensor warns
    assert list(points) == ["x", "fc1", "fc2", "fc3"]
    assert all(v[0].dtype == torch.uint8 for v in points.values())


# ---------------------------------------------------------------------------------------------
# Tampering is caught where it happened
# ---------------------------------------------------------------------------------------------


def test_one_folded_weight_integer_off_by_one(prepared_cache):
    reference = converted(prepared_cache, "residual_add", "x86_ptq_pc")

    def bump_first_weight(gm):
        dq = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in DEQUANTIZE)
        weight = getattr(gm, dq.args[0].target)
        weight.view(-1)[5] += 1 if weight.view(-1)[5] < 127 else -1

    result = compare(reference, edited(reference, bump_first_weight), batches("residual_add"))
    assert not result.ok and result.first_divergence == "conv2d.weight"
    point = result.points["conv2d.weight"]
    assert (point.max_lsb, point.differing) == (1, 2)  # one element, seen in each of two batches
    message = result.message()
    assert "'conv2d.weight'" in message and "folded constant" in message
    assert "allowed: 0 LSB" in message and "max over all" in message


def test_changed_quantize_scale(prepared_cache):
    reference = converted(prepared_cache, "residual_add", "x86_ptq_pc")

    def rescale(gm):
        q = quantize_of(gm, "relu")
        q.args = (q.args[0], q.args[1] * 1.25, *q.args[2:])

    result = compare(reference, edited(reference, rescale), batches("residual_add"))
    assert result.first_divergence == "relu" and result.points["x"].ok
    message = result.message()
    assert "quantize point 'relu'" in message and "expected" in message and "float input there" in message
    scale = quantize_of(reference, "relu").args[1]
    assert f"reference scale={scale:.6g}" in message and f"candidate scale={scale * 1.25:.6g}" in message


def drop_relu_qdq(gm):
    """Remove the q/dq pair after the first relu (a dropped quantize/dequantize)."""
    q = quantize_of(gm, "relu")
    for dq in list(q.users):
        dq.replace_all_uses_with(q.args[0])
        gm.graph.erase_node(dq)
    gm.graph.erase_node(q)


def test_dropped_qdq_pair_is_missing(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    result = compare(reference, edited(reference, drop_relu_qdq), batches("mlp"))
    assert result.missing == ("relu",) and not result.ok
    assert result.first_divergence == "relu"
    assert "missing in the candidate" in result.message()


def renamed(gm, renames):
    """A copy of ``gm`` whose nodes ``old`` are called ``new`` (as another converter may name them)."""

    def rename(gm):
        nodes = {n.name: n for n in gm.graph.nodes}
        for old, new in renames.items():
            nodes[old]._rename(new)

    return edited(gm, rename)


def test_points_renamed_by_another_converter_are_paired(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    # fx numbering differs (torchao's QAT fold names a conv `conv1d` where qref has `conv1d_1`)
    candidate = renamed(reference, {"relu": "relu_7", "linear": "linear_9"})
    for isolate in (False, True):
        result = compare(reference, candidate, batches("mlp"), isolate=isolate)
        assert result.ok and not result.missing and not result.extra, result.message()
        assert {"relu", "linear.weight", "linear.bias"} <= set(result.points)


def test_points_with_swapped_numbers_are_paired_in_order(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")

    def swap(gm):  # set the names directly: fx's namespace never gives a used name back
        nodes = {n.name: n for n in gm.graph.nodes}
        nodes["relu"].name, nodes["relu_1"].name = "relu_1", "relu"

    result = compare(reference, edited(reference, swap), batches("mlp"))
    assert result.ok and not result.missing and not result.extra, result.message()


def test_renamed_and_dropped_points_stay_unpaired(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    # relu's q/dq is dropped and relu_1 renamed: which candidate relu is which is a guess
    candidate = renamed(edited(reference, drop_relu_qdq), {"relu_1": "relu_5"})
    result = compare(reference, candidate, batches("mlp"))
    assert set(result.missing) == {"relu", "relu_1"} and result.extra == ("relu_5",)
    assert not result.ok


def shifted_quantize(x, scale, zero_point, quant_min, quant_max, dtype, delta, every):
    """A converter's own quantize: exact, then ``delta`` steps off on every ``every``-th element."""
    q = qd.quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype).to(torch.int32)
    bump = torch.zeros_like(q)
    bump.view(-1)[::every] = delta
    return torch.where(q + bump > quant_max, q - bump, q + bump).to(dtype)


def shifted_at(reference, input_name, delta, every=1):
    def replace(gm):
        q = quantize_of(gm, input_name)
        with gm.graph.inserting_before(q):
            new = gm.graph.call_function(shifted_quantize, (*q.args, delta, every))
        q.replace_all_uses_with(new)
        gm.graph.erase_node(q)

    return edited(reference, replace)


def test_depth_budget(prepared_cache):
    """mlp: x (input, depth 0) -> relu (1) -> relu_1 (2) -> linear_2 (3) -> output."""
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    data = batches("mlp")
    late = shifted_at(reference, "linear_2", delta=2)  # seen through the replaced-callable rule
    per_requant = Tolerance.depth_budget(1, cause="test: one step per requantization")

    exact = compare(reference, late, data)
    assert exact.first_divergence == "linear_2" and exact.points["linear_2"].max_lsb == 2
    assert [exact.points[k].depth for k in ("x", "relu", "relu_1", "linear_2")] == [0, 1, 2, 3]

    budget = compare(reference, late, data, per_requant)
    assert budget.ok, budget.message()
    assert budget.points["linear_2"].allowed == 3 and budget.max_lsb == 2 and budget.output_lsb == 2
    assert not compare(reference, late, data, Tolerance.within(1, cause="test")).ok

    early = compare(reference, shifted_at(reference, "relu", delta=2), data, per_requant)
    assert early.first_divergence == "relu" and early.points["relu"].allowed == 1


def test_output_quantization_gives_the_output_qparams_and_depth(prepared_cache):
    """mlp: the output is linear_2's dequantize, three requantizations from the input."""
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    (qparams, depth), = output_quantization(reference, batches("mlp")[0])
    q = quantize_of(reference, "linear_2")
    assert depth == 3 and float(qparams.scale) == q.args[1] and int(qparams.zero_point) == q.args[2]


def test_off_by_one_fraction(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    data = batches("mlp")
    quarter = shifted_at(reference, "linear_2", delta=1, every=4)  # 25% of elements one step off

    def tolerance(fraction):
        return Tolerance.off_by_one(fraction, cause="test: rounding ties")

    ok = compare(reference, quarter, data, tolerance(0.3))
    assert ok.ok, ok.message()
    assert ok.max_lsb == 1 and ok.points["linear_2"].differing == ok.points["linear_2"].elements // 4
    assert compare(reference, quarter, data, tolerance(0.2)).first_divergence == "linear_2"
    two_off = shifted_at(reference, "linear_2", delta=2, every=4)
    assert compare(reference, two_off, data, tolerance(0.5)).first_divergence == "linear_2"


def test_nan_output_is_named(prepared_cache):
    reference = converted(prepared_cache, "linear", "qref_int8_sym")

    def nan_scale(gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        dq = output.args[0][0]
        dq.args = (dq.args[0], float("nan"), *dq.args[2:])

    result = compare(reference, edited(reference, nan_scale), batches("linear"))
    assert all(p.ok for p in result.points.values())
    assert result.first_divergence == "output[0]" and result.output_lsb == math.inf
    assert "NaN in the candidate's output" in result.message()


def test_isolation_confines_an_error_to_its_point(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    candidate = shifted_at(reference, "relu", delta=3)
    spread = compare(reference, candidate, batches("mlp"))
    isolated = compare(reference, candidate, batches("mlp"), isolate=True)
    assert spread.failures[:2] == ["relu", "relu_1"]
    assert isolated.failures == ["relu"] and "isolated" in isolated.message()


def test_tolerances_need_a_cause():
    assert EXACT.allowed(5) == 0 and str(EXACT).startswith("exact")
    with pytest.raises(ValueError, match="cause"):
        Tolerance(lsb=1)
    with pytest.raises(ValueError, match="no kernel contract"):
        Tolerance.kernel("not-an-engine")
    kernel = Tolerance.kernel("qnnpack")
    assert kernel.lsb == 1 and "qnnpack kernel contract" in kernel.cause
    assert Tolerance.kernel("qnnpack", compounding=True).allowed(3) == 3


# ---------------------------------------------------------------------------------------------
# Lowered FX models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fbgemm_mlp():
    from fixtures.fx_setups import prepared

    if "fbgemm" not in qref.engines():
        pytest.skip("fbgemm does not run here")
    model, _ = prepared("mlp", "fbgemm")
    with warnings.catch_warnings(), qref.use_engine("fbgemm", threads=1):
        warnings.simplefilter("ignore")
        yield qref.convert_to_reference_fx(model), qref.convert_fx(model)


def in_range(model_name):
    """fbgemm's contract needs 7-bit activations: inputs inside the calibrated range."""
    return [inputs(model_name, 0), inputs(model_name, 1)]


def test_lowered_fbgemm_within_kernel_contract(fbgemm_mlp):
    reference, lowered = fbgemm_mlp
    with qref.use_engine("fbgemm", threads=1):
        result = compare_lowered(reference, lowered, in_range("mlp"), Tolerance.kernel("fbgemm"))
    print(f"\n[mlp fbgemm] {result.message()}")
    assert result.ok, result.message()
    assert list(result.points) == ["x", "fc1", "fc2", "fc3"]
    assert {result.points[k].kind for k in ("fc1", "fc2", "fc3")} == {"module"}
    assert 0 <= result.max_lsb <= 1 and result.output_lsb is not None
    assert "fbgemm kernel contract" in result.message()


def test_lowered_module_with_wrong_scale(fbgemm_mlp):
    """A lowered Linear whose output scale is 1.5x the reference's fails the kernel check at that
    module, and the message names the scales; a weighted module never keeps its input's grid."""
    from qref.compare.lowered import _keeps_input_grid

    reference, lowered = fbgemm_mlp
    lowered = copy.deepcopy(lowered)
    lowered.fc2.scale = lowered.fc2.scale * 1.5
    with qref.use_engine("fbgemm", threads=1):
        result = compare_lowered(reference, lowered, in_range("mlp"), Tolerance.kernel("fbgemm"))
    assert not result.ok and result.first_divergence == "fc2"
    assert "x1.5" in result.points["fc2"].mismatch and "scale" in result.message()
    assert result.points["fc3"].ok  # isolated: fc3 got the reference's integers on its grid
    assert not _keeps_input_grid(reference, "fc2")


def test_a_module_left_unlowered_fails_although_its_integers_agree():
    """A conv3d the candidate leaves a reference module (float, between a dequantize and a
    quantize) computes the reference's integers: the lowered comparison still names it."""
    from fixtures.fx_setups import prepared as fx_prepared
    from tests.mutants.fx import conv3d_not_lowered

    if "fbgemm" not in qref.engines():
        pytest.skip("fbgemm does not run here")
    model, _ = fx_prepared("conv3d_relu", "fbgemm")
    with warnings.catch_warnings(), qref.use_engine("fbgemm", threads=1):
        warnings.simplefilter("ignore")
        reference, candidate = qref.convert_fx(copy.deepcopy(model)), conv3d_not_lowered(copy.deepcopy(model))
        same = compare(reference, qref.convert_fx(copy.deepcopy(model)), in_range("conv3d_relu"))
        result = compare(reference, candidate, in_range("conv3d_relu"))
    assert same.ok, same.message()
    assert not result.ok and result.max_lsb == 0, result.message()
    assert "not lowered" in result.points[result.first_divergence].mismatch


def test_a_tiny_scale_error_fails_even_where_the_integers_agree(fbgemm_mlp):
    """A scale 2**-20 off changes no integer here: the comparison still fails, at that module,
    and says the integers agree and what differs instead (never "diverges" with 0 LSB)."""
    reference, lowered = fbgemm_mlp
    lowered_off = copy.deepcopy(lowered)
    lowered_off.fc1.scale = lowered_off.fc1.scale * (1 + 2**-20)
    with qref.use_engine("fbgemm", threads=1):
        kernel = compare_lowered(reference, lowered_off, in_range("mlp"), Tolerance.kernel("fbgemm"))
        exact = compare(lowered, lowered_off, in_range("mlp"))  # lowered vs lowered: module points
    for result in (kernel, exact):
        assert not result.ok and result.first_divergence == "fc1", result.message()
        assert result.points["fc1"].max_lsb == 0 and result.points["fc1"].kind == "module"
        message = result.message()
        assert "the integers agree (0 LSB" in message and "scale" in message, message
    assert all(result.points[k].kind == "module" for k in ("fc1", "fc2", "fc3"))


def test_a_lowered_op_on_a_coarser_allowed_grid_is_judged_on_its_own_grid():
    """Found by the real-converter proof at seed 1 (qref-fx and torch-fx alike): a lowered tanh
    outputs on its fixed qparams (1/128, zero point 128) where the reference's observer saw a tiny
    range (scale 2**-23); on the reference's grid the candidate's nearest value, 0, was 72 LSB
    off. It is judged on its own, coarser grid, and a value a step away there still fails."""
    from qref.compare.judge import _judge
    from qref.qparams import QParams

    tiny = QParams(scale=2.0**-23, zero_point=0, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    fixed = QParams(scale=1 / 128, zero_point=128, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    expected = [torch.tensor([0, 72, 30], dtype=torch.uint8)]  # tanh of ~8.6e-6 and less
    nearest = [torch.tensor([128, 128, 128], dtype=torch.uint8)]  # 0: the nearest the fixed grid has
    kept = _judge("tanh1", "module", "tanh1", 1, EXACT, expected, nearest, [], [], tiny, fixed, keeps=(fixed,))
    assert kept.ok and "compared on the candidate's grid" in kept.note, kept
    wrong = [torch.tensor([128, 130, 128], dtype=torch.uint8)]  # 2/128 where the reference has ~0
    assert not _judge("tanh1", "module", "tanh1", 1, EXACT, expected, wrong, [], [], tiny, fixed, keeps=(fixed,)).ok


def test_a_lowered_op_may_keep_its_input_grid_only_where_the_reference_allows_it():
    """keeps: the qparams the reference graph allows besides its own (a weightless op's input)."""
    from torch import nn

    from qref.compare.judge import _judge
    from qref.compare.lowered import _keeps_input_grid
    from qref.qparams import QParams

    own = QParams(scale=0.1, zero_point=0, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    inputs = QParams(scale=0.2, zero_point=0, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    expected, got = [torch.tensor([0, 10, 20])], [torch.tensor([0, 5, 10])]  # the same values
    kept = _judge("act", "module", "act", 1, EXACT, expected, got, [], [], own, inputs, keeps=(inputs,))
    assert kept.ok and "qparams the reference graph allows" in kept.note
    refused = _judge("act", "module", "act", 1, EXACT, expected, got, [], [], own, inputs)
    assert not refused.ok and "x2" in refused.mismatch
    dtype = _judge("act", "module", "act", 1, EXACT, expected, [g.to(torch.int8) for g in expected], [], [],
                   own, own)  # fmt: skip
    assert not dtype.ok and dtype.max_lsb == 0 and "dtype torch.int8 in the candidate" in dtype.mismatch
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Hardtanh(), nn.Linear(2, 2), nn.Sigmoid()))
    assert _keeps_input_grid(gm, "0") and not _keeps_input_grid(gm, "1")
    from qref.compare import ModuleInput
    from qref.compare.lowered import _other_grids

    fed = (ModuleInput(qparams=inputs, low=0, high=20),)
    assert _other_grids(gm, "0", fed) == (inputs,) and _other_grids(gm, "1", fed) == ()
    # a sigmoid's quantized kernel outputs on its fixed qparams (1/256, 0), whatever quantize follows
    fixed = _other_grids(gm, "2", fed)[-1]
    assert (fixed.scale, fixed.zero_point, fixed.dtype) == (1 / 256, 0, torch.uint8)


def test_an_extra_quantize_in_the_lowered_model_is_reported(fbgemm_mlp):
    reference, lowered = fbgemm_mlp

    def requantize(gm):  # quantize fc1's output again, through a float round trip
        fc1 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc1")
        with gm.graph.inserting_after(fc1):
            dq = gm.graph.call_method("dequantize", (fc1,))
        with gm.graph.inserting_after(dq):
            q = gm.graph.call_function(torch.quantize_per_tensor, (dq, lowered.fc1.scale,
                                                                   lowered.fc1.zero_point, torch.quint8))
        fc1.replace_all_uses_with(q)
        dq.args = (fc1,)

    with qref.use_engine("fbgemm", threads=1):
        result = compare_lowered(reference, edited(lowered, requantize), in_range("mlp"), Tolerance.kernel("fbgemm"))
    assert not result.ok and len(result.extra) == 1 and "extra in the candidate" in result.message()


def test_module_inputs_give_each_lowered_module_its_quantized_input_range(fbgemm_mlp):
    reference, lowered = fbgemm_mlp
    data = in_range("mlp")
    with qref.use_engine("fbgemm", threads=1):
        result = compare_lowered(reference, lowered, data, Tolerance.kernel("fbgemm"))
    points = quantize_points(reference, data)
    (fc1,) = result.module_inputs["fc1"]
    assert fc1.high == max(int(v.max()) for v in points["x"]) and fc1.low == min(int(v.min()) for v in points["x"])
    assert float(fc1.qparams.scale) == float(result.points["x"].expected_qparams.scale)
    assert set(result.module_inputs) == {"fc1", "fc2", "fc3"}


def test_regridded_values_saturate_like_the_reference():
    """Found by the kernel property (default profile, seed 5, fbgemm and x86): in a QAT cat of
    relu and hardtanh branches the lowered hardtanh keeps a [-1, 1] grid where the reference's
    quantize has zero point 0; its -1 is the reference's saturated 0, not 6 LSB off."""
    from qref.compare.judge import _on_grid
    from qref.qparams import QParams

    wide = QParams(scale=0.647851, zero_point=68, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    narrow = QParams(scale=0.201143, zero_point=0, quant_min=0, quant_max=255, dtype=torch.uint8, axis=None)
    ints = torch.tensor([66, 68, 71, 255])  # about -1.3, 0, 1.9 and 121 on the wide grid
    assert _on_grid(ints, wide, narrow).tolist() == [0, 0, 10, 255]


def test_lowered_fbgemm_beyond_calibration_leaves_the_contract_for_a_named_cause(fbgemm_mlp):
    """Ten times the calibrated range: u8 inputs above 127 saturate fbgemm's int16 pair sums
    (on a CPU without AVX512-VNNI; with it fbgemm stays within its contract); each failing layer
    is named from its own quantized input range, within the cap that range allows."""
    from properties.test_kernels import _excuses
    from qref.engines import INT16_SATURATION, has_vnni

    reference, lowered = fbgemm_mlp
    data = [inputs("mlp", 1, 10.0)]
    with qref.use_engine("fbgemm", threads=1):
        result = compare_lowered(reference, lowered, data, Tolerance.kernel("fbgemm"))
    assert max(int(v.max()) for v in quantize_points(reference, data)["x"]) > 127
    if has_vnni(avx512=True):
        assert result.ok, result.message()
        return
    excused, unexplained = _excuses("fbgemm", lowered, result)
    assert not result.ok and result.max_lsb > 1 and "pytorch#44939" in result.message()
    assert excused and not unexplained and all(d is INT16_SATURATION for d in excused.values())


def test_outputs_message_judges_the_outputs_only(prepared_cache):
    reference = converted(prepared_cache, "mlp", "qref_int8_sym")
    assert compare(reference, reference, batches("mlp")).outputs_ok
    result = compare(reference, shifted_at(reference, "relu", delta=3), batches("mlp"))
    assert not result.outputs_ok
    message = result.outputs_message()
    assert message.startswith("first divergence: final output 'output[0]'"), message
    assert "relu" not in message  # inner points are not what this verdict is about


def _float_tail_graph(shift: int, tail):
    """x -> quantize (0.1, int8) [+ shift] -> dequantize -> tail -> a float output."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    q = graph.call_function(qd.quantize_per_tensor.default, (x, 0.1, 0, -128, 127, torch.int8))
    if shift:
        q = graph.call_function(torch.ops.aten.add.Tensor, (q, shift))
        q = graph.call_function(torch.ops.aten.clamp.default, (q, -128, 127))
        q = graph.call_function(torch.ops.aten.to.dtype, (q, torch.int8))
    dq = graph.call_function(qd.dequantize_per_tensor.default, (q, 0.1, 0, -128, 127, torch.int8))
    graph.output(graph.call_function(tail, (dq,)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_a_float_output_is_bounded_by_the_steps_of_the_quantizes_feeding_it():
    """Relaxed tolerance, float output: |diff| within the allowed steps times the scale of the
    quantize feeding it, through non-expanding float ops; through any other op it stays exact."""
    data = [(torch.linspace(-3, 3, 40),)]
    one_step = Tolerance.within(1, cause="test: one step")
    relu = torch.ops.aten.relu.default
    within = compare(_float_tail_graph(0, relu), _float_tail_graph(1, relu), data, one_step)
    assert within.ok and within.outputs["output[0]"].bound == pytest.approx(0.1, rel=1e-4), within.message()
    beyond = compare(_float_tail_graph(0, relu), _float_tail_graph(2, relu), data, one_step)
    assert not beyond.ok and "float values differ" in beyond.message() and "allowed 0.1" in beyond.message()
    exp = torch.ops.aten.exp.default  # may amplify a step: no bound, bit for bit
    unbounded = compare(_float_tail_graph(0, exp), _float_tail_graph(1, exp), data, one_step)
    assert not unbounded.ok and "no bound" in unbounded.message()
    assert compare(_float_tail_graph(0, exp), _float_tail_graph(0, exp), data, one_step).ok


def test_renamed_points_pair_by_their_integers_before_graph_order():
    """Real-architecture tier (ResNet, torchao QAT fold): the candidate's folded shortcut conv comes
    before the main-path conv in its graph, so pairing by graph order alone swapped a 3x3 and a 1x1
    weight; a point whose integers equal a reference point's pairs with it first."""
    from qref.compare.pairing import _pairs
    from qref.compare.record import _Point

    def point(key, position, values):
        return _Point(key, key, "weight", 0, None, position, [values])

    w3, w1 = torch.ones(2, 2, 3, 3, dtype=torch.int8), torch.ones(2, 2, 1, 1, dtype=torch.int8)
    ref = {"conv2d_1.weight": point("conv2d_1.weight", 1, w3), "conv2d_2.weight": point("conv2d_2.weight", 2, w1)}
    got = {"conv2d_3.weight": point("conv2d_3.weight", 1, w1), "conv2d_4.weight": point("conv2d_4.weight", 2, w3)}
    assert _pairs(ref, got) == {"conv2d_3.weight": "conv2d_2.weight", "conv2d_4.weight": "conv2d_1.weight"}
    # no integers alike: graph order, as before (and the comparison fails where they differ)
    got = {"conv2d_3.weight": point("conv2d_3.weight", 1, w3 * 2), "conv2d_4.weight": point("conv2d_4.weight", 2, w1 * 2)}
    assert _pairs(ref, got) == {"conv2d_3.weight": "conv2d_1.weight", "conv2d_4.weight": "conv2d_2.weight"}
