"""qref.fx.convert_fx against torch's convert_fx, bit for bit, under each engine that runs here."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx
from torch.ao.quantization.quantize_fx import prepare_fx

from fixtures.fx_setups import ENGINE_SETUPS, SETUPS, prepared, unsupported
from fixtures.zoo import ZOO
from qref import observers
from qref.converters import ConverterMisbehaved, call_guarded, resolve
from qref.expectations import load as load_expectations
from tests.test_fx_convert import same_outputs
from qref.engines import engines, use_engine
from qref.fx import convert_fx, convert_to_reference_fx

warnings.filterwarnings("ignore", category=DeprecationWarning)
DEFAULT_EXPECTATIONS = load_expectations(Path(__file__).parents[1] / "qref" / "default_expectations.toml")

FAST = [n for n, z in ZOO.items() if z.fx_traceable and n != "mobilenet_v2_like"]
FEW = ["conv_bn_relu", "residual_add", "cat_branches", "linear_relu"]
QUANTIZED_NAMESPACES = ("torch.ao.nn.quantized.modules", "torch.ao.nn.intrinsic.quantized",
                        "torch.ao.nn.quantized.dynamic")  # fmt: skip


def cases():
    out = [(m, s, False, SETUPS[s].engine) for s in ENGINE_SETUPS for m in FAST]
    out += [(m, "fbgemm", True, "fbgemm") for m in FAST]
    out += [(m, "qnnpack", True, "qnnpack") for m in FEW]
    out += [(m, s, qat, SETUPS[s].engine) for s in SETUPS if s not in ENGINE_SETUPS
            for m in FEW + ["mlp"] for qat in (False, True)]  # fmt: skip
    # one mapping lowered and run under every other engine that runs here
    out += [(m, "qnnpack", False, e) for e in engines() if e != "qnnpack" for m in FEW]
    out += [("mobilenet_v2_like", "fbgemm", True, "fbgemm")]
    return [
        pytest.param(*c, id=f"{c[0]}-{c[1]}-{'qat' if c[2] else 'ptq'}-on-{c[3]}",
                     marks=[pytest.mark.slow] if c[0] == "mobilenet_v2_like" else [])
        for c in out
        if not unsupported(ZOO[c[0]], SETUPS[c[1]], c[2])
        and c[3] in engines()
        and not (c[3] == "onednn" and "conv_transpose" in ZOO[c[0]].ops)  # kernel: output_padding
    ]


def inputs_for(model_name):
    g = torch.Generator().manual_seed(99)
    zm = ZOO[model_name]
    return [zm.example_inputs(g), tuple(4 * x if x.is_floating_point() else x for x in zm.example_inputs(g))]


def module_kinds(gm):
    return sorted(f"{type(m).__module__}.{type(m).__qualname__}" for m in gm.modules())


@pytest.mark.parametrize("model_name,setup_name,qat,engine", cases())
def test_lowered_model_equals_torch(model_name, setup_name, qat, engine):
    model, _ = prepared(model_name, setup_name, qat)
    setup = SETUPS[setup_name]
    mapping = setup.convert_mapping(setup.mapping(qat), model) if setup.convert_mapping else None
    # onednn is only deterministic with one thread (design notes, section 4): pin it for all
    with use_engine(engine, threads=1):
        ours = convert_fx(model, qconfig_mapping=mapping)
        theirs = torch_convert_fx(copy.deepcopy(model), qconfig_mapping=copy.deepcopy(mapping))
        with torch.no_grad():
            for batch in inputs_for(model_name):
                assert same_outputs(ours(*batch), theirs(*batch))
    assert module_kinds(ours) == module_kinds(theirs)
    # really lowered: no reference module or observer left behind ...
    kinds = module_kinds(ours)
    assert not any(k.startswith("torch.ao.nn.quantized.reference") for k in kinds), kinds
    assert not any(observers.is_observer(m) for m in ours.modules())
    floats = [m for m in ours.modules() if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)]
    if setup.convert_mapping is None:  # ... quantized modules, and no float Linear/Conv
        assert any(k.startswith(QUANTIZED_NAMESPACES) for k in kinds), kinds
        assert not floats
    else:  # the skip entries left their module float
        assert floats


def test_quantized_ops_are_lowered():
    """add+relu, cat, pooling run on quantized tensors; sigmoid stays on quantized tensors too."""
    ops = {}
    for name in ("residual_add", "cat_branches", "avg_pool", "sigmoid_tanh"):
        model, _ = prepared(name, "fbgemm", False)
        with use_engine("fbgemm"):
            ops[name] = convert_fx(model)
    targets = {n: [node.target for node in gm.graph.nodes] for n, gm in ops.items()}
    assert torch.ops.quantized.add_relu in targets["residual_add"]
    # lowered: no dequantize before cat / pool / sigmoid
    for name, op in (("cat_branches", torch.cat), ("avg_pool", torch._C._nn.avg_pool2d),
                     ("sigmoid_tanh", torch.sigmoid)):  # fmt: skip
        node = next(n for n in ops[name].graph.nodes if n.target is op)
        first = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else node.args[0]
        assert not (first.op == "call_method" and first.target == "dequantize"), name


def test_dynamic_linear_is_lowered():
    model, _ = prepared("mlp", "dynamic_linear", False)
    with use_engine("fbgemm"):
        out = convert_fx(model)
    assert all(type(getattr(out, n)).__module__.startswith("torch.ao.nn") for n in ("fc1", "fc2", "fc3"))
    assert type(out.fc3) is torch.ao.nn.quantized.dynamic.Linear


def test_unfused_relu_after_lowered_module_is_kept():
    """Where torch drops a ReLU after a lowered Linear (it relies on zero point == 0 clamping),
    qref keeps it. With symmetric quint8 activations (zero point 128) torch is wrong; qref equals
    its own reference model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    symmetric = QConfig(
        activation=HistogramObserver.with_args(qscheme=torch.per_tensor_symmetric, reduce_range=True),
        weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    )
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    prep = prepare_fx(model, QConfigMapping().set_global(symmetric), (x,))
    prep(x)
    with use_engine("qnnpack"):
        ours, reference = convert_fx(prep), convert_to_reference_fx(prep)
        theirs = torch_convert_fx(copy.deepcopy(prep))
        assert (ours(x) >= 0).all()
        assert torch.equal(ours(x), reference(x))
        assert (theirs(x) < 0).any()  # torch's lowered model lets negative values through


