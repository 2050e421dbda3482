"""qref.fx.convert_to_reference_fx against torch's, bit for bit; the convert-time options; bad input."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fx.custom_config import (
    ConvertCustomConfig,
    PrepareCustomConfig,
)
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as torch_reference
from torch.ao.quantization.quantize_fx import prepare_fx

from fixtures.fx_setups import ENGINE_SETUPS, SETUPS, prepared, unsupported
from fixtures.zoo import ZOO
from qref import observers
from qref.fx import convert_fx, convert_to_reference_fx

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

FAST = [n for n, z in ZOO.items() if z.fx_traceable and n != "mobilenet_v2_like"]
FEW = ["conv_bn_relu", "residual_add", "cat_branches", "mlp"]


def cases():
    """All models on each engine's default mapping (PTQ; QAT on fbgemm and qnnpack), every
    other mapping on a few models, and the big model once (QAT, its fast flavour)."""
    # x86's default mapping is fbgemm's (same qconfigs): its reference model on a few models
    out = [(m, s, False) for s in ENGINE_SETUPS for m in (FEW if s == "x86" else FAST)]
    out += [(m, s, True) for s in ("fbgemm", "qnnpack") for m in FAST]
    out += [(m, s, qat) for s in SETUPS if s not in ENGINE_SETUPS for m in FEW + ["linear_relu"]
            for qat in (False, True)]  # fmt: skip
    out += [("mobilenet_v2_like", "fbgemm", True)]
    return [
        pytest.param(*c, id=f"{c[0]}-{c[1]}-{'qat' if c[2] else 'ptq'}",
                     marks=[pytest.mark.slow] if c[0] == "mobilenet_v2_like" else [])
        for c in out
        if not unsupported(ZOO[c[0]], SETUPS[c[1]], c[2])
    ]


CASES = cases()


def inputs_for(model_name: str) -> list[tuple]:
    g = torch.Generator().manual_seed(1234)
    zm = ZOO[model_name]
    # the last batch lies far outside the calibrated range: saturation is compared too
    far = tuple(4 * x if x.is_floating_point() else x for x in zm.example_inputs(g))  # indices stay valid
    return [zm.example_inputs(g), zm.example_inputs(g), far]


def same_outputs(a, b) -> bool:
    """Equal outputs: one tensor, or a tuple of them (a model with several outputs)."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def convert_mapping(model_name, setup_name, qat):
    setup = SETUPS[setup_name]
    if setup.convert_mapping is None:
        return None
    return setup.convert_mapping(setup.mapping(qat), prepared(model_name, setup_name, qat)[0])


def graph_ops(gm):
    """The graph as (op, target, module class) in order: what the conversion produced."""
    out = []
    for n in gm.graph.nodes:
        kind = type(gm.get_submodule(n.target)) if n.op == "call_module" else None
        out.append((n.op, str(n.target), kind))
    return out


@pytest.mark.parametrize("model_name,setup_name,qat", CASES)
def test_reference_model_equals_torch(model_name, setup_name, qat):
    model, _ = prepared(model_name, setup_name, qat)
    mapping = convert_mapping(model_name, setup_name, qat)
    ours = convert_to_reference_fx(model, qconfig_mapping=mapping)
    theirs = torch_reference(copy.deepcopy(model), qconfig_mapping=copy.deepcopy(mapping))
    assert graph_ops(ours) == graph_ops(theirs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours_state[key], value), key
        else:  # qscheme, dtype entries of reference modules
            assert ours_state[key] == value, key
    with torch.no_grad():
        for batch in inputs_for(model_name):
            assert same_outputs(ours(*batch), theirs(*batch))
    # no observer survives; weighted modules became reference modules (unless skipped)
    assert not any(observers.is_observer(m) for m in ours.modules())
    if SETUPS[setup_name].convert_mapping is None and "_dynamic" not in setup_name:
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized.reference") for m in ours.modules())


