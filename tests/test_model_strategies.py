"""The model / setup / case strategies keep their promises (qref.strategies.models, setups, cases)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import qref.strategies.models as models_module
from qref.observers import is_observer
from qref.strategies import (
    Act, BatchNorm, Cat, Conv, Linear, MatMul, ModelSpec, Pool, QuantSetup, Residual, cases,
    conv_bn_specs, model_specs, quant_setups,
)
from qref.strategies.models import (
    GRAPH_KINDS, PATTERN_KINDS, SEQUENCE_KINDS, AlsoOutput, Attention, Embedding, ExtraInput, Flatten, LayerNorm, Shared,
    Softmax, SpecError,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOWS = [("pt2e", False), ("pt2e", True), ("fx", False), ("fx", True)]


def _namespace() -> dict:
    ns: dict = {}
    exec("from qref.strategies.models import *", ns)
    return ns


def _weighted(spec: ModelSpec) -> list:
    return [layer for layer in spec.all_layers() if isinstance(layer, (Conv, Linear, Attention))]


# ---------------------------------------------------------------------------- specs

@pytest.mark.parametrize("tier", ["ops", "patterns", "models"])
@pytest.mark.parametrize("flow,qat", FLOWS)
def test_every_spec_builds_runs_and_round_trips(flow, qat, tier):
    @FAST
    @given(model_specs(flow, tier, qat))
    def check(spec):
        model = spec.build()
        model = model.train() if qat else model.eval()
        with torch.no_grad():
            out = model(torch.ones(spec.input_shape))
        assert tuple(out.shape) == spec.output_shape
        assert eval(repr(spec), _namespace()) == spec
        assert _weighted(spec), "every spec has something to quantize"
        if qat:
            assert all(not layer.zero_gamma for layer in spec.all_layers() if isinstance(layer, BatchNorm))

    check()


@FAST
@given(st.one_of(model_specs(tier="models"), model_specs("fx", "patterns"), conv_bn_specs()))
def test_to_python_rebuilds_the_same_state_dict(spec):
    ns: dict = {"__name__": "standalone"}
    exec(spec.to_python(), ns)  # fresh namespace: nothing shared with spec.build()
    rebuilt, built = ns["build_model"]().state_dict(), spec.build().state_dict()
    assert list(rebuilt) == list(built)
    for name, value in built.items():
        assert rebuilt[name].dtype == value.dtype and torch.equal(rebuilt[name], value), name
    assert "class Model(nn.Module)" in spec.to_python()


@FAST
@given(model_specs(tier="models"))
def test_batchnorm_state_is_nontrivial(spec):
    model = spec.build()
    for bn_spec, bn in zip([l for l in spec.all_layers() if isinstance(l, BatchNorm)],
                           [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]):
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        if not bn_spec.affine:
            assert bn.weight is None and bn.bias is None and not bn_spec.zero_gamma
            continue
        zero = bn.weight == 0
        assert zero.nonzero().flatten().tolist() == list(bn_spec.zero_gamma)
        assert bn.eps == bn_spec.eps and bn.momentum == bn_spec.momentum


@FAST
@given(model_specs(tier="ops"))
def test_ops_tier_is_one_quantizable_op(spec):
    assert len(spec.layers) in (1, 2)
    assert isinstance(spec.layers[0], (Conv, Linear))
    assert all(isinstance(layer, Act) for layer in spec.layers[1:])


@FAST
@given(model_specs(tier="patterns"))
def test_patterns_tier_is_one_pattern(spec):
    kinds = {type(l) for l in spec.layers}
    # the longest pattern: conv, act, a pool that keeps the features few, flatten, linear, act
    assert len(_weighted(spec)) <= 4 and len(spec.layers) <= 6
    assert kinds & {Conv, Linear, Residual, Cat, MatMul, Shared}


@pytest.mark.parametrize("kind,wanted", [("conv_bn", BatchNorm), ("add", Residual), ("cat", Cat),
                                          ("pool", Pool), ("linear_act", Linear),
                                          ("linear_bn", (Linear, BatchNorm)), ("matmul", MatMul)])
def test_patterns_tier_reaches_every_kind(kind, wanted):
    seen = []

    def has(spec) -> bool:
        if isinstance(wanted, tuple):  # a layer of the second type directly after the first
            return any(isinstance(a, wanted[0]) and isinstance(b, wanted[1]) for a, b in spec.adjacent())
        return any(isinstance(l, wanted) for l in spec.all_layers())

    @settings(max_examples=30, deadline=None, database=None)
    @given(model_specs(tier="patterns", kinds=[kind]))
    def collect(spec):
        seen.append(has(spec))

    collect()
    assert sum(seen) >= len(seen) // 2


def test_models_tier_reaches_branches_and_depth():
    seen = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(model_specs(tier="models"))
    def collect(spec):
        seen.append(spec)

    collect()
    assert any(len(_weighted(s)) >= 4 for s in seen)
    for op in ("add", "cat", "bn", "pool", "flatten", "conv1d", "conv2d", "conv_transpose", "linear",
               "sigmoid", "tanh", "hardsigmoid", "matmul"):
        assert any(op in s.ops for s in seen), op
    assert any(len({"add", "cat", "bn"} & s.ops) >= 2 for s in seen)
    assert any(isinstance(l, Conv) and l.groups == l.in_channels > 1 for s in seen for l in s.all_layers())
    assert any(isinstance(l, Conv) and 1 < l.groups < l.in_channels for s in seen for l in s.all_layers())
    assert any(isinstance(l, BatchNorm) and l.zero_gamma for s in seen for l in s.all_layers())
    assert any(isinstance(a, Linear) and isinstance(b, BatchNorm) for s in seen for a, b in s.adjacent())


def test_ops_tier_draws_conv3d_within_the_quick_budget_and_shrinks_to_one():
    """A conv3d (on a volume of sides <= 5, never transposed) in the ops tier, for both flows."""
    for flow in ("pt2e", "fx"):
        seen = []

        @settings(max_examples=20, deadline=None, database=None, derandomize=True)
        @given(model_specs(flow, tier="ops"))
        def collect(spec):
            seen.append(spec)

        collect()
        volumes = [s for s in seen if "conv3d" in s.ops]
        assert volumes, flow
        assert all(max(s.input_shape[2:]) <= 5 and not s.layers[0].transpose for s in volumes)
    spec = find(model_specs(tier="ops"), lambda s: "conv3d" in s.ops,
                settings=settings(max_examples=200, database=None, derandomize=True))
    (conv,) = spec.layers  # one conv3d of kernel 1 on a 1x1x1 volume (groups as the shrinker leaves them)
    assert conv.dim == 3 and conv.kernel_size == 1 and spec.input_shape[2:] == (1, 1, 1), spec


@pytest.mark.parametrize("op", models_module.OP_KINDS)
def test_ops_tier_narrowed_to_one_op_kind_draws_only_it(op):
    """kinds=(op,): the each-op properties' premise (every example of theirs is that kind)."""
    seen = []

    @settings(max_examples=15, deadline=None, database=None)
    @given(st.sampled_from(["pt2e", "fx"]).flatmap(lambda flow: model_specs(flow, tier="ops", kinds=(op,))))
    def collect(spec):
        seen.append(spec)

    collect()
    weighted = [l for s in seen for l in s.all_layers() if isinstance(l, (Conv, Linear))]
    assert len(weighted) == len(seen)
    kinds = {f"conv{l.dim}d" if isinstance(l, Conv) else "linear" for l in weighted}
    assert kinds == {op}, (op, kinds)


