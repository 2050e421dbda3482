"""The mutants in tests/mutants/ are usable and really plant their bug.

For each mutant: its target imports, its signature is the contract of the converter it replaces,
and on its witness (zoo model, setup) the result differs from qref's in the planted way, and
(where the bug is conditional) not elsewhere.  A mutant that silently stopped planting its bug
would make the property suite look stronger than it is.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools

import pytest
import torch
from torch import fx, nn

import qref
from fixtures import fx_setups
from fixtures.prepare import calibration_inputs, inputs, observer_nodes
from fixtures.zoo import ZOO
from qref.observers import is_observer
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call, real_users, schema_arguments
from tests.mutants import MUTANTS
from tests.mutants._graph import activation_quantizes, attr

qd = torch.ops.quantized_decomposed
REFERENCE = {"pt2e": qref.convert_pt2e, "fx": qref.convert_fx}


def _contract(fn):
    """Parameters as (name, kind, default); the model comes first, positionally, under any name
    (qref.convert_fx calls it ``graph_module`` like torch, the brief's contract ``model``)."""
    first, *rest = inspect.signature(fn).parameters.values()
    return [(first.kind, first.default)] + [(p.name, p.kind, p.default) for p in rest]


def _run(gm, batches):
    with torch.no_grad():
        return [gm(*batch) for batch in batches]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- the registry and the contract ---------------------------------------------------------------


def test_registry_covers_enough_distinct_bug_classes():
    mutants = list(MUTANTS.values())
    assert len(mutants) >= 18
    assert sum(m.flow == "fx" for m in mutants) >= 4
    classes = [m.bug_class for m in mutants]
    assert len(set(classes)) == len(classes), "one bug class per mutant"
    assert set(MUTANTS) == set(PLANTED), "every mutant has a witness check below"


@pytest.mark.parametrize("name", MUTANTS)
def test_importable_with_the_converter_contract(name):
    mutant = MUTANTS[name]
    fn = mutant.load()
    assert mutant.target.startswith("tests.mutants.")
    assert _contract(fn) == _contract(REFERENCE[mutant.flow])
    doc = (fn.__doc__ or "").strip()
    assert doc and "\n" not in doc, "a one-line docstring naming the bug"
    model, setup, qat = mutant.witness
    assert model in ZOO
    if mutant.flow == "pt2e":
        from qref.quantizers import SETUPS

        assert SETUPS[setup].is_qat == qat
    else:
        assert fx_setups.unsupported(ZOO[model], fx_setups.SETUPS[setup], qat) is None


@pytest.mark.parametrize(
    "name", [n for n, m in MUTANTS.items() if m.flow == "pt2e" and m.witness[0] != "mobilenet_v2_like"]
)
def test_pt2e_mutant_accepts_every_flag_combination(name, prepared_cache):
    mutant = MUTANTS[name]
    model, setup, _ = mutant.witness
    for ref, fold in itertools.product([False, True], repeat=2):
        out = mutant.load()(prepared_cache.get(model, setup), ref, fold)
        assert isinstance(out, fx.GraphModule)
        _run(out, [inputs(model, 0)])


@pytest.mark.parametrize("name", [n for n, m in MUTANTS.items() if m.flow == "pt2e"])
@pytest.mark.parametrize("model", ["sigmoid_tanh", "attention"])
def test_pt2e_mutant_runs_beyond_its_witness(name, model, prepared_cache):
    """Pools, flatten, matmul, softmax: a mutant that raises on them would be "killed" by its
    crash, not by the bug it plants."""
    out = MUTANTS[name].load()(prepared_cache.get(model, "qref_int8_sym"))
    _run(out, [inputs(model, 0)])


# --- each mutant plants its bug on its witness -----------------------------------------------------


class Pt2eWitness:
    """The mutant's and qref's conversions of the witness (fresh prepared copies for each)."""

    def __init__(self, mutant, cache, **flags):
        self.mutant, self.cache, self.flags = mutant, cache, flags
        self.model_name, self.setup, _ = mutant.witness
        self.ours = qref.convert_pt2e(self.prepared(), **flags)
        self.theirs = mutant.load()(self.prepared(), **flags)

    def prepared(self, model_name=None):
        return self.cache.get(model_name or self.model_name, self.setup)

    def calibration(self):  # inside the observed ranges (prepare uses seed 0, 4 batches)
        return calibration_inputs(self.model_name, 0, 4)

    def outputs_differ(self, batches=None) -> bool:
        batches = batches or [inputs(self.model_name, s) for s in range(3)]
        return not _same(_run(self.ours, batches), _run(self.theirs, batches))

    def same_elsewhere(self, model_name, setup=None) -> bool:
        """On another (model, setup) the mutant agrees with qref exactly."""
        setup = setup or self.setup
        a = qref.convert_pt2e(self.cache.get(model_name, setup), **self.flags)
        b = self.mutant.load()(self.cache.get(model_name, setup), **self.flags)
        batches = [inputs(model_name, s) for s in range(3)]
        return _same(_run(a, batches), _run(b, batches))


def _weight_scales(gm):
    """Scale buffers of the int8 per-channel weight dequantizes, in graph order."""
    return [attr(gm, n.args[1]) for n in gm.graph.nodes
            if is_call(n, (qd.dequantize_per_channel.default,)) and n.args[-2] != 2**31 - 1]  # fmt: skip


def _int32_bias_scales(gm):
    return [attr(gm, n.args[1]) for n in gm.graph.nodes
            if is_call(n, (qd.dequantize_per_channel.default,)) and n.args[-2] == 2**31 - 1]  # fmt: skip


def check_round_half_away(w: Pt2eWitness):
    q = activation_quantizes(w.ours)[0]  # quantizes the model input
    scale = schema_arguments(q)["scale"]
    halves = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    x = halves * scale
    ties = x[x * (1.0 / scale) == halves]  # exact ties in float32, as the quantize computes them
    assert (ties * (1.0 / scale)).floor().remainder(2).eq(0).sum() >= 4, "ties where even != away"
    shape = inputs(w.model_name, 0)[0].shape
    tie_batch = (ties.repeat(shape.numel() // ties.numel() + 1)[: shape.numel()].reshape(shape),)
    assert not w.outputs_differ(w.calibration())
    assert w.outputs_differ([tie_batch])


def check_saturation_wraps(w: Pt2eWitness):
    inside = [tuple(0.5 * x for x in batch) for batch in w.calibration()]
    assert not w.outputs_differ(inside)
    assert w.outputs_differ([inputs(w.model_name, 0, scale=100.0)])


def check_zero_point_off_by_one(w: Pt2eWitness):
    q = activation_quantizes(w.theirs)[0]
    dq = next(u for u in q.users if is_call(u, DEQUANTIZE))
    assert schema_arguments(dq)["zero_point"] == schema_arguments(q)["zero_point"] + 1
    assert w.outputs_differ()


def check_uint8_stored_signed(w: Pt2eWitness):
    assert {schema_arguments(q)["dtype"] for q in activation_quantizes(w.theirs)} == {torch.int8}
    assert {schema_arguments(q)["dtype"] for q in activation_quantizes(w.ours)} == {torch.uint8}
    assert not w.outputs_differ()  # the same real values: no numeric comparison sees it


def check_int16_as_int8(w: Pt2eWitness):
    ranges = {(schema_arguments(q)["quant_min"], schema_arguments(q)["quant_max"]) for q in activation_quantizes(w.theirs)}
    assert ranges == {(-128, 127)}
    assert w.outputs_differ()
    assert w.same_elsewhere("linear", "qref_int8_sym")  # 8-bit activations are left as they are


def check_rank3_linear_input_float(w: Pt2eWitness):
    assert len(activation_quantizes(w.theirs)) < len(activation_quantizes(w.ours))
    assert w.outputs_differ()
    assert w.same_elsewhere("linear")  # a Linear on a 2-D input keeps its quantize


def check_conv3d_input_float(w: Pt2eWitness):
    assert len(activation_quantizes(w.theirs)) < len(activation_quantizes(w.ours))
    assert w.outputs_differ()
    assert w.same_elsewhere("conv_bn_relu")  # conv2d keeps its quantize


def check_large_tensor_tail(w: Pt2eWitness):
    assert w.outputs_differ([inputs(w.model_name, 0)])  # one batch: the witness is the big model
    assert w.same_elsewhere("conv_bn_relu")  # no activation there has more than 4096 elements


def check_nondeterministic_scale(w: Pt2eWitness):
    again = w.mutant.load()(w.prepared())
    batches = [inputs(w.model_name, s) for s in range(3)]
    assert not _same(_run(w.theirs, batches), _run(again, batches))


def check_fixed_qparams_recomputed(w: Pt2eWitness):
    def sigmoid_tanh_scales(gm):
        return [schema_arguments(q)["scale"] for q in activation_quantizes(gm)
                if is_call(q.args[0], (torch.ops.aten.sigmoid.default, torch.ops.aten.tanh.default))]

    ours, theirs = sigmoid_tanh_scales(w.ours), sigmoid_tanh_scales(w.theirs)
    assert sorted(ours) == [1 / 256, 2 / 256]  # the witness quantizes one sigmoid and one tanh
    assert theirs == [s * 256 / 255 for s in ours]
    assert w.outputs_differ()
    assert w.same_elsewhere("conv_bn_relu")


def check_second_input_reads_first_qparams(w: Pt2eWitness):
    def binary_inputs(gm):
        return [[(schema_arguments(a)["scale"], schema_arguments(a)["zero_point"]) for a in n.args[:2]]
                for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor]

    ours, theirs = binary_inputs(w.ours), binary_inputs(w.theirs)
    assert ours and all(a != b for a, b in ours), "the witness's add inputs have their own qparams"
    assert theirs == [[a, a] for a, _ in ours]
    assert w.outputs_differ()
    assert w.same_elsewhere("conv_bn_relu")


def check_per_channel_scales_reversed(w: Pt2eWitness):
    pairs = list(zip(_weight_scales(w.ours), _weight_scales(w.theirs), strict=True))
    assert pairs and all(torch.equal(b, a.flip(0)) for a, b in pairs)
    assert w.outputs_differ()


def check_per_channel_collapsed(w: Pt2eWitness):
    pairs = list(zip(_weight_scales(w.ours), _weight_scales(w.theirs), strict=True))
    assert pairs and all(torch.equal(b, torch.full_like(a, a.max().item())) for a, b in pairs)
    assert w.outputs_differ()


def check_grouped_conv_scales_misindexed(w: Pt2eWitness):
    assert w.outputs_differ()
    assert w.same_elsewhere("conv_bn_relu")  # groups == 1
    assert w.same_elsewhere("depthwise_conv")  # one channel per group: the same index


def check_bias_scale_input_only(w: Pt2eWitness):
    input_scale = schema_arguments(activation_quantizes(w.ours)[0])["scale"]
    ours, theirs = _int32_bias_scales(w.ours), _int32_bias_scales(w.theirs)
    assert ours and torch.all(theirs[0] == input_scale) and not torch.equal(ours[0], theirs[0])
    assert w.outputs_differ()


def check_qat_fold_bug(w: Pt2eWitness):
    assert w.outputs_differ()
    assert w.same_elsewhere(w.model_name, "qref_int8_sym")  # PTQ: no QAT fold, no bug


def check_shared_weight_quantized_once(w: Pt2eWitness):
    assert not w.outputs_differ()  # every weight of the zoo model has one user: nothing to see
    from tests.test_shared_weights import _case  # a conv1d module called twice

    case = _case(qat=False)
    ours, theirs = qref.convert_pt2e(case.prepared()), w.mutant.load()(case.prepared())
    assert not _same(_run(ours, case.inputs), _run(theirs, case.inputs))


def check_bn_beta_dropped(w: Pt2eWitness):
    assert w.outputs_differ()
    zero_beta = w.prepared()  # the same QAT model with every BatchNorm's beta at zero
    for node in zero_beta.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target) and node.args[2] is not None:
            attr(zero_beta, node.args[2]).data.zero_()
    batches = [inputs(w.model_name, s) for s in range(3)]
    ours, theirs = qref.convert_pt2e(copy.deepcopy(zero_beta)), w.mutant.load()(copy.deepcopy(zero_beta))
    assert _same(_run(ours, batches), _run(theirs, batches))


def check_folded_weights_written_back(w: Pt2eWitness):
    def mutated_by(convert) -> list[str]:
        model = w.prepared()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        convert(model)
        return [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]

    assert mutated_by(qref.convert_pt2e) == []
    assert "conv1.weight" in mutated_by(w.mutant.load())


def check_consumes_and_writes_back(w: Pt2eWitness):
    model = w.prepared()
    graph = str(model.graph)
    weight = model.state_dict(keep_vars=True)["conv1.weight"]
    before = weight.detach().clone()
    w.mutant.load()(model)
    assert str(model.graph) != graph, "converts in place"
    assert not torch.equal(weight.detach(), before), "writes through the prepared model's weight"


def check_keeps_state_between_calls(w: Pt2eWitness):
    x = inputs(w.model_name, 0)
    with torch.no_grad():
        ours = [w.ours(*x) for _ in range(2)]
        theirs = [w.theirs(*x) for _ in range(2)]
    assert torch.equal(ours[0], ours[1])
    assert torch.equal(theirs[0], ours[0]), "the first call is right"
    assert not torch.equal(theirs[1], theirs[0]), "a second call on the same input differs"


def check_dropped_qdq(w: Pt2eWitness):
    def count(gm):
        return sum(is_call(n, QUANTIZE) for n in gm.graph.nodes)

    assert count(w.theirs) == count(w.ours) - 1
    assert w.outputs_differ()


def check_observer_left(w: Pt2eWitness):
    assert observer_nodes(w.ours) == []
    assert len(observer_nodes(w.theirs)) == 1
    assert any(is_observer(m) for m in w.theirs.modules())


def check_shared_dequantize(w: Pt2eWitness):
    def shared(gm):
        return [n for n in gm.graph.nodes if is_call(n, DEQUANTIZE) and len(real_users(n)) > 1]

    assert shared(w.ours) == [] and shared(w.theirs)
    assert not w.outputs_differ()


def check_metadata_lost(w: Pt2eWitness):
    def with_trace(gm):
        return [n.name for n in gm.graph.nodes
                if n.name.startswith(("quantize_", "dequantize_")) and "stack_trace" in n.meta]  # fmt: skip

    assert with_trace(w.ours) and not with_trace(w.theirs)
    assert not w.outputs_differ()


def check_fold_quantize_ignored(w: Pt2eWitness):
    def weight_quantizes(gm):
        return [n for n in gm.graph.nodes if is_call(n, (qd.quantize_per_channel.default,))]

    ours = qref.convert_pt2e(w.prepared(), fold_quantize=False)
    theirs = w.mutant.load()(w.prepared(), fold_quantize=False)
    assert weight_quantizes(ours) and not weight_quantizes(theirs)
    assert w.ours.code == w.theirs.code  # the default (True) is honoured


def check_reference_representation_ignored(w: Pt2eWitness):
    ours = qref.convert_pt2e(w.prepared(), use_reference_representation=True)
    theirs = w.mutant.load()(w.prepared(), use_reference_representation=True)
    assert ours.code != theirs.code and theirs.code == w.ours.code


# --- fx ----------------------------------------------------------------------------------------


class FxWitness:
    def __init__(self, mutant):
        self.mutant = mutant
        self.model_name, self.setup_name, self.qat = mutant.witness
        self.setup = fx_setups.SETUPS[self.setup_name]

    def prepared(self):
        return copy.deepcopy(fx_setups.prepared(self.model_name, self.setup_name, self.qat)[0])

    def batches(self):
        return [ZOO[self.model_name].example_inputs(torch.Generator().manual_seed(100 + s)) for s in range(3)]

    def both(self, **kwargs):
        """(qref.convert_fx, mutant) on fresh copies of the prepared witness, same arguments."""
        ours = qref.convert_fx(self.prepared(), **copy.deepcopy(kwargs))
        return ours, self.mutant.load()(self.prepared(), **copy.deepcopy(kwargs))


def check_output_scale_off(w: FxWitness):
    ours, theirs = w.both()
    pairs = [(a.scale, b.scale) for a, b in zip(ours.modules(), theirs.modules())
             if isinstance(getattr(a, "scale", None), float)]  # fmt: skip
    assert pairs and all(b == a * (1 + 2**-10) for a, b in pairs)


def check_weight_scales_collapsed(w: FxWitness):
    ours, theirs = w.both()
    schemes = (torch.per_channel_affine, torch.per_channel_symmetric)
    per_channel = [(a.weight(), b.weight()) for a, b in zip(ours.modules(), theirs.modules())
                   if callable(getattr(a, "weight", None)) and a.weight().qscheme() in schemes]
    assert per_channel
    for a, b in per_channel:
        assert len(set(b.q_per_channel_scales().tolist())) == 1 < len(set(a.q_per_channel_scales().tolist()))
    with torch.no_grad():
        x = inputs(w.model_name, 0)
        assert not torch.equal(ours(*x), theirs(*x))


def check_none_qconfig_ignored(w: FxWitness):
    mapping = w.setup.convert_mapping(w.setup.mapping(w.qat), w.prepared())
    ours, theirs = w.both(qconfig_mapping=mapping)
    first = "conv1"  # the first weighted module is skipped (None) by fbgemm_skip's convert mapping
    assert type(getattr(ours, first)) in (nn.Conv2d, torch.ao.nn.intrinsic.ConvReLU2d)
    assert type(getattr(theirs, first)).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    assert not _same(_run(ours, w.batches()), _run(theirs, w.batches()))


def check_qconfig_kept(w: FxWitness):
    ours, theirs = w.both()

    def with_qconfig(gm):
        return [name for name, m in gm.named_modules() if getattr(m, "qconfig", None) is not None]

    assert with_qconfig(ours) == [] and with_qconfig(theirs)


def check_preserved_attributes_dropped(w: FxWitness):
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig

    config = ConvertCustomConfig().set_preserved_attributes(["my_flag"])

    def flagged():
        model = w.prepared()
        model.my_flag = 7
        return model

    assert qref.convert_fx(flagged(), convert_custom_config=config).my_flag == 7
    assert not hasattr(w.mutant.load()(flagged(), convert_custom_config=config), "my_flag")
    assert config.preserved_attributes == ["my_flag"]  # the caller's config is not touched


def check_backend_config_ignored(w: FxWitness):
    from torch.ao.quantization.backend_config import BackendConfig, get_native_backend_config

    keep = [c for c in get_native_backend_config().configs
            if c.pattern not in (nn.Linear, torch.nn.functional.linear)]  # fmt: skip
    no_linear = BackendConfig("no_linear").set_backend_pattern_configs(keep)
    ours, theirs = w.both(backend_config=no_linear)
    assert type(ours.fc) is nn.Linear
    assert type(theirs.fc) is torch.ao.nn.quantized.Linear


def check_fixed_qparams_requantized(w: FxWitness):
    ours, theirs = w.both()  # the zoo witness calls torch.sigmoid / torch.tanh (functions)
    assert not _same(_run(ours, w.batches()), _run(theirs, w.batches()))
    retargeted = [n.target.__name__ for n in theirs.graph.nodes if n.op == "call_function"
                  and n.target.__name__.endswith("_for_range")]
    assert retargeted == ["_sigmoid_for_range", "_tanh_for_range"]
    assert [n.name for n in theirs.graph.nodes] == [n.name for n in ours.graph.nodes]
    # model specs use modules (nn.Sigmoid / nn.Tanh / nn.Hardsigmoid): that path too
    from qref.strategies.cases import prepare_case
    from qref.strategies.models import Act, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    setup = QuantSetup("fx", kind="default", engine="fbgemm", reduce_range=True)
    x = torch.linspace(-3, 3, 150).reshape(2, 3, 5, 5)
    for kind in ("sigmoid", "tanh", "hardsigmoid"):
        prepared = prepare_case(ModelSpec((2, 3, 5, 5), (Conv(3, 3), Act(kind))), setup, [(x,)])
        with qref.use_engine("fbgemm"):
            a = qref.convert_fx(copy.deepcopy(prepared))(x)
            b = w.mutant.load()(copy.deepcopy(prepared))(x)
        assert not torch.equal(a, b), kind


def check_bn_eps_default(w: FxWitness):
    model = w.prepared()
    eps = [m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(e != 1e-5 for e in eps), "the witness must have a non-default eps"
    ours, theirs = w.both()
    assert not _same(_run(ours, w.batches()), _run(theirs, w.batches()))
    w.mutant.load()(model)
    assert [m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == eps


def _batches_of_ranges(w: FxWitness):
    """The witness's batches at growing magnitudes (a dynamic quantize picks other qparams for each)."""
    return [tuple(x * factor for x in batch) for batch, factor in zip(w.batches(), (1.0, 10.0, 0.1))]


def check_dynamic_activation_qparams_frozen(w: FxWitness):
    ours, theirs = w.both()
    dynamic = [m for m in theirs.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert dynamic and [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]
    assert not _same(_run(ours, _batches_of_ranges(w)), _run(theirs, _batches_of_ranges(w)))
    # static setups are left as they are
    static = FxWitness(MUTANTS["output_scale_off"])  # mlp on fbgemm's default mapping
    a, b = qref.convert_fx(static.prepared()), w.mutant.load()(static.prepared())
    assert _same(_run(a, static.batches()), _run(b, static.batches()))


def check_float16_weights_truncated(w: FxWitness):
    ours, theirs = w.both()
    pairs = [(a._weight_bias()[0], b._weight_bias()[0]) for a, b in zip(ours.modules(), theirs.modules())
             if isinstance(a, torch.ao.nn.quantized.dynamic.Linear)]
    assert pairs and all(a.dtype == b.dtype == torch.float for a, b in pairs)
    assert all((b.abs() <= a.abs()).all() and not torch.equal(a, b) for a, b in pairs), "cast toward zero"
    assert not _same(_run(ours, w.batches()), _run(theirs, w.batches()))
    int8 = FxWitness(MUTANTS["dynamic_activation_qparams_frozen"])  # int8 dynamic: left as it is
    a, b = qref.convert_fx(int8.prepared()), w.mutant.load()(int8.prepared())
    assert _same(_run(a, int8.batches()), _run(b, int8.batches()))


def check_regex_none_entries_ignored(w: FxWitness):
    mapping = w.setup.convert_mapping(w.setup.mapping(w.qat), w.prepared())
    assert mapping.module_name_regex_qconfigs and not mapping.module_name_qconfigs
    ours, theirs = w.both(qconfig_mapping=mapping)
    first = "conv1"  # the regex entry matches the first weighted module only
    assert type(getattr(ours, first)) in (nn.Conv2d, torch.ao.nn.intrinsic.ConvReLU2d)
    assert type(getattr(theirs, first)).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    # the same skip by module name is honoured
    skip = FxWitness(MUTANTS["none_qconfig_ignored"])  # conv_bn_relu, fbgemm_skip
    by_name = skip.setup.convert_mapping(skip.setup.mapping(False), skip.prepared())
    a = qref.convert_fx(skip.prepared(), qconfig_mapping=copy.deepcopy(by_name))
    b = w.mutant.load()(skip.prepared(), qconfig_mapping=copy.deepcopy(by_name))
    assert _same(_run(a, skip.batches()), _run(b, skip.batches()))


def check_preserved_attributes_not_recorded(w: FxWitness):
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig

    config = ConvertCustomConfig().set_preserved_attributes(["my_flag"])

    def flagged():
        model = w.prepared()
        model.my_flag = [7]
        return model

    ours, theirs = (convert(flagged(), convert_custom_config=config) for convert in (qref.convert_fx, w.mutant.load()))
    assert ours.my_flag == theirs.my_flag == [7], "set on the converted model"
    assert copy.deepcopy(ours).my_flag == [7]
    assert not hasattr(copy.deepcopy(theirs), "my_flag"), "lost by a deepcopy"


def _placeholder_qparams(gm) -> list:
    return [(schema_arguments(q)["scale"], schema_arguments(q)["zero_point"])
            for q in activation_quantizes(gm) if q.args[0].op == "placeholder"]


def check_every_graph_input_gets_first_qparams(w: Pt2eWitness):
    ours, theirs = _placeholder_qparams(w.ours), _placeholder_qparams(w.theirs)
    assert len(ours) == 2 and ours[0] != ours[1], "the witness's two inputs have their own qparams"
    assert theirs == [ours[0], ours[0]]
    assert w.outputs_differ()
    assert w.same_elsewhere("residual_add")  # one graph input: nothing to get wrong


def _outputs(gm) -> tuple:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    return tuple(output.args[0])


def check_later_outputs_left_float(w: Pt2eWitness):
    assert all(is_call(o, DEQUANTIZE) for o in _outputs(w.ours)) and len(_outputs(w.ours)) == 2
    first, second = _outputs(w.theirs)
    assert is_call(first, DEQUANTIZE) and not is_call(second, DEQUANTIZE)
    with torch.no_grad():
        batch = inputs(w.model_name, 0)
        (ours_h, ours_y), (theirs_h, theirs_y) = w.ours(*batch), w.theirs(*batch)
    assert torch.equal(ours_h, theirs_h) and not torch.equal(ours_y, theirs_y)
    assert w.same_elsewhere("conv_bn_relu")  # one output


def check_embedding_zero_points_rounded(w: Pt2eWitness):
    def table_zero_points(gm):
        (lookup,) = [n for n in gm.graph.nodes if is_call(n, (torch.ops.aten.embedding.default,))]
        return attr(gm, lookup.args[0].args[2])

    ours, theirs = table_zero_points(w.ours), table_zero_points(w.theirs)
    assert ours.dtype.is_floating_point and not torch.equal(ours, ours.round()), "float zero points"
    assert torch.equal(theirs, ours.round())
    assert w.outputs_differ()
    assert w.same_elsewhere("linear")  # an affine weight's zero points are integers already


def _fx_input_qparams(gm) -> list:
    return [tuple(float(getattr(gm, a.target)) for a in n.args[1:3]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.quantize_per_tensor and n.args[0].op == "placeholder"]


def check_fx_every_graph_input_gets_first_qparams(w: FxWitness):
    ours, theirs = w.both()
    assert len(_fx_input_qparams(ours)) == 2 and len(set(_fx_input_qparams(ours))) == 2
    assert _fx_input_qparams(theirs) == [_fx_input_qparams(ours)[0]] * 2
    assert not _same(_run(ours, w.batches()), _run(theirs, w.batches()))
    one_input = FxWitness(dataclasses.replace(w.mutant, witness=("conv_bn_relu", "fbgemm", False)))
    ours, theirs = one_input.both()
    assert _same(_run(ours, one_input.batches()), _run(theirs, one_input.batches()))


def check_conv3d_not_lowered(w: FxWitness):
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.intrinsic.quantized as nniq

    ours, theirs = w.both()
    lowered = (nnq.Conv3d, nniq.ConvReLU3d)
    assert any(isinstance(m, lowered) for m in ours.modules())
    assert not any(isinstance(m, lowered) for m in theirs.modules())  # left a reference module
    elsewhere = FxWitness(dataclasses.replace(w.mutant, witness=("conv_bn_relu", "fbgemm", False)))
    ours, theirs = elsewhere.both()
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]  # 2-D convs still lowered
    assert _same(_run(ours, elsewhere.batches()), _run(theirs, elsewhere.batches()))


PLANTED = {
    "round_half_away": check_round_half_away,
    "saturation_wraps": check_saturation_wraps,
    "zero_point_off_by_one": check_zero_point_off_by_one,
    "large_tensor_tail": check_large_tensor_tail,
    "int16_as_int8": check_int16_as_int8,
    "uint8_stored_signed": check_uint8_stored_signed,
    "weight_scales_collapsed": check_weight_scales_collapsed,
    "rank3_linear_input_float": check_rank3_linear_input_float,
    "conv3d_input_float": check_conv3d_input_float,
    "nondeterministic_scale": check_nondeterministic_scale,
    "per_channel_scales_reversed": check_per_channel_scales_reversed,
    "per_channel_collapsed": check_per_channel_collapsed,
    "grouped_conv_scales_misindexed": check_grouped_conv_scales_misindexed,
    "bias_scale_input_only": check_bias_scale_input_only,
    "bn_running_mean_ignored": check_qat_fold_bug,
    "bn_beta_dropped": check_bn_beta_dropped,
    "shared_weight_quantized_once": check_shared_weight_quantized_once,
    "conv_bias_added_twice": check_qat_fold_bug,
    "folded_weights_written_back": check_folded_weights_written_back,
    "consumes_and_writes_back": check_consumes_and_writes_back,
    "keeps_state_between_calls": check_keeps_state_between_calls,
    "dropped_qdq": check_dropped_qdq,
    "observer_left": check_observer_left,
    "shared_dequantize": check_shared_dequantize,
    "metadata_lost": check_metadata_lost,
    "fold_quantize_ignored": check_fold_quantize_ignored,
    "reference_representation_ignored": check_reference_representation_ignored,
    "output_scale_off": check_output_scale_off,
    "none_qconfig_ignored": check_none_qconfig_ignored,
    "qconfig_kept": check_qconfig_kept,
    "preserved_attributes_dropped": check_preserved_attributes_dropped,
    "backend_config_ignored": check_backend_config_ignored,
    "bn_eps_default": check_bn_eps_default,
    "fixed_qparams_recomputed": check_fixed_qparams_recomputed,
    "second_input_reads_first_qparams": check_second_input_reads_first_qparams,
    "fixed_qparams_requantized": check_fixed_qparams_requantized,
    "dynamic_activation_qparams_frozen": check_dynamic_activation_qparams_frozen,
    "float16_weights_truncated": check_float16_weights_truncated,
    "regex_none_entries_ignored": check_regex_none_entries_ignored,
    "preserved_attributes_not_recorded": check_preserved_attributes_not_recorded,
    "every_graph_input_gets_first_qparams": check_every_graph_input_gets_first_qparams,
    "later_outputs_left_float": check_later_outputs_left_float,
    "embedding_zero_points_rounded": check_embedding_zero_points_rounded,
    "fx_every_graph_input_gets_first_qparams": check_fx_every_graph_input_gets_first_qparams,
    "conv3d_not_lowered": check_conv3d_not_lowered,
}


# witness checks of the mutants kept beside the properties they stand for
from tests.test_qat_mutants import check_qat_fold_default_eps, check_qat_held_qparams  # noqa: E402
from tests.test_verdict_mutants import PLANTED as _VERDICT_WITNESSES  # noqa: E402

PLANTED.update(qat_held_qparams=check_qat_held_qparams, qat_fold_default_eps=check_qat_fold_default_eps,
               **_VERDICT_WITNESSES)


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_plants_its_bug_on_its_witness(name, prepared_cache):
    mutant = MUTANTS[name]
    if mutant.flow == "pt2e":
        PLANTED[name](Pt2eWitness(mutant, prepared_cache))
    else:
        PLANTED[name](FxWitness(mutant))


# --- quantization ranges, weight axes, dynamic and mixed-dtype graphs ----------------------------


def check_clamps_to_dtype_range(w: Pt2eWitness):
    ranges = {(schema_arguments(q)["quant_min"], schema_arguments(q)["quant_max"]) for q in activation_quantizes(w.ours)}
    assert ranges == {(-127, 127)}, "the witness's activations use the narrow range"
    assert not w.outputs_differ(w.calibration())  # nothing saturates: the clamp bound never matters
    assert w.outputs_differ([inputs(w.model_name, s, scale=100.0) for s in range(3)])  # -128 where -127
    assert w.same_elsewhere("linear", "qref_int8_sym")  # the full range: dtype and spec agree


def check_weight_axis_assumed_zero(w: Pt2eWitness):
    def axes(gm):
        return [n.args[3] for n in gm.graph.nodes
                if is_call(n, (qd.dequantize_per_channel.default,)) and n.args[-2] != 2**31 - 1]  # fmt: skip

    assert axes(w.ours) == [1, 1] and axes(w.theirs) == [0, 0]  # conv weights: input channels
    assert w.outputs_differ()
    assert w.same_elsewhere("conv_bn_relu", "qref_int8_sym")  # output channels are axis 0 there


def check_one_activation_dtype(w: Pt2eWitness):
    def dtypes(gm):
        return [schema_arguments(q)["dtype"] for q in activation_quantizes(gm)]

    assert torch.int16 in dtypes(w.ours) and torch.int8 in dtypes(w.ours)
    assert set(dtypes(w.theirs)) == {torch.int8}
    assert w.outputs_differ()
    assert w.same_elsewhere("mlp", "qref_int8_sym")  # one dtype in the graph: nothing to lose


def check_dynamic_qparams_frozen(w: Pt2eWitness):
    assert any(is_call(n, (qd.choose_qparams.tensor,)) for n in w.ours.graph.nodes)
    first, other = inputs(w.model_name, 0), inputs(w.model_name, 1, scale=10.0)
    assert _same(_run(w.theirs, [first]), _run(w.ours, [first])), "the first call is right"
    assert not _same(_run(w.theirs, [other]), _run(w.ours, [other])), "a later call keeps its qparams"
    assert w.same_elsewhere("mlp", "qref_int8_sym")  # static qparams: nothing is chosen at run time


PLANTED.update(clamps_to_dtype_range=check_clamps_to_dtype_range,
               weight_axis_assumed_zero=check_weight_axis_assumed_zero,
               one_activation_dtype=check_one_activation_dtype,
               dynamic_qparams_frozen=check_dynamic_qparams_frozen)