def test_prepared_model_is_not_mutated():
    model, _ = prepared("residual_add", "fbgemm", False)
    before = str(model.graph), {k: v.clone() for k, v in model.state_dict().items()}
    convert_fx(model)
    convert_to_reference_fx(model)
    assert str(model.graph) == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())


# --- qconfig_mapping ---------------------------------------------------------


def test_none_entries_leave_ops_and_modules_float():
    model, _ = prepared("residual_add", "fbgemm", False)
    mapping = SETUPS["fbgemm"].mapping(False).set_object_type(operator.add, None)
    mapping.set_module_name("conv0", None)
    ref = convert_to_reference_fx(model, qconfig_mapping=mapping)
    assert type(ref.conv0) is nn.Conv2d or type(ref.conv0[0]) is nn.Conv2d  # float (fused ConvReLU)
    assert "Reference" in repr(ref.conv)
    lowered = convert_fx(model, qconfig_mapping=mapping)
    assert not any(n.target in (torch.ops.quantized.add, torch.ops.quantized.add_relu)
                   for n in lowered.graph.nodes)  # fmt: skip
    assert type(lowered.conv).__module__.startswith("torch.ao.nn.quantized")


def test_module_name_root_none_leaves_whole_model_float():
    """convert_fx's documentation: set_module_name("", None) skips module "" (the model).

    torch 2.13 ignores a "" entry (its lookup stops before the root), so here qref follows
    the documentation and differs from torch, on purpose; this test records both.
    """
    model, _ = prepared("residual_add", "fbgemm", False)
    mapping = SETUPS["fbgemm"].mapping(False).set_module_name("", None)
    ours = convert_fx(model, qconfig_mapping=mapping)
    assert not any(n.target is torch.quantize_per_tensor for n in ours.graph.nodes)
    from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx

    theirs = torch_convert_fx(copy.deepcopy(model), qconfig_mapping=copy.deepcopy(mapping))
    assert any(n.target is torch.quantize_per_tensor for n in theirs.graph.nodes)


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda m: m.set_object_type(nn.Sigmoid, SETUPS["qnnpack"].mapping(False).global_qconfig), "Sigmoid"),
        (lambda m: m.set_global(SETUPS["qnnpack"].mapping(False).global_qconfig), "global"),
        (lambda m: m.set_module_name("conv", SETUPS["qnnpack"].mapping(False).global_qconfig), "'conv'"),
    ],
)
def test_mapping_that_contradicts_prepare_names_the_key(change, key):
    model, _ = prepared("residual_add", "fbgemm", False)
    with pytest.raises(ValueError, match=key):
        convert_fx(model, qconfig_mapping=change(SETUPS["fbgemm"].mapping(False)))


def test_mapping_missing_a_prepare_key_names_it():
    model, _ = prepared("residual_add", "fbgemm", False)
    mapping = QConfigMapping().set_global(SETUPS["fbgemm"].mapping(False).global_qconfig)
    with pytest.raises(ValueError, match="missing the object_type key"):
        convert_to_reference_fx(model, qconfig_mapping=mapping)


# --- _remove_qconfig, convert_custom_config, backend_config ------------------


@pytest.mark.parametrize("remove", [True, False])
def test_remove_qconfig_flag(remove):
    from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx

    model, _ = prepared("conv_bn_relu", "fbgemm", False)

    def with_qconfig(m):
        return sorted(name for name, mod in m.named_modules() if hasattr(mod, "qconfig"))

    reference = with_qconfig(convert_to_reference_fx(model, _remove_qconfig=remove))
    assert (reference == []) is remove
    assert reference == with_qconfig(torch_reference(copy.deepcopy(model), _remove_qconfig=remove))
    # lowered modules are new objects without qconfig either way, as in torch
    lowered = with_qconfig(convert_fx(model, _remove_qconfig=remove))
    assert lowered == with_qconfig(torch_convert_fx(copy.deepcopy(model), _remove_qconfig=remove))