# derandomize: how far the shrinker gets is a heuristic that varies run to run (a depthwise
# conv now and then stays depthwise), so these check one repeatable exploration.
def test_shrinks_to_a_one_layer_transpose_conv():
    spec = find(model_specs(tier="models"),
                lambda s: any(isinstance(l, Conv) and l.transpose for l in s.all_layers()),
                settings=settings(max_examples=500, database=None, derandomize=True))
    assert len(spec.layers) == 1 and spec.layers[0].transpose
    assert spec.layers[0].kernel_size == 1 and spec.layers[0].groups == 1


def test_shrinks_to_conv_bn():
    spec = find(model_specs(tier="models"),
                lambda s: any(isinstance(l, BatchNorm) for l in s.all_layers()),
                settings=settings(max_examples=500, database=None, derandomize=True))
    assert [type(l) for l in spec.layers] == [Conv, BatchNorm]
    bn = spec.layers[1]
    assert (bn.eps, bn.momentum, bn.zero_gamma) == (1e-5, 0.1, ())  # the simplest choices
    assert (bn.mean_shift, bn.var_scale, bn.gamma_scale, bn.beta_shift) == (0.0, 1.0, 1.0, 0.0)


def test_batchnorm_statistics_and_affine_parameters_are_drawn_far_from_the_seeded_ones():
    """Running statistics far from zero (mean shifted by -8 or 3), tiny and huge variances (x0.01,
    x25), small and large gammas (x0.05, x6), large betas: each drawn within a quick budget, in
    PTQ and QAT, and built into the model as its spec says."""
    seen: dict = {"mean_shift": set(), "var_scale": set(), "gamma_scale": set(), "beta_shift": set()}

    @settings(max_examples=60, deadline=None, database=None)
    @given(conv_bn_specs(), conv_bn_specs(qat=True))
    def check(ptq, qat):
        for spec in (ptq, qat):
            bn_spec = spec.layers[1]
            for name in seen:
                seen[name].add(getattr(bn_spec, name))
            plain = dataclasses.replace(spec, layers=(spec.layers[0], dataclasses.replace(
                bn_spec, mean_shift=0.0, var_scale=1.0, gamma_scale=1.0, beta_shift=0.0, zero_gamma=())))
            bn, base = _bn_of(spec), _bn_of(plain)
            assert torch.allclose(bn.running_mean, base.running_mean + bn_spec.mean_shift)
            assert torch.allclose(bn.running_var, base.running_var * bn_spec.var_scale)
            if bn_spec.affine:
                gamma = base.weight * bn_spec.gamma_scale
                gamma[list(bn_spec.zero_gamma)] = 0.0
                assert torch.allclose(bn.weight, gamma) and torch.allclose(bn.bias, base.bias + bn_spec.beta_shift)

    check()
    assert seen == {"mean_shift": {0.0, 3.0, -8.0}, "var_scale": {1.0, 0.01, 25.0},
                    "gamma_scale": {1.0, 0.05, 6.0}, "beta_shift": {0.0, 1.5, -4.0}}, seen


