"""qref's reference representation against torchao 0.18's, the oracle.

For each model: prepare with an int8 quantizer (torchao's test XNNPACKQuantizer) or the uint8
X86InductorQuantizer, calibrate on seeded data, then compare
  got      = to_reference_representation(convert_pt2e(p, use_reference_representation=False))
  expected = torchao convert_pt2e(p, use_reference_representation=True)
as graphs (same dataflow, node for node) and as outputs, exactly: qref writes torchao's integer
math op for op. Where torchao cannot be the oracle (its bias-less linear fails at run time, its
conv1d bias broadcasts wrongly) an equivalent model it handles is the oracle.
torch.export yields aten.conv2d / aten.max_pool2d, which torchao's patterns (aten.convolution,
aten.max_pool2d_with_indices) do not match, so those anchors are tested on retargeted graphs.
"""

from __future__ import annotations

import collections
import copy
import operator

import pytest
import torch
from torch import fx

try:
    from qref._quiet import import_torchao_quietly, silence_noise

    import_torchao_quietly()
    silence_noise()
except ImportError:  # pragma: no cover
    pass

import torchao.quantization.pt2e.reference_representation_rewrite as torchao_rr
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)
from torchao.testing.pt2e._xnnpack_quantizer import (
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)

import qref
from qref.pt2e.reference_representation import to_reference_representation

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
OUT_DTYPE = torch.ops.higher_order.out_dtype