def test_preserved_attributes():
    model, _ = prepared("linear", "fbgemm", False)
    model = copy.deepcopy(model)
    model.my_flag = 7
    config = ConvertCustomConfig().set_preserved_attributes(["my_flag"])
    assert convert_fx(model, convert_custom_config=config).my_flag == 7
    assert copy.deepcopy(convert_to_reference_fx(model, convert_custom_config=config)).my_flag == 7
    assert not hasattr(convert_fx(model), "my_flag")


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x)


class _ObservedCustom(_Custom):
    @classmethod
    def from_float(cls, float_module):
        m = cls()
        m.fc, m.qconfig = float_module.fc, float_module.qconfig
        return m


class _QuantizedCustom(nn.Module):
    """Takes and returns quantized tensors: requantizes its input to its output qparams."""

    def __init__(self, scale, zero_point):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    def forward(self, qx):
        assert qx.is_quantized
        return torch.quantize_per_tensor(qx.dequantize() * 0.5, self.scale, self.zero_point, torch.quint8)

    @classmethod
    def from_observed(cls, observed):
        scale, zero_point = observers.observer_qparams(observed.activation_post_process)[:2]
        return cls(float(scale), int(zero_point))


class _WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.custom = _Custom()

    def forward(self, x):
        return self.custom(self.pre(x))


def test_observed_custom_module_becomes_quantized_custom_module():
    from torch.ao.quantization.quant_type import QuantType

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g)
    prep = PrepareCustomConfig().set_float_to_observed_mapping(_Custom, _ObservedCustom)
    model = prepare_fx(_WithCustom().eval(), SETUPS["fbgemm"].mapping(False), (x,),
                       prepare_custom_config=prep)  # fmt: skip
    model(x)
    config = ConvertCustomConfig().set_observed_to_quantized_mapping(
        _ObservedCustom, _QuantizedCustom, QuantType.STATIC
    )
    from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx

    ours = convert_fx(model, convert_custom_config=config)
    theirs = torch_convert_fx(copy.deepcopy(model), convert_custom_config=config)
    assert isinstance(ours.custom, _QuantizedCustom)
    assert torch.equal(ours(x), theirs(x))
    with pytest.raises(ValueError, match="no static quantized class"):
        convert_fx(model, convert_custom_config=ConvertCustomConfig().set_observed_to_quantized_mapping(
            _ObservedCustom, _QuantizedCustom, QuantType.DYNAMIC))  # fmt: skip


def test_backend_config_without_linear_leaves_linear_in_reference_form():
    """dtype configs decide: a backend that does not list Linear gets no quantized Linear."""
    from torch.ao.quantization.backend_config import BackendConfig, get_native_backend_config

    native = get_native_backend_config()
    keep = [c for c in native.configs if c.pattern not in (nn.Linear, torch.nn.functional.linear)]
    backend = BackendConfig("no_linear").set_backend_pattern_configs(keep)
    model, _ = prepared("linear", "fbgemm", False)
    out = convert_fx(model, backend_config=backend)
    assert type(out.fc) is nn.Linear  # float: not swapped to a reference module, not lowered
    assert any(n.target is torch.quantize_per_tensor for n in out.graph.nodes)
    from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx

    theirs = torch_convert_fx(copy.deepcopy(model), backend_config=backend)
    x = ZOO["linear"].example_inputs(torch.Generator().manual_seed(0))[0]
    assert torch.equal(out(x), theirs(x))


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx])
def test_not_a_graph_module(convert):
    with pytest.raises(TypeError, match="prepare_fx"):
        convert(nn.Linear(2, 2))


@pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx])
def test_never_prepared(convert):
    traced = torch.fx.symbolic_trace(ZOO["linear"].build())
    with pytest.raises(ValueError, match="prepare_fx"):
        convert(traced)


def test_already_converted():
    model, _ = prepared("linear", "fbgemm", False)
    with pytest.raises(ValueError, match="already converted"):
        convert_fx(convert_fx(model))