def _bn_of(spec):
    return next(m for m in spec.build().modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


@settings(max_examples=25, deadline=None, database=None)
@given(conv_bn_specs(), conv_bn_specs(qat=True, eps=st.sampled_from([1.0, 0.1]), momentum=0.5),
       conv_bn_specs(transpose=True, groups=True, dim=2))
def test_conv_bn_specs(spec, qat_spec, grouped_transpose):
    assert qat_spec.layers[1].eps in (1.0, 0.1) and qat_spec.layers[1].momentum == 0.5
    for s in (spec, qat_spec, grouped_transpose):
        assert [type(l) for l in s.layers] == [Conv, BatchNorm]
        s.build().eval()(torch.ones(s.input_shape))
    assert qat_spec.layers[1].zero_gamma == ()
    conv = grouped_transpose.layers[0]
    assert conv.transpose and conv.groups > 1 and conv.dim == 2


def test_malformed_specs_are_rejected():
    with pytest.raises(SpecError):
        ModelSpec((1, 3, 4, 4), (Conv(4, 4),))
    with pytest.raises(SpecError):
        ModelSpec((1, 3, 4, 4), (Residual((Conv(3, 5),)),))
    with pytest.raises(SpecError):  # (1, 5, 4, 4) @ (1, 3, 4, 4)^T: the batch dims differ
        ModelSpec((1, 3, 4, 4), (MatMul((Conv(3, 5),), ()),))
    with pytest.raises(SpecError):  # a matrix product needs matrices: (N, C) is not batched matrices
        ModelSpec((2, 3), (MatMul(),))


def test_matmul_spec_shapes_and_source():
    spec = ModelSpec((2, 4, 6), (MatMul((Conv(4, 4, dim=1),), ()),))
    assert spec.output_shape == (2, 4, 4) and spec.ops == {"conv1d", "matmul"}
    x = torch.ones(spec.input_shape)
    model = spec.build().eval()
    conv = model.conv0  # the left branch; the right one is the identity
    assert torch.equal(model(x), torch.matmul(conv(x), x.transpose(-1, -2)))


# ---------------------------------------------------------------------------- transformer pieces

QUICK_PATTERNS = 5  # properties/_support.PROFILES["quick"]["patterns"]


def _rank3_linear(spec) -> bool:
    shape, found = spec.input_shape, False
    for layer in spec.layers:
        found |= isinstance(layer, Linear) and len(shape) >= 3
        shape = layer.output_shape(shape)
    return found


def _attention(spec) -> bool:
    return any(isinstance(layer, Attention) for layer in spec.all_layers())


@pytest.mark.parametrize("seed", range(4))
def test_sequence_kinds_are_drawn_within_the_quick_budget(seed):
    """A property drawing the sequence kinds sees attention and a Linear on a 3-D/4-D input at
    the quick profile's pattern budget."""
    seen = []

    @settings(max_examples=QUICK_PATTERNS, deadline=None, database=None)
    @given(model_specs("pt2e", "patterns", kinds=SEQUENCE_KINDS))
    def collect(spec):
        seen.append(spec)

    from hypothesis import seed as hypothesis_seed
    hypothesis_seed(seed)(collect)()
    assert any(_attention(s) for s in seen) and any(_rank3_linear(s) for s in seen), seen


def test_sequence_kinds_reach_every_piece():
    seen = []

    @settings(max_examples=80, deadline=None, database=None)
    @given(model_specs("pt2e", "patterns", kinds=SEQUENCE_KINDS))
    def collect(spec):
        seen.append(spec)

    collect()
    layers = [layer for s in seen for layer in s.all_layers()]
    for kind in (LayerNorm, Softmax, Residual):
        assert any(isinstance(layer, kind) for layer in layers), kind
    for act in ("gelu", "silu"):
        assert any(act in s.ops for s in seen), act
    assert any(isinstance(layer, Attention) and layer.heads > 1 for layer in layers)
    assert any(len(s.input_shape) == 4 and _rank3_linear(s) for s in seen)
    assert any(isinstance(a, Linear) and isinstance(b, BatchNorm) and len(s.input_shape) == 3
               for s in seen for a, b in s.adjacent())  # #7: BatchNorm over dim 1 after a Linear on dim -1


def test_fx_never_draws_the_pt2e_only_ops():
    @settings(max_examples=40, deadline=None, database=None)
    @given(model_specs("fx", "patterns", kinds=SEQUENCE_KINDS), model_specs("fx", "models"))
    def check(pattern, model):
        assert not (pattern.ops | model.ops) & set(models_module.PT2E_ONLY_OPS)

    check()


def test_shrinks_to_one_attention_layer():
    spec = find(model_specs("pt2e", "patterns", kinds=SEQUENCE_KINDS), _attention,
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert spec.layers == (Residual((Attention(spec.input_shape[-1], 1),)),)
    assert spec.input_shape[-1] == 1 and len(spec.input_shape) == 3


def test_shrinks_to_one_linear_on_a_3d_input():
    spec = find(model_specs("pt2e", "patterns", kinds=SEQUENCE_KINDS), _rank3_linear,
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert spec.layers == (Linear(spec.input_shape[-1], 1),) and len(spec.input_shape) == 3


def test_batchnorm_without_affine_is_drawn_in_ptq_only():
    @settings(max_examples=60, deadline=None, database=None)
    @given(model_specs("pt2e", "models"), model_specs("pt2e", "models", qat=True))
    def check(ptq, qat):
        assert all(layer.affine for layer in qat.all_layers() if isinstance(layer, BatchNorm))
        seen.append(any(isinstance(layer, BatchNorm) and not layer.affine for layer in ptq.all_layers()))

    seen: list = []
    check()
    assert any(seen)


# ---------------------------------------------------------------------------- setups

@pytest.mark.parametrize("flow,qat", FLOWS)
def test_setups_round_trip_and_build(flow, qat):
    @settings(max_examples=15, deadline=None)
    @given(quant_setups(flow, qat=qat))
    def check(setup):
        assert eval(repr(setup), {"QuantSetup": QuantSetup}) == setup
        ns: dict = {}
        exec(setup.to_python(), ns)
        if flow == "pt2e":
            assert type(setup.quantizer()).__name__ in ("X86InductorQuantizer", "ArmInductorQuantizer", "QrefQuantizer")
            assert "quantizer" in ns
        else:
            assert setup.qconfig_mapping().global_qconfig is not None
            assert setup.backend_config() is not None and "backend_config" in ns

    check()


def test_pt2e_qref_setups_draw_int16_activations():
    setup = find(quant_setups("pt2e", qat=False), lambda s: s.act_dtype == "int16",
                 settings=settings(max_examples=200, database=None, derandomize=True))
    assert setup.kind == "qref" and "act_dtype=torch.int16" in setup.to_python()
    assert "act_qmin=-32768" in setup.to_python() and "act_qmax=32767" in setup.to_python()
    with pytest.raises(ValueError):
        QuantSetup("fx", kind="default", engine="fbgemm", reduce_range=True, act_dtype="int16")


def test_pt2e_setups_draw_torchaos_arm_inductor_quantizer():
    setup = find(quant_setups("pt2e", qat=False), lambda s: s.kind == "arm",
                 settings=settings(max_examples=200, database=None, derandomize=True))
    assert (setup.act_dtype, setup.per_channel, setup.symmetric) == ("int8", False, False)
    assert type(setup.quantizer()).__name__ == "ArmInductorQuantizer"
    with pytest.raises(ValueError):
        QuantSetup("pt2e", kind="arm", per_channel=True, act_dtype="int8", observer="histogram")


# examples of the pt2e equivalence family at the quick profile (properties/_support.PROFILES):
# single_op, large_tensor, fixed_qparams (ops: 6 each), two_input, pattern, sequence, qat_conv_bn,
# reference_representation (patterns: 5 each), model (models: 4)
QUICK_PT2E_EQUIVALENCE = 3 * 6 + 5 * 5 + 4


def _weighted_ops(spec) -> int:
    return sum(isinstance(layer, (Conv, Linear)) for layer in spec.all_layers()) + 4 * sum(
        isinstance(layer, Attention) for layer in spec.all_layers())


# ops QrefQuantizer quantizes with the graph's activation dtype, never with an int16 layer's
_INT8_OPS = {"add", "cat", "pool", "sigmoid", "tanh", "hardsigmoid", "softmax", "matmul", "gelu", "silu",
             "layer_norm", "attention"}


def _int16_meets_int8(spec, setup) -> bool:
    """Some int16 layer's activations meet int8 ones: another weighted op, or an op quantized
    with the graph's dtype."""
    return bool(setup.int16_layers) and (_weighted_ops(spec) >= 2 or bool(spec.ops & _INT8_OPS))


@pytest.mark.parametrize("seed", range(4))
def test_qref_setup_choices_are_drawn_within_the_quick_budget(seed):
    """Within the pt2e equivalence family's quick budget the setups draw each QrefQuantizer choice a
    mutant needs, on a model where it shows: a narrow or reduced activation range, per-channel
    weights on the input-channel axis, a dynamically quantized Linear, int16 layers among int8 ones."""
    from hypothesis import assume
    from hypothesis import seed as hypothesis_seed

    seen = []

    @settings(max_examples=QUICK_PT2E_EQUIVALENCE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(st.data())
    def collect(data):
        qat = data.draw(st.booleans(), label="qat")
        spec = data.draw(model_specs("pt2e", data.draw(st.sampled_from(["ops", "patterns", "models"])), qat))
        try:
            setup = data.draw(quant_setups("pt2e", qat=qat, model=spec))
        except ValueError:  # no quantizer takes the spec: cases() draws again
            assume(False)
        seen.append((spec, setup))

    hypothesis_seed(seed)(collect)()
    assert any(s.narrow_range or s.reduce_range for _, s in seen), "a narrow or reduced range"
    assert any(s.weight_axis == "input" for _, s in seen), "input-channel weights"
    assert any(s.dynamic and spec.ops & {"linear", "attention"} for spec, s in seen), "a dynamic Linear"
    assert any(_int16_meets_int8(spec, s) for spec, s in seen), "int16 among int8 layers"


@pytest.mark.parametrize("choice, field, value", [
    (lambda s: s.narrow_range, "narrow_range", True),
    (lambda s: s.weight_qrange is not None, "weight_qrange", (-128, 127)),
    (lambda s: s.weight_axis == "input", "weight_axis", "input"),
    (lambda s: s.dynamic, "dynamic", True),
    (lambda s: bool(s.int16_layers), "int16_layers", (0,)),
])
def test_qref_setup_choices_shrink_to_themselves(choice, field, value):
    """A failure needing one choice shrinks to the simplest setup with only that choice made."""
    setup = find(quant_setups("pt2e", qat=False), choice, settings=settings(max_examples=500, database=None))
    simplest = dict(kind="qref", per_channel=field == "weight_axis", act_dtype="int8", observer="minmax")
    assert setup == QuantSetup("pt2e", **simplest, **{field: value})
    assert setup.quantizer().config.act_qmin == (-127 if field == "narrow_range" else -128)


def test_qref_setup_choices_reach_the_quantizer():
    setup = QuantSetup("pt2e", kind="qref", act_dtype="uint8", narrow_range=True, reduce_range=True,
                       weight_qrange=(-64, 63), weight_axis="input", dynamic=True, int16_layers=(0, 2))
    config = setup.quantizer().config
    assert (config.act_qmin, config.act_qmax) == (0, 126)
    assert (config.weight_qmin, config.weight_qmax, config.weight_axis) == (-64, 63, "input")
    assert config.dynamic_linear and config.wide_layers == (0, 2)
    assert (config.wide_dtype, config.wide_qmin, config.wide_qmax) == (torch.int16, -16383, 16383)  # narrow: the most negative unused
    assert eval(repr(setup), {"QuantSetup": QuantSetup}) == setup
    for wrong in (dict(kind="x86", narrow_range=True), dict(kind="qref", act_dtype="int16", int16_layers=(0,)),
                  dict(kind="qref", per_channel=False, weight_axis="input"), dict(kind="qref", weight_qrange=(-1, 1)),
                  dict(kind="qref", dynamic=True, act_dtype="int16")):
        with pytest.raises(ValueError):
            QuantSetup("pt2e", **wrong)
    with pytest.raises(ValueError):
        QuantSetup("fx", kind="custom", engine="qnnpack", per_channel=False, narrow_range=True)


def test_setups_refuse_what_they_do_not_do():
    with pytest.raises(ValueError):
        QuantSetup("pt2e", kind="x86", act_dtype="int8")  # X86 activations are uint8
    with pytest.raises(ValueError):
        QuantSetup("fx", kind="default", engine="fbgemm", reduce_range=False)
    for dim, shape in ((1, (2, 3, 5)), (3, (1, 3, 4, 4, 2))):  # the Inductor quantizers annotate conv2d only
        conv = ModelSpec(shape, (Conv(3, 4, dim=dim),))
        assert not QuantSetup("pt2e", kind="x86").supports(conv)
        assert find(quant_setups("pt2e", model=conv), lambda s: True).kind == "qref"
    linear_tanh = ModelSpec((2, 6), (Linear(6, 4), Act("tanh")))  # onednn's LinearTanh fusion
    assert not QuantSetup("fx", kind="default", engine="onednn").supports(linear_tanh)
    assert QuantSetup("fx", kind="default", engine="qnnpack", per_channel=False).supports(linear_tanh)


@settings(max_examples=20, deadline=None, database=None)
@given(model_specs("pt2e", "patterns", qat=True, kinds=["linear_bn"]),
       model_specs("fx", "patterns", qat=True, kinds=["linear_bn"]))
def test_linear_bn_only_where_conversion_folds_it(pt2e_qat, fx_qat):
    assert not any(isinstance(b, BatchNorm) for a, b in pt2e_qat.adjacent() if isinstance(a, Linear))
    assert any(isinstance(b, BatchNorm) for a, b in fx_qat.adjacent() if isinstance(a, Linear))


# ---------------------------------------------------------------------------- cases

def _observers(model) -> int:
    return sum(1 for m in model.modules() if is_observer(m))


@pytest.mark.parametrize("flow,qat", FLOWS)
def test_cases_prepare_with_observers(flow, qat):
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases(flow, tier="patterns", qat=qat))
    def check(case):
        first, second = case.prepared(), case.prepared()
        assert first is not second and _observers(first) > 0
        assert case.setup.flow == flow and case.setup.qat == qat
        assert 2 <= len(case.calibration) <= 4
        assert len(case.inputs) == len(case.input_labels) == 4
        with torch.no_grad():
            for args in case.inputs:
                assert torch.isfinite(case.float_model()(*args)).all()
                first(*args)
        # a converter mutating its input does not leak into the next prepared() copy
        for p in first.parameters():
            p.data.add_(1.0)
        for a, b in zip(second.state_dict().values(), case.prepared().state_dict().values()):
            assert torch.equal(a, b)

    check()


def test_x86_setups_quantize_their_cases():
    @settings(max_examples=6, deadline=None)
    @given(cases("pt2e", tier="ops", qat=False).filter(lambda c: c.setup.kind == "x86"))
    def check(case):
        assert _observers(case.prepared()) > 0

    check()


def test_x86_dynamic_setups_are_drawn_and_quantize_at_run_time():
    """X86InductorQuantizer's is_dynamic config, PTQ and QAT: its conv and linear inputs get
    choose_qparams at convert; drawn within a quick budget, repr rebuilds it."""
    import qref
    from qref.pt2e.ops import CHOOSE_QPARAMS, is_call

    seen = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(quant_setups("pt2e"))
    def collect(setup):
        seen.append(setup)

    collect()
    assert {s.qat for s in seen if s.kind == "x86" and s.dynamic} == {False, True}
    setup = QuantSetup("pt2e", kind="x86", dynamic=True, observer="histogram")
    assert eval(repr(setup), {"QuantSetup": QuantSetup}) == setup and "dynamic=True" in setup.to_python()
    case = find(cases("pt2e", tier="ops", qat=False), lambda c: c.setup.kind == "x86" and c.setup.dynamic,
                settings=settings(max_examples=200, database=None, derandomize=True))
    converted = qref.convert_pt2e(case.prepared())
    assert any(is_call(n, CHOOSE_QPARAMS) for n in converted.graph.nodes)


def test_reproducer_script_rebuilds_model_and_inputs(tmp_path):
    case = find(cases("fx", tier="patterns", qat=False),
                lambda c: any(isinstance(l, BatchNorm) for l in c.spec.all_layers()),
                settings=settings(max_examples=200, database=None))
    script = tmp_path / "repro.py"
    script.write_text(case.to_python("qref-fx"))
    case.save_inputs(tmp_path / "inputs.pt")
    torch.save(case.spec.build().state_dict(), tmp_path / "expected.pt")
    check = textwrap.dedent(f"""
        import runpy, torch
        ns = runpy.run_path({str(script)!r}, run_name="qref_repro")
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        got = ns["build_model"]().state_dict()
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert len(ns["CALIBRATION"]) == {len(case.calibration)} and len(ns["INPUTS"]) == 4
        assert ns["LABELS"] == {list(case.input_labels)!r}
        assert torch.equal(ns["INPUTS"][1][0], torch.load({str(tmp_path / 'inputs.pt')!r})["input_1_0"])
        prepared = ns["prepare"]()
        assert "qconfig_mapping" in ns and "backend_config" in ns
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    compile(case.to_python("torchao-pt2e"), "repro.py", "exec")


def test_model_strategies_module_exports():
    for name in models_module.__all__:
        assert hasattr(models_module, name)


def test_pt2e_cases_draw_a_grouped_conv_transpose_with_per_channel_weights():
    """Its weight scales are out / groups (tests/test_prepare_preconditions.py): qref's quantizer
    derives the bias per output channel, so the suite converts and checks it like any conv."""
    from qref.strategies.cases import cases

    def grouped_transpose(case) -> bool:
        return case.setup.per_channel and any(
            isinstance(layer, Conv) and layer.transpose and layer.groups > 1 for layer in case.spec.all_layers())

    case = find(cases("pt2e", tier="ops", qat=False), grouped_transpose,
                settings=settings(max_examples=300, database=None, derandomize=True,
                                  suppress_health_check=list(HealthCheck)))
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    import qref

    expected = convert_pt2e(copy.deepcopy(case.prepared()))
    candidate = qref.convert_pt2e(copy.deepcopy(case.prepared()))
    for args in case.inputs:
        assert torch.equal(candidate(*args), expected(*args))
# ---------------------------------------------------------------------------- graphs beyond a chain

def _outputs(model, spec):
    with torch.no_grad():
        out = model(*spec.example_inputs())
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("tier", ["patterns", "models"])
@pytest.mark.parametrize("flow,qat", FLOWS)
def test_graph_specs_build_run_and_round_trip(flow, qat, tier):
    @FAST
    @given(model_specs(flow, tier, qat, kinds=GRAPH_KINDS + ("conv", "linear_act", "add")))
    def check(spec):
        model = spec.build()
        model = model.train() if qat else model.eval()
        assert tuple(tuple(o.shape) for o in _outputs(model, spec)) == spec.output_shapes
        assert eval(repr(spec), _namespace()) == spec
        ns: dict = {"__name__": "standalone"}
        exec(spec.to_python(), ns)
        assert f"def forward(self, {', '.join(['x'] + [f'input{i}' for i in range(1, len(spec.input_shapes))])}):" \
            in spec.to_python()
        rebuilt, built = ns["build_model"]().state_dict(), spec.build().state_dict()
        assert list(rebuilt) == list(built) and all(torch.equal(rebuilt[k], v) for k, v in built.items())
        assert _weighted(spec)

    check()


def _two_inputs(spec) -> bool:
    return len(spec.input_shapes) > 1


def _two_outputs(spec) -> bool:
    return len(spec.output_shapes) > 1


def _index_input(spec) -> bool:
    return any(vocab is not None for vocab in spec.index_ranges)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("flow", ["pt2e", "fx"])
@pytest.mark.parametrize("kind,shape", [("two_inputs", _two_inputs), ("two_outputs", _two_outputs),
                                        ("embedding", _index_input)])
def test_graph_kinds_are_drawn_within_the_quick_budget(kind, shape, flow, seed):
    """Each graph property's specs have their shape in every one of the quick budget's examples."""
    seen = []

    @settings(max_examples=QUICK_PATTERNS, deadline=None, database=None)
    @given(model_specs(flow, "patterns", kinds=(kind,)))
    def collect(spec):
        seen.append(spec)

    from hypothesis import seed as hypothesis_seed
    hypothesis_seed(seed)(collect)()
    assert seen and all(shape(s) for s in seen), seen


def test_graph_kinds_reach_every_join_and_branch():
    seen = []

    @settings(max_examples=80, deadline=None, database=None)
    @given(model_specs("pt2e", "patterns", kinds=("two_inputs",)), model_specs("pt2e", "models", kinds=GRAPH_KINDS
                                                                                + PATTERN_KINDS))
    def collect(pattern, model):
        seen.extend([pattern, model])

    collect()
    extra = [layer for s in seen for layer in s.all_layers() if isinstance(layer, ExtraInput)]
    assert {layer.join for layer in extra} == set(ExtraInput.JOINS)
    assert any(layer.body for layer in extra) and any(not layer.body for layer in extra)
    models = seen[1::2]
    assert any(_index_input(s) and len(s.layers) > 2 for s in models), "an embedding first, then more blocks"
    assert any(_two_inputs(s) for s in models) and any(_two_outputs(s) for s in models)


def test_default_kinds_keep_one_float_input_and_one_output():
    @settings(max_examples=60, deadline=None, database=None)
    @given(model_specs("pt2e", "models"), model_specs("fx", "patterns"))
    def check(model, pattern):
        for spec in (model, pattern):
            assert spec.input_shapes == (spec.input_shape,) and spec.index_ranges == (None,)
            assert spec.output_shapes == (spec.output_shape,)
            assert "def forward(self, x):" in spec.to_python() and "INPUT_SHAPES" not in spec.to_python()

    check()


def test_shrinks_to_a_matmul_with_the_second_input():
    spec = find(model_specs("pt2e", "patterns", kinds=("two_inputs",)),
                lambda s: any(isinstance(l, ExtraInput) and l.join == "matmul" for l in s.all_layers()),
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert spec == ModelSpec((2, 1, 1), (Conv(1, 1, dim=1), ExtraInput((2, 1, 1), join="matmul")))


def test_shrinks_to_a_second_input_through_its_own_layer():
    spec = find(model_specs("pt2e", "patterns", kinds=("two_inputs",)),
                lambda s: any(isinstance(l, ExtraInput) and l.body for l in s.all_layers()),
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert spec.layers == (Linear(1, 1), ExtraInput((2, 1), (Linear(1, 1, bias=False),)))


def test_shrinks_to_two_outputs_around_one_layer():
    spec = find(model_specs("pt2e", "patterns", kinds=("two_outputs",)), _two_outputs,
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert [type(l) for l in spec.layers] == [Linear, AlsoOutput, Linear] and len(spec.input_shape) == 2


def test_shrinks_to_one_embedding_then_linear():
    spec = find(model_specs("pt2e", "patterns", kinds=("embedding",)), _index_input,
                settings=settings(max_examples=300, database=None, derandomize=True))
    assert spec == ModelSpec((2, 1), (Embedding(1, 1), Linear(1, 1)))


def test_graph_spec_shapes_and_source():
    spec = ModelSpec((2, 5), (Embedding(6, 4), Linear(4, 3), AlsoOutput(),
                              ExtraInput((2, 5, 3), (Linear(3, 3),), "cat"), Linear(3, 2)))
    assert spec.input_shapes == ((2, 5), (2, 5, 3)) and spec.index_ranges == (6, None)
    assert spec.output_shapes == ((2, 5, 3), (2, 10, 2)) and spec.ops == {"embedding", "linear", "extra_input", "cat", "extra_output"}
    model = spec.build().eval()
    indices, y = torch.tensor([[0, 5, 1, 2, 3]] * 2), torch.randn(2, 5, 3)
    h = model.fc1(model.embedding0(indices))
    expected = model.fc3(torch.cat([h, model.fc2(y)], dim=1))
    first, second = model(indices, y)
    assert torch.equal(first, h) and torch.equal(second, expected)


def test_malformed_graph_specs_are_rejected():
    with pytest.raises(SpecError):  # an embedding reads indices, i.e. a graph input
        ModelSpec((2, 3), (Linear(3, 4), Flatten(), Embedding(4, 2)))
    with pytest.raises(SpecError):  # an output only at the top level
        ModelSpec((2, 3, 4, 4), (Residual((AlsoOutput(),)),))
    with pytest.raises(SpecError):  # added inputs must have the same shape
        ModelSpec((2, 3, 4, 4), (ExtraInput((2, 2, 4, 4)),))
    with pytest.raises(SpecError):
        ModelSpec((2, 3, 4, 4), (ExtraInput((2, 3, 4, 4), join="sub"),))
    with pytest.raises(SpecError):  # a shared layer reads no graph input
        ModelSpec((2, 3, 4, 4), (Shared(Conv(3, 3), (ExtraInput((2, 3, 4, 4)),)),))


def _placeholders_quantized_apart(prepared) -> bool:
    from qref.strategies.cases import _input_qparams

    qparams = [_input_qparams(prepared, i) for i in range(2)]
    return None not in qparams and qparams[0] != qparams[1]


@pytest.mark.parametrize("flow", ["pt2e", "fx"])
def test_two_input_cases_calibrate_and_evaluate_every_input(flow):
    seen = []

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases(flow, qat=False, model=model_specs(flow, "patterns", kinds=("two_inputs",))))
    def check(case):
        shapes = case.spec.input_shapes
        for args in case.calibration + case.inputs:
            assert tuple(tuple(t.shape) for t in args) == shapes
        assert len(case.inputs) == len(case.input_labels) == 4
        with torch.no_grad():  # a copy: running the prepared model moves its observers
            for args in case.inputs:
                case.prepared()(*args)
        prepared = case.prepared()
        apart = _placeholders_quantized_apart(prepared)
        if apart:  # ties of each input's own scale: (k + 1/2) * scale
            from qref.strategies.cases import _input_qparams

            scale = _input_qparams(prepared, 1)[0]
            ties = case.inputs[3][1].double() / scale - 0.5
            assert torch.allclose(ties, ties.round(), atol=1e-3), "ties of the second input's scale"
        seen.append(apart)

    check()
    assert any(seen), "some case quantizes its two graph inputs with their own qparams"


def test_embedding_cases_draw_valid_indices_and_quantize_the_table_per_row():
    from qref.quantizers import embedding_weight_spec

    seen = []

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases("pt2e", model=model_specs("pt2e", "patterns", kinds=("embedding",))))
    def check(case):
        (vocab,) = case.spec.index_ranges
        for (indices,) in case.calibration + case.inputs:
            assert indices.dtype == torch.int64 and 0 <= int(indices.min()) and int(indices.max()) < vocab
        prepared = case.prepared()
        (lookup,) = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.embedding.default]
        table = lookup.args[0]
        if case.setup.kind == "qref":
            observer = prepared.get_submodule(table.target)
            spec = embedding_weight_spec()
            assert (observer.dtype, observer.qscheme, observer.ch_axis) == (spec.dtype, spec.qscheme, 0)
            seen.append(case.setup.qat)
        else:  # the Inductor quantizers leave the lookup float
            assert table.op == "get_attr"

    check()
    assert seen, "qref's quantizer quantized some table"


def test_reproducer_of_a_graph_case_runs(tmp_path):
    spec = ModelSpec((2, 5), (Embedding(6, 4), Linear(4, 3), AlsoOutput(), ExtraInput((2, 5, 3)), Linear(3, 2)))
    case = find(cases("pt2e", qat=False, model=st.just(spec)), lambda c: c.setup.kind == "qref",
                settings=settings(max_examples=50, database=None))
    script = tmp_path / "repro.py"
    script.write_text(case.to_python("qref-pt2e"))
    case.save_inputs(tmp_path / "inputs.pt")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "and 2 outputs: 0 LSB" in result.stdout, result.stdout  # both outputs compared, on both inputs
