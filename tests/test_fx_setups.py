"""The FX setups beyond the static mappings: dynamic Linear (int8, float16), convert-time None
entries, and what torch 2.13's FX backends do with float16 and int8 activations.

Drawn within the quick profile's budgets (properties/_support.PROFILES["quick"]), measured
against torch's convert_fx (qref's conversion itself is watched in tests/test_fx_independence.py),
and the upstream behaviours the setups leave out, pinned.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.ao.nn.quantized.dynamic as nnqd
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import QConfigMapping, float16_dynamic_qconfig, float16_static_qconfig
from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx
from torch.ao.quantization.quantize_fx import prepare_fx

import qref
from qref.strategies import model_specs
from qref.strategies.cases import calibration_batches, prepare_case
from qref.strategies.setups import (
    FLOAT16_ENGINES, FX_ENGINES, NONE_ENTRY_KINDS, QuantSetup, fx_called, fx_dynamic_setups, fx_none_entries,
    fx_skip_mapping,
)

QUICK = {"ops": 6, "patterns": 5}  # properties/_support.PROFILES["quick"]
LINEAR_KINDS = ("linear_act", "flatten_linear", "linear_seq")  # as properties/test_equivalence.py draws
# a pattern that cannot apply falls back to conv-bn: the property draws such a case again (reject)
LINEAR_SPECS = model_specs("fx", "patterns", kinds=LINEAR_KINDS).filter(lambda spec: "linear" in spec.ops)


def _backend(engine):
    return QuantSetup("fx", kind="dynamic", engine=engine, per_channel=False, observer="placeholder",
                      reduce_range=engine in ("fbgemm", "x86")).backend_config()


def _quiet_prepare(model, mapping, example, backend_config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(model.eval(), mapping, example, backend_config=backend_config)


# --- the setups themselves ------------------------------------------------------------------


def test_dynamic_setups_round_trip_and_fix_what_their_qconfig_fixes():
    seen = set()

    @settings(max_examples=40, deadline=None, database=None)
    @given(fx_dynamic_setups())
    def check(setup):
        assert eval(repr(setup), {"QuantSetup": QuantSetup}) == setup
        mapping = setup.qconfig_mapping()
        assert mapping.global_qconfig is None and set(mapping.object_type_qconfigs) == {nn.Linear, nn.ReLU}
        qconfig = mapping.object_type_qconfigs[nn.Linear]
        assert qconfig.activation().is_dynamic and setup.observer == "placeholder" and not setup.qat
        if setup.kind == "float16":
            assert setup.engine in FLOAT16_ENGINES and setup.act_dtype == "float16"
            assert qconfig.weight().dtype == torch.float16 and not setup.per_channel
        else:
            assert setup.act_dtype == "uint8" and qconfig.weight().dtype == torch.qint8
            assert (qconfig.weight().qscheme == torch.per_channel_symmetric) == setup.per_channel
        seen.add((setup.kind, setup.per_channel))

    check()
    assert seen == {("dynamic", False), ("dynamic", True), ("float16", False)}
    with pytest.raises(ValueError):  # a dynamic setup has no activation observer to choose
        QuantSetup("fx", kind="dynamic", engine="fbgemm", observer="histogram", reduce_range=True)
    with pytest.raises(ValueError):  # and a static one no placeholder
        QuantSetup("fx", kind="default", engine="qnnpack", per_channel=False, observer="placeholder")


def test_dynamic_setups_need_a_linear_and_float16_an_engine_that_lowers_it():
    from qref.strategies.models import Conv, Linear, ModelSpec

    linear, conv = ModelSpec((2, 6), (Linear(6, 4),)), ModelSpec((1, 3, 5, 5), (Conv(3, 4),))
    for engine in FX_ENGINES:
        setup = QuantSetup("fx", kind="float16", engine=engine, per_channel=False, act_dtype="float16",
                           observer="placeholder", reduce_range=engine in ("fbgemm", "x86"))
        assert setup.supports(linear) == (engine in FLOAT16_ENGINES) and not setup.supports(conv)
    with pytest.raises(ValueError):
        fx_dynamic_setups(model=conv).example()


def test_dynamic_property_cases_reach_both_weight_granularities_within_the_quick_budget():
    """What test_fx_dynamic_linear_matches_reference draws at the quick budget: a Linear under
    a dynamic setup every time, per-tensor and per-channel weights over a few seeds."""
    granularities = set()
    for seed in range(4):
        seen = []

        @settings(max_examples=QUICK["patterns"], deadline=None, database=None)
        @given(LINEAR_SPECS, st.data())
        def collect(spec, data):
            seen.append((spec, data.draw(fx_dynamic_setups(("dynamic",), model=spec))))

        hypothesis_seed(seed)(collect)()
        assert len(seen) == QUICK["patterns"] and all(setup.kind == "dynamic" for _, setup in seen)
        granularities |= {setup.per_channel for _, setup in seen}
    assert granularities == {False, True}


def test_none_entries_draw_every_kind_within_the_quick_budget():
    """test_fx_qconfig_none_stays_float (ops budget) meets a regex entry at every one of these
    seeds: the premise of the regex mutant; and every kind over them."""
    kinds = set()
    for seed in range(8):
        drawn = []

        @settings(max_examples=QUICK["ops"], deadline=None, database=None)
        @given(fx_none_entries())
        def collect(entries):
            drawn.append(entries)

        hypothesis_seed(seed)(collect)()
        assert any(kind == "module_name_regex" for entries in drawn for kind, _ in entries), (seed, drawn)
        kinds |= {kind for entries in drawn for kind, _ in entries}
    assert kinds == set(NONE_ENTRY_KINDS)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.conv1, self.fc0 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Linear(27, 4)

    def forward(self, x):
        return self.fc0(torch.flatten(self.conv0(x) + self.conv1(x), 1))


def _prepared_residual():
    setup = QuantSetup("fx", kind="default", engine="fbgemm", reduce_range=True)
    x = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    model = _quiet_prepare(_Residual(), setup.qconfig_mapping(), (x,), setup.backend_config())
    model(x)
    return setup, model, x


def test_skip_mapping_resolves_entries_on_the_prepared_model():
    setup, prepared, _ = _prepared_residual()
    names, types = fx_called(prepared)
    assert names == ["conv0", "conv1", "fc0"]
    assert nn.Conv2d in types and nn.Linear in types and any(getattr(t, "__name__", "") == "add" for t in types)
    mapping, calls = fx_skip_mapping(setup, prepared, (("module_name", 4), ("module_name_regex", 1),
                                                       ("module_name_regex", 2), ("object_type", 1)))
    assert mapping.module_name_qconfigs == {"conv1": None}
    assert list(mapping.module_name_regex_qconfigs) == [r"conv\d+$", r"fc0$"]
    assert all(re.match(r"conv\d+$", n) for n in ("conv0", "conv1")) and not re.match(r"fc0$", "fc00")
    assert mapping.object_type_qconfigs[types[1]] is None and len(calls) == 4
    assert mapping.global_qconfig is not None  # prepare's own entries are kept


@settings(max_examples=12, deadline=None, database=None)
@given(fx_none_entries())
def test_none_entries_convert_like_torch(entries):
    """qref's resolution of the drawn entries equals torch's: module kinds and outputs, exactly."""
    setup, prepared, x = _prepared_residual()
    mapping, calls = fx_skip_mapping(setup, prepared, entries)
    with qref.use_engine("fbgemm", threads=1):
        ours = qref.convert_fx(copy.deepcopy(prepared), qconfig_mapping=copy.deepcopy(mapping))
        theirs = torch_convert_fx(copy.deepcopy(prepared), qconfig_mapping=copy.deepcopy(mapping))
        kinds = [(n, type(m)) for n, m in ours.named_modules() if n]
        assert kinds == [(n, type(m)) for n, m in theirs.named_modules() if n], calls
        assert torch.equal(ours(x), theirs(x)), calls
    for name in mapping.module_name_qconfigs:  # a module named None stays float
        assert not type(ours.get_submodule(name)).__module__.startswith("torch.ao.nn.quantized"), calls


# --- dynamic Linear: qref against torch, exactly -----------------------------------------------


def _dynamic_modules(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, nnqd.Linear)}


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(LINEAR_SPECS, st.data())
def test_dynamic_linear_is_exactly_torchs(spec, data):
    """Measured: on every engine qref's dynamic modules hold torch's weights (int8 integers and
    qparams, float16 values) and give torch's float outputs bit for bit, so the dynamic
    properties compare exactly."""
    setup = data.draw(fx_dynamic_setups(model=spec), label="setup")
    calibration = data.draw(calibration_batches(spec.input_shape), label="calibration")
    try:
        prepared = prepare_case(spec, setup, [(t,) for t in calibration])
    except Exception:  # noqa: BLE001 - a spec prepare_fx refuses under this mapping
        return
    x = calibration[0]
    with qref.use_engine(setup.engine, threads=1):
        ours = qref.convert_fx(copy.deepcopy(prepared), backend_config=setup.backend_config())
        theirs = torch_convert_fx(copy.deepcopy(prepared), backend_config=setup.backend_config())
        ours_dynamic, theirs_dynamic = _dynamic_modules(ours), _dynamic_modules(theirs)
        assert ours_dynamic and ours_dynamic.keys() == theirs_dynamic.keys()
        for name, module in ours_dynamic.items():
            (w, b), (w2, b2) = module._weight_bias(), theirs_dynamic[name]._weight_bias()
            assert type(module) is type(theirs_dynamic[name]) and w.dtype == w2.dtype
            assert torch.equal(w.int_repr() if w.is_quantized else w, w2.int_repr() if w2.is_quantized else w2)
            if w.is_quantized and setup.per_channel:
                assert torch.equal(w.q_per_channel_scales(), w2.q_per_channel_scales())
            elif w.is_quantized:
                assert w.q_scale() == w2.q_scale()
            assert (b is None and b2 is None) or torch.equal(b, b2)
        for batch in (x, x * 10, torch.zeros_like(x)):
            assert torch.equal(ours(batch), theirs(batch))


# --- what torch 2.13's FX backends do with float16 and int8 activations (pinned) ----------------


def _linear_relu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("engine", FX_ENGINES)
def test_float16_static_is_converted_by_no_engine_backend_config(engine):
    """float16_static_qconfig: none of the four engines' backend configs has a float16 static
    dtype config for Linear (only torch's test-only legacy native config does), so convert_fx
    leaves the model float, casts and all; qref does the same. Hence no float16 static setup."""
    x = torch.randn(4, 6)
    mapping = QConfigMapping().set_global(float16_static_qconfig)
    prepared = _quiet_prepare(_linear_relu(), mapping, (x,), _backend(engine))
    prepared(x)
    with qref.use_engine(engine):
        for convert in (torch_convert_fx, qref.convert_fx):
            converted = convert(copy.deepcopy(prepared), backend_config=_backend(engine))
            assert not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in converted.modules())
            assert not any(n.op == "call_method" and n.target == "to" for n in converted.graph.nodes)
            assert torch.equal(converted(x), _linear_relu().eval()(x))


def test_float16_dynamic_is_lowered_on_fbgemm_and_x86_only():
    """onednn's backend config has no float16 dtype config (the Linear stays float); qnnpack's
    has one, but its kernel cannot pack float16 weights: torch's convert_fx raises, and so does
    qref (the same packing call)."""
    x = torch.randn(4, 6)
    mapping = QConfigMapping().set_object_type(nn.Linear, float16_dynamic_qconfig) \
        .set_object_type(nn.ReLU, float16_dynamic_qconfig)
    for engine in FX_ENGINES:
        prepared = _quiet_prepare(_linear_relu(), mapping, (x,), _backend(engine))
        with qref.use_engine(engine):
            if engine == "qnnpack":
                for convert in (torch_convert_fx, qref.convert_fx):
                    with pytest.raises(RuntimeError, match="linear_prepack_fp16 is currently not supported by QNNPACK"):
                        convert(copy.deepcopy(prepared), backend_config=_backend(engine))
                continue
            converted = torch_convert_fx(copy.deepcopy(prepared), backend_config=_backend(engine))
            lowered = [m for m in converted.modules() if isinstance(m, nnqd.Linear)]
            assert bool(lowered) == (engine in FLOAT16_ENGINES), engine
            assert all(m._packed_params.dtype == torch.float16 for m in lowered)


def test_int8_activations_run_on_no_fx_engine():
    """Only qnnpack's backend config accepts qint8 activations (qnnpack_act_qint8_scale_min_2_neg_12,
    meant for XNNPACK); the qnnpack engine's own kernels refuse them at run time, for torch's
    conversion as for qref's; fbgemm's, x86's (native) and onednn's configs take quint8 only.
    Hence no int8-activation FX setup."""
    from torch.ao.quantization.backend_config import (
        get_fbgemm_backend_config, get_native_backend_config, get_onednn_backend_config, get_qnnpack_backend_config,
    )
    from torch.ao.quantization.qconfig_mapping import _get_symmetric_qnnpack_qconfig_mapping

    def input_dtypes(config):
        return {dc.input_dtype for c in config.configs for dc in c.dtype_configs}

    for getter in (get_fbgemm_backend_config, get_native_backend_config, get_onednn_backend_config):
        assert torch.qint8 not in input_dtypes(getter())
    assert torch.qint8 in input_dtypes(get_qnnpack_backend_config())
    x = torch.randn(2, 6)
    prepared = _quiet_prepare(_linear_relu(), _get_symmetric_qnnpack_qconfig_mapping(), (x,),
                              get_qnnpack_backend_config())
    prepared(x)
    with qref.use_engine("qnnpack"):
        for convert in (torch_convert_fx, qref.convert_fx):
            converted = convert(copy.deepcopy(prepared), backend_config=get_qnnpack_backend_config())
            with pytest.raises(RuntimeError, match="Expected input data type QUInt8 but got QInt8"):
                converted(x)