@pytest.mark.parametrize("engine", [e for e in ("fbgemm", "qnnpack") if e in engines()])
def test_standalone_non_affine_batch_norm_is_lowered(engine):
    """A BatchNorm2d(affine=False) not fused into a conv (found by CI's run of
    test_fx_custom_module_converted, where the conv before it was a custom module): torch 2.13's
    convert_fx raises in nnq.BatchNorm2d.from_reference, which reads the missing weight's device
    (the default expectation names that frame); qref lowers it with gamma 1 and beta 0, equal to
    its reference model."""
    bn = nn.BatchNorm2d(2, affine=False).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.25]))
    x = torch.randn(2, 2, 3, 7, generator=torch.Generator().manual_seed(0))
    with use_engine(engine):
        prep = prepare_fx(nn.Sequential(bn), get_default_qconfig_mapping(engine), (x,))
        prep(x)
        ours, reference = convert_fx(copy.deepcopy(prep)), convert_to_reference_fx(copy.deepcopy(prep))
        assert isinstance(ours.get_submodule("0"), torch.ao.nn.quantized.BatchNorm2d)
        assert torch.equal(ours(x), reference(x))
        with pytest.raises(ConverterMisbehaved) as raised:
            call_guarded(resolve("torch-fx"), copy.deepcopy(prep))
    (entry,) = [e for e in DEFAULT_EXPECTATIONS if e.test == "fx_custom_module_converted*"]
    assert entry.expects(raised.value.message), raised.value.message
    assert "from_reference" in raised.value.message and "batchnorm.py" in raised.value.message


@pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx])
def test_lowered_never_prepared(convert):
    with pytest.raises(ValueError, match="prepare_fx"):
        convert(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2))))


def test_lowered_keeps_reference_form_for_unlowerable_pattern():
    """F.linear with a weight from an attribute: qref does not lower functional linear; the
    result must stay a correct reference pattern (equal to torch's reference model)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return nn.functional.linear(x, self.w)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    prep = prepare_fx(Functional().eval(), SETUPS["fbgemm"].mapping(False), (x,))
    prep(x)
    with use_engine("fbgemm"):
        ours = convert_fx(prep)
        from torch.ao.quantization.quantize_fx import convert_to_reference_fx as torch_reference

        assert torch.equal(ours(x), torch_reference(copy.deepcopy(prep))(x))
    assert any(n.target is nn.functional.linear for n in ours.graph.nodes)