@pytest.fixture(scope="module", autouse=True)
def fast_oracle():
    """torchao re-exports its 13 pattern/replacement pairs on every call (~5 s each time).
    Reusing deep copies of the exported graphs (they depend only on the example inputs' shapes)
    leaves its answers unchanged and costs ~0.4 s per call after the first."""
    original = torchao_rr._get_aten_graph_module_for_pattern
    cache = {}

    def cached(pattern, example_inputs, *args, **kwargs):
        key = (
            getattr(pattern, "fn", pattern),
            tuple(
                (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else (type(x), x)
                for x in example_inputs
            ),
        )
        if key not in cache:
            cache[key] = original(pattern, example_inputs, *args, **kwargs)
        return copy.deepcopy(cache[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchao_rr, "_get_aten_graph_module_for_pattern", cached)
        yield


# ------------------------------------------------------------------------------ models


class LinearReluLinear(torch.nn.Module):
    """The first linear is followed by relu, which is no torchao pattern: only its q/dq change."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvPool(torch.nn.Module):
    def __init__(self, conv, pool=True):
        super().__init__()
        self.conv, self.pool = conv, pool

    def forward(self, x):
        y = self.conv(x)
        return torch.nn.functional.max_pool2d(y, 2) if self.pool else y


class ConvLinear(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.fc = torch.nn.Linear(6, 5, bias=bias)

    def forward(self, x):
        return self.fc(self.conv(x))


class Chain(torch.nn.Module):
    """conv2d, max_pool2d, add-relu, add, linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x, y):
        z = torch.nn.functional.max_pool2d(self.conv(x), 1)
        z = torch.relu(z + y)
        z = z + y
        return self.fc(z)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def init(module, seed):
    """Deterministic parameters, independent of the global RNG."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(randn(*p.shape, seed=seed + i) * 0.3)
    return module


IMAGE, PAIR = [(1, 3, 6, 6)], [(1, 3, 6, 6), (1, 3, 6, 6)]


def calibration_inputs(shapes):
    return tuple(randn(*s, seed=10 + i) for i, s in enumerate(shapes))


def eval_inputs(shapes):
    """In range, and 20x outside the calibration range (saturates every quantize)."""
    return [
        tuple(randn(*s, seed=100 * k + i) * scale for i, s in enumerate(shapes))
        for k, scale in ((1, 1.0), (2, 20.0))
    ]


def prepared(model, shapes, quantizer):
    inputs = calibration_inputs(shapes)
    p = prepare_pt2e(torch.export.export(model.eval(), inputs).module(), quantizer)
    p(*inputs)
    return p


def int8(per_channel=False):
    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    return XNNPACKQuantizer().set_global(config)


# ------------------------------------------------------------------------------ comparison


def signature(gm):
    """The graph's dataflow as one expression: equal iff the same ops on the same things."""
    memo = {}

    def expr(a):
        if isinstance(a, fx.Node):
            if a not in memo:
                if a.op == "call_function":
                    kwargs = "".join(f", {k}={expr(v)}" for k, v in a.kwargs.items())
                    memo[a] = f"{a.target}({', '.join(map(expr, a.args))}{kwargs})"
                else:
                    memo[a] = f"{a.op}:{a.target}"
            return memo[a]
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(map(expr, a)) + "]"
        return repr(a)

    return expr(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def op_counts(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def output_scale(gm):
    """Scale of the dequantize producing the (single) output, else None."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    if out.op == "call_function" and "dequantize_per_tensor" in str(out.target):
        return out.args[1]
    return None


def assert_same_outputs(got, expected, inputs_list, scale, what=""):
    """Exact equality; the message states the largest difference in LSB of the output scale."""
    for inputs in inputs_list:
        a, b = got(*inputs), expected(*inputs)
        diff = (a - b).abs().max().item()
        unit = f"{diff / scale:.3f} LSB (scale {scale:.4g})" if scale else f"{diff:.3g} (float)"
        assert torch.equal(a, b), f"{what}: max |got - expected| = {unit}"


def assert_integer_form(gm):
    """No quantize/dequantize op is left (all were int8)."""
    leftovers = [n for n in gm.graph.nodes if "quantize_per_" in str(n.target)]
    assert not leftovers, f"q/dq ops left: {leftovers}"


# --- anchors torch.export does not produce: the q/dq graph retargeted to them


def _schema_args(node):
    args = {}
    for i, a in enumerate(node.target._schema.arguments):
        if a.name in node.kwargs:
            args[a.name] = node.kwargs[a.name]
        elif i < len(node.args):
            args[a.name] = node.args[i]
        else:
            args[a.name] = a.default_value
    return args


def to_convolution(gm):
    """aten.conv1d/conv2d -> the equivalent aten.convolution (what a decomposed export has)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.conv1d.default, aten.conv2d.default):
            a, dims = _schema_args(n), 2 if n.target is aten.conv2d.default else 1

            def full(v):
                v = [v] if isinstance(v, int) else list(v)
                return v * dims if len(v) == 1 else v

            n.target = aten.convolution.default
            n.args = (a["input"], a["weight"], a["bias"], full(a["stride"]), full(a["padding"]),
                      full(a["dilation"]), False, [0] * dims, a["groups"])  # fmt: skip
            n.kwargs = {}
    gm.recompile()
    return gm


def to_max_pool_with_indices(gm, rescale_output=None):
    """aten.max_pool2d -> getitem(aten.max_pool2d_with_indices, 0); optionally give the pool's
    output q/dq a different scale so that the requantization is not the identity."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is aten.max_pool2d.default:
            with gm.graph.inserting_after(n):
                pool = gm.graph.call_function(aten.max_pool2d_with_indices.default, n.args)
            with gm.graph.inserting_after(pool):
                first = gm.graph.call_function(operator.getitem, (pool, 0))
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            if rescale_output:
                q = next(iter(first.users))
                for qdq in [q, *q.users]:
                    qdq.args = (qdq.args[0], qdq.args[1] * rescale_output, *qdq.args[2:])
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------ tests


def check(p, shapes, what, out_dtypes):
    """convert_pt2e with and without torchao's reference representation, against qref's."""
    base = convert_pt2e(copy.deepcopy(p), use_reference_representation=False)
    expected = convert_pt2e(copy.deepcopy(p), use_reference_representation=True)
    got = to_reference_representation(copy.deepcopy(base))
    assert signature(got) == signature(expected), f"{what}: graphs differ"
    assert op_counts(got) == op_counts(expected)
    assert op_counts(got)["out_dtype"] == out_dtypes
    assert_same_outputs(got, expected, eval_inputs(shapes), output_scale(base), what)
    return base, got


def rewrite_both(base):
    """torchao's rewrite itself is the oracle for graphs torch.export does not produce."""
    expected = torchao_rr.reference_representation_rewrite(copy.deepcopy(base))
    return expected, to_reference_representation(copy.deepcopy(base))


def test_linear():
    p = prepared(init(LinearReluLinear(), seed=1), [(2, 8)], int8())
    _, got = check(p, [(2, 8)], "linear", out_dtypes=3)  # int32 linear, int32 bias, requantize
    assert_integer_form(got)


def test_chain_per_tensor_weights():
    p = prepared(init(Chain(), seed=2), PAIR, int8())
    _, got = check(p, PAIR, "chain", out_dtypes=5)  # add-relu 2, linear 3; add rounds instead
    assert_integer_form(got)


def test_chain_per_channel_weights():
    """Per-channel weights keep linear/conv in float; their dequantize becomes integer math."""
    p = prepared(init(Chain(), seed=3), PAIR, int8(per_channel=True))
    _, got = check(p, PAIR, "chain per-channel", out_dtypes=2)  # add-relu only
    assert op_counts(got)["aten.transpose.int"] == 4  # 2 per per-channel weight dequantize
    assert_integer_form(got)


def test_uint8_x86_only_int8_weight_dequantize_is_rewritten():
    """X86InductorQuantizer: uint8 activations match no pattern (their q/dq are only retargeted
    to the op packets, as torchao does); the per-channel int8 weight dequantizes are rewritten."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 3, 3), torch.nn.Linear(3, 5)

        def forward(self, x, y):
            z = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
            return self.fc((z + y).mean((2, 3)))

    shapes = [(1, 3, 8, 8), (1, 3, 3, 3)]
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    base, got = check(prepared(init(M(), seed=4), shapes, quantizer), shapes, "x86", out_dtypes=0)
    before, after = op_counts(base), op_counts(got)
    dq = "quantized_decomposed.dequantize_per_tensor"
    assert after[dq] == before[dq + ".default"] > 0
    assert after["quantized_decomposed.dequantize_per_channel.default"] == 0


def test_convolution_and_max_pool_with_indices():
    p = prepared(init(ConvPool(torch.nn.Conv2d(3, 4, 3, padding=1)), seed=5), IMAGE, int8())
    base, got = check(p, IMAGE, "conv2d/max_pool2d", out_dtypes=0)  # not anchors: only q/dq
    assert_integer_form(got)

    # retargeted, and the pool's output given its own scale so that requantizing is not the identity
    base = to_max_pool_with_indices(to_convolution(base), rescale_output=1.37)
    expected, got = rewrite_both(base)
    assert signature(got) == signature(expected)
    assert op_counts(got)["out_dtype"] == 3
    assert op_counts(got)["aten.max_pool2d_with_indices.default"] == 1
    assert_integer_form(got)
    assert_same_outputs(got, expected, eval_inputs(IMAGE), output_scale(base), "conv+pool")

    # a padded max_pool is no pattern (its padding is not the default): only its q/dq change
    pool = next(n for n in base.graph.nodes if n.target is aten.max_pool2d_with_indices.default)
    pool.args = (*pool.args[:2], [2, 2], [1, 1])
    base.recompile()
    expected, got = rewrite_both(base)
    assert signature(got) == signature(expected)
    assert op_counts(got)["out_dtype"] == 3
    assert_same_outputs(got, expected, eval_inputs(IMAGE), output_scale(base), "padded pool")


def test_no_bias_matches_torchao_on_a_zero_bias_twin():
    """torchao rewrites a bias-less linear/conv to out_dtype(div, int32, None, ...), which fails
    at run time; qref leaves the bias term out, which is torchao's math with a zero bias."""
    model = init(ConvLinear(bias=False), seed=6)
    twin = ConvLinear()
    with torch.no_grad():
        for layer in ("conv", "fc"):
            getattr(twin, layer).weight.copy_(getattr(model, layer).weight)
            getattr(twin, layer).bias.zero_()
    base = to_convolution(convert_pt2e(prepared(model, IMAGE, int8())))
    broken, got = rewrite_both(base)
    with pytest.raises(RuntimeError):
        broken(*calibration_inputs(IMAGE))
    expected, _ = rewrite_both(to_convolution(convert_pt2e(prepared(twin, IMAGE, int8()))))
    assert_integer_form(got)
    # per bias: out_dtype(div), the mul of the scales, the add; conv's bias also 2 unsqueezes
    missing = {"out_dtype": 2, "aten.mul.Tensor": 2, "aten.add.Tensor": 2}
    missing["aten.unsqueeze.default"] = 2
    assert op_counts(expected) - op_counts(got) == collections.Counter(missing)
    assert_same_outputs(got, expected, eval_inputs(IMAGE), output_scale(base), "without bias")


def test_conv1d_bias_broadcasts_per_spatial_dim():
    """torchao unsqueezes the conv bias twice (right for conv2d only): its conv1d output has the
    wrong shape. qref's conv1d equals torchao's conv2d on the same data with height 1."""
    conv1 = init(ConvPool(torch.nn.Conv1d(3, 4, 3, padding=1), pool=False), seed=7)
    conv2 = ConvPool(torch.nn.Conv2d(3, 4, (1, 3), padding=(0, 1)), pool=False)
    with torch.no_grad():
        conv2.conv.weight.copy_(conv1.conv.weight.unsqueeze(2))
        conv2.conv.bias.copy_(conv1.conv.bias)
    s1, s2 = [(1, 3, 6)], [(1, 3, 1, 6)]
    base = to_convolution(convert_pt2e(prepared(conv1, s1, int8())))
    broken, got = rewrite_both(base)
    inputs = eval_inputs(s1)
    assert broken(*inputs[0]).shape != base(*inputs[0]).shape  # torchao's quirk, still there
    expected, _ = rewrite_both(to_convolution(convert_pt2e(prepared(conv2, s2, int8()))))
    assert op_counts(got)["aten.unsqueeze.default"] == 1
    scale = output_scale(base)
    for x in inputs:
        a, b = got(*x), expected(*(t.unsqueeze(2) for t in x)).squeeze(2)
        assert torch.equal(a, b), f"conv1d: max diff {(a - b).abs().max() / scale:.3f} LSB"


# --- torchao's dynamic int8 linear pattern. Its own convert_pt2e fails on XNNPACK's dynamic
# config (in PortNodeMetaForQDQ), so the q/dq graph is written out as its converter emits it.


def dynamic_linear_graph():
    root = torch.nn.Module()
    root.register_buffer("w", (randn(5, 8, seed=7) * 60).round().clamp(-127, 127).to(torch.int8))
    root.register_buffer("b", randn(5, seed=8))
    g = fx.Graph()
    x = g.placeholder("x")
    choose = g.call_function(qd.choose_qparams.tensor, (x, -128, 127, 2**-12, torch.int8))
    scale, zp = (g.call_function(operator.getitem, (choose, i)) for i in (0, 1))
    xq = g.call_function(qd.quantize_per_tensor.tensor, (x, scale, zp, -128, 127, torch.int8))
    xdq = g.call_function(qd.dequantize_per_tensor.tensor, (xq, scale, zp, -128, 127, torch.int8))
    w_args = (g.get_attr("w"), 0.01, 0, -127, 127, torch.int8)
    wdq = g.call_function(qd.dequantize_per_tensor.default, w_args)
    g.output(g.call_function(aten.linear.default, (xdq, wdq, g.get_attr("b"))))
    return fx.GraphModule(root, g)


def test_dynamic_quantized_linear():
    expected, got = rewrite_both(dynamic_linear_graph())
    assert signature(got) == signature(expected)
    assert op_counts(got)["out_dtype"] == 2  # int32 linear, int32 bias; the output is float
    assert_integer_form(got)
    assert_same_outputs(got, expected, eval_inputs([(2, 8)]), None, "dynamic linear")


def test_default_expectation_excuses_torchao_only_for_the_bias_less_linear_defect():
    """`qref check torchao-pt2e` expects its reference representation properties to fail only
    with the message this defect produces; any other failure stays a failure."""
    from importlib.resources import files

    from properties._support import cannot_run_message
    from qref.expectations import load

    entry = next(e for e in load(files("qref") / "default_expectations.toml") if e.converter == "torchao-pt2e")
    assert entry.matches("properties/test_equivalence.py::test_reference_representation_matches_reference")
    p = prepared(init(torch.nn.Linear(8, 5, bias=False), seed=3), [(2, 8)], int8())
    broken = convert_pt2e(copy.deepcopy(p), use_reference_representation=True)
    with pytest.raises(RuntimeError) as error:
        broken(*calibration_inputs([(2, 8)]))
    assert entry.expects(cannot_run_message(error.value))
    assert not entry.expects(cannot_run_message(RuntimeError("shape mismatch")))
    qref.convert_pt2e(p, use_reference_representation=True)(*calibration_inputs([(2, 8)]))  # qref's runs


def test_graph_input_ties_are_kept_under_the_named_input_rounding_allowance():
    """At exact ties of the input scale the representation's round(x / s) and the q/dq graph's
    round(x * float32(1 / s)) may round 1 LSB apart (INPUT_ROUNDING): the property keeps such
    inputs, fed as the representation rounds them, on which both forms quantize alike."""
    from properties.test_equivalence import _graph_input_quantizes, _inputs_rounded_alike
    from qref.compare import quantize_points

    p = prepared(init(LinearReluLinear(), seed=1), [(2, 8)], int8())
    qdq = qref.convert_pt2e(copy.deepcopy(p))
    ((name, (scale, zero_point, _, _)),) = _graph_input_quantizes(qdq).items()
    candidates = (torch.arange(-128, 127, dtype=torch.float32) + 0.5) * scale  # halves of the input scale
    differ = torch.round(candidates / scale) != torch.round(candidates * (1.0 / scale))
    assert differ.any(), "no tie rounds apart at this scale: the allowance would be untested"
    ties = torch.cat([candidates[differ][:8], candidates[~differ][:8]])
    ties = torch.cat([ties, ties[: 16 - len(ties)]]).reshape(2, 8)  # the model's input shape
    apart = torch.round(ties / scale) != torch.round(ties * (1.0 / scale))
    ((snapped,),), replaced = _inputs_rounded_alike(qdq, [(ties,)])
    assert replaced == int(apart.sum()) and torch.equal(snapped[~apart], ties[~apart])
    # on the snapped input the q/dq graph quantizes as the representation rounds the tie
    q = quantize_points(qdq, [snapped])[name][0].to(torch.int64)
    representation = torch.clamp(torch.round(ties / scale) + zero_point, -128, 127).to(torch.int64)
    assert torch.equal(q, representation)
