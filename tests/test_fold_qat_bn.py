"""``qref.pt2e.fold_qat_bn.fold_qat_conv_bn`` is bit-exact with torchao's ``_fold_conv_bn_qat``.

Input of both: ``_convert_to_reference_decomposed_fx(prepared)`` of a
``prepare_qat_pt2e`` model trained for a few forward passes (train-mode graph,
as in torchao's QAT tutorial, or moved to eval with
``move_exported_model_to_eval`` before convert — both are valid inputs).

Each setup is one model holding many conv-bn branches (conv1d / conv2d /
conv_transpose1d / conv_transpose2d x bias x relu x groups), so a single
torchao call checks them all: torchao's fold costs ~25 s of pattern tracing
per process (memoised by ``tests/conftest.py``) plus ~0.1-0.3 s per branch.

Quantizers: XNNPACKQuantizer (torchao.testing; conv1d/2d and conv_transpose1d/2d
with BN, per-channel axis 0 or per-tensor, float bias), X86InductorQuantizer
(conv2d only in QAT; per-channel default and a per-tensor weight variant), and
``qref.quantizers.QrefQuantizer`` (int32 bias *derived* from input and
weight scales, so the bias is q/dq'd; per-channel weight axis 1 for
conv_transpose).

Not covered because torchao cannot produce it: grouped conv_transpose in QAT
(``prepare_qat_pt2e``'s simulation scales the weight along axis 1 with all
``out`` channels and fails with a shape error for groups > 1), conv3d (never
fused by prepare nor folded by convert).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from qref._quiet import import_torchao_quietly, silence_noise

import_torchao_quietly()
silence_noise()

from qref.quantizers import QrefQuantizer, QrefQuantizerConfig, x86_qat  # noqa: E402
from torchao.quantization.pt2e import (  # noqa: E402
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.convert import _convert_to_reference_decomposed_fx  # noqa: E402
from torchao.quantization.pt2e.qat_utils import _fold_conv_bn_qat  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.testing.pt2e._xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)

from qref.fold import fold_conv_bn_weights  # noqa: E402
from qref.pt2e.fold_qat_bn import fold_qat_conv_bn  # noqa: E402

aten = torch.ops.aten
BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit.default,
          aten._native_batch_norm_legit_no_training.default}
QDQ = torch.ops.quantized_decomposed

# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------

KINDS = {  # name -> (conv class, bn class, spatial dims)
    "c1": (nn.Conv1d, nn.BatchNorm1d, 1),
    "c2": (nn.Conv2d, nn.BatchNorm2d, 2),
    "t1": (nn.ConvTranspose1d, nn.BatchNorm1d, 1),
    "t2": (nn.ConvTranspose2d, nn.BatchNorm2d, 2),
}


class Branch(nn.Module):
    def __init__(self, kind, bias=True, relu=False, groups=1, stride=1, eps=1e-5, momentum=0.1):
        super().__init__()
        conv, bn, self.dim = KINDS[kind]
        self.conv = conv(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias)
        self.bn = bn(6, eps=eps, momentum=momentum)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Branches(nn.Module):
    """Independent conv-bn branches over a 1d input ``x1`` and a 2d input ``x2``."""

    def __init__(self, specs: dict[str, dict]):
        super().__init__()
        self.b = nn.ModuleDict({name: Branch(**kw) for name, kw in specs.items()})

    def forward(self, x1, x2):
        return tuple(m(x1 if m.dim == 1 else x2) for m in self.b.values())


def inputs(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(2, 4, 12, generator=g), scale * torch.randn(2, 4, 7, 7, generator=g))


def matrix(kinds, biases=(True, False), relus=(False, True), grouped=True) -> dict[str, dict]:
    specs = {}
    for kind in kinds:
        for bias in biases:
            for relu in relus:
                specs[f"{kind}_b{int(bias)}_r{int(relu)}"] = dict(kind=kind, bias=bias, relu=relu)
        if grouped and kind[0] == "c":  # torchao QAT cannot do grouped conv_transpose
            specs[f"{kind}_g2"] = dict(kind=kind, groups=2, stride=2)
            specs[f"{kind}_dw"] = dict(kind=kind, groups=2, relu=True)
    return specs


def _xnnpack(per_channel):
    return XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=True))


def _qref_bias(per_channel):
    observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    return QrefQuantizer(QrefQuantizerConfig(
        act_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
        weight_ctr=FakeQuantize.with_args(observer=observer),
        is_qat=True,
        quantize_bias=True,
    ))


ALL = tuple(KINDS)
SETUPS = {  # name -> (make quantizer, branch specs)
    "xnnpack_pc": (lambda: _xnnpack(True), {
        **matrix(ALL),
        # torchao's prepare silently replaces this eps/momentum by 1e-5/0.1
        "c2_eps": dict(kind="c2", eps=0.1, momentum=0.3),
    }),
    "xnnpack_pt": (lambda: _xnnpack(False), matrix(ALL, relus=(False,))),
    "qref_bias_pc": (lambda: _qref_bias(True), matrix(ALL, biases=(True,))),
    "qref_bias_pt": (lambda: _qref_bias(False), matrix(ALL, biases=(True,), grouped=False)),
    "x86_pc": (lambda: x86_qat(True), matrix(["c2"])),
    "x86_pt": (lambda: x86_qat(False), matrix(["c2"], relus=(False,))),
}

_PREPARED: dict[str, torch.fx.GraphModule] = {}


def prepared(setup: str, eval_graph: bool) -> torch.fx.GraphModule:
    """Export (train mode), prepare_qat_pt2e, 3 training forward passes; cached."""
    if setup not in _PREPARED:
        make_quantizer, specs = SETUPS[setup]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Branches(specs)
        gm = torch.export.export(model, inputs(0)).module()
        gm = prepare_qat_pt2e(gm, make_quantizer())
        for step in range(3):
            gm(*inputs(100 + step))
        # A zero gamma after training: that channel folds to weight 0, bias beta.
        for name, mod in gm.named_modules():
            if name.endswith("bn") and hasattr(mod, "weight"):
                with torch.no_grad():
                    mod.weight[0] = 0.0
                break
        _PREPARED[setup] = gm
    gm = copy.deepcopy(_PREPARED[setup])
    if eval_graph:
        move_exported_model_to_eval(gm)
    return gm


# ----------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------


def _attr(gm, target):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _attrs(gm) -> dict[str, torch.Tensor]:
    return {n.target: _attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def _bn_count(gm) -> int:
    return sum(n.op == "call_function" and n.target in BN_OPS for n in gm.graph.nodes)


def _call_targets(gm) -> collections.Counter:
    # in-place add_ is torchao's num_batches_tracked bookkeeping; see test below
    return collections.Counter(
        str(n.target) for n in gm.graph.nodes
        if n.op == "call_function" and n.target != aten.add_.Tensor
    )


_FOLDED: dict = {}


def folded(setup: str, eval_graph: bool):
    """``(ref, torchao's fold, qref's fold)`` for a setup; cached."""
    key = (setup, eval_graph)
    if key not in _FOLDED:
        ref = _convert_to_reference_decomposed_fx(prepared(setup, eval_graph))
        _FOLDED[key] = (ref, _fold_conv_bn_qat(copy.deepcopy(ref)), fold_qat_conv_bn(copy.deepcopy(ref)))
    return _FOLDED[key]


def assert_bit_exact(ref, expected=None, got=None, expect_folded: int | None = None):
    """Compare torchao's and qref's fold of ``ref`` (computed here unless given)."""
    if expected is None:
        expected = _fold_conv_bn_qat(copy.deepcopy(ref))
        got = fold_qat_conv_bn(copy.deepcopy(ref))

    # same number of BNs left (none, for every branch torchao can fold)
    assert _bn_count(got) == _bn_count(expected)
    if expect_folded is not None:
        assert _bn_count(ref) - _bn_count(got) == expect_folded

    # outputs bit-equal, also far outside the calibration range (saturation)
    for seed, scale in [(1, 1.0), (2, 1.0), (3, 50.0), (4, 0.0), (5, 1e-3)]:
        xs = inputs(seed, scale)
        for e, g in zip(expected(*xs), got(*xs), strict=True):
            assert torch.equal(e, g), f"outputs differ (seed={seed}, scale={scale}): max |diff| {(e - g).abs().max()}"

    # every attribute the graph reads (folded weights and biases, qparams) is bit-equal
    e_attrs, g_attrs = _attrs(expected), _attrs(got)
    assert e_attrs.keys() - {t for t in e_attrs if t.endswith("num_batches_tracked")} == \
        g_attrs.keys() - {t for t in g_attrs if t.endswith("num_batches_tracked")}
    for target, g in g_attrs.items():
        if target not in e_attrs:
            continue  # num_batches_tracked of an unfolded BN2d (see test_add_bookkeeping_torchao_quirk)
        e = e_attrs[target]
        assert type(e) is type(g) and e.dtype == g.dtype and e.requires_grad == g.requires_grad, target
        assert torch.equal(e, g), f"attribute {target} differs"

    # same ops (multiset), and the conv / q / dq nodes kept their metadata
    assert _call_targets(got) == _call_targets(expected)
    ref_nodes = {n.name: n for n in ref.graph.nodes}
    kept = 0
    for n in got.graph.nodes:
        if n.op == "call_function" and (
            n.target in (aten.conv1d.default, aten.conv2d.default,
                         aten.conv_transpose1d.default, aten.conv_transpose2d.input)
            or getattr(n.target, "namespace", None) == "quantized_decomposed"
        ):
            r = ref_nodes[n.name]
            assert n.meta.keys() == r.meta.keys(), n.name
            for key in ("nn_module_stack", "stack_trace", "from_node"):
                assert repr(n.meta.get(key)) == repr(r.meta.get(key)), (n.name, key)
            kept += 1
    assert kept
    return expected, got


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------

# The default run covers all four convs, per-channel and per-tensor weights,
# float and quantized bias, train and eval graphs; the rest is marked slow.
FAST = [("xnnpack_pc", False), ("qref_bias_pt", True), ("x86_pc", False)]
CASES = [pytest.param(s, ev, id=f"{s}-{'eval' if ev else 'train'}",
                      marks=() if (s, ev) in FAST else pytest.mark.slow)
         for s in SETUPS for ev in (False, True)]


@pytest.mark.parametrize("setup,eval_graph", CASES)
def test_bit_exact_with_torchao(setup, eval_graph):
    ref, expected, got = folded(setup, eval_graph)
    n_branches = len(SETUPS[setup][1])
    assert _bn_count(ref) == n_branches
    assert_bit_exact(ref, expected, got, expect_folded=n_branches)
    assert _bn_count(got) == 0
    # no BN bookkeeping left for folded BNs (torchao leaves it for BatchNorm1d)
    assert not any(n.target == aten.add_.Tensor for n in got.graph.nodes)
    # a quantized bias stays quantized, now of the folded bias
    if setup.startswith("qref_bias"):
        convs = [n for n in got.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
        assert all(getattr(c.args[2], "target", None) in (QDQ.dequantize_per_tensor.default,
                                                          QDQ.dequantize_per_channel.default)
                   for c in convs)


def test_torchao_replaces_bn_eps_and_momentum():
    """Surprise documented: prepare_qat_pt2e rewrites BN(eps=0.1, momentum=0.3)
    with the literals eps=1e-5, momentum=0.1 of its QAT pattern (so QAT trains
    and folds with eps 1e-5, not the model's 0.1).  qref folds with the graph's
    eps, which on prepared graphs is always that 1e-5: bit-exact (xnnpack_pc)."""
    ref, _, _ = folded("xnnpack_pc", False)
    bn = next(n for n in ref.graph.nodes if n.target == aten.batch_norm.default
              and "c2_eps" in str(n.args[1].target))
    assert bn.args[6:8] == (0.1, 1e-5)  # momentum, eps


def test_torchao_fold_ignores_graph_eps():
    """torchao's fold takes eps from its *replacement* pattern (literal 1e-5),
    not from the graph; qref uses the graph's BN eps.  Only a hand-edited graph
    can tell them apart."""
    ref = copy.deepcopy(folded("x86_pc", False)[0])
    for n in ref.graph.nodes:
        if n.target == aten.batch_norm.default:
            n.args = (*n.args[:7], 0.1, *n.args[8:])
        elif n.target == aten.add.Tensor and n.args[1] == 1e-5:  # sqrt(var + eps)
            n.args = (n.args[0], 0.1)
    ref.recompile()
    expected = _fold_conv_bn_qat(copy.deepcopy(ref))
    got = fold_qat_conv_bn(copy.deepcopy(ref))
    conv, bn = ref.b.c2_b1_r0.conv, ref.b.c2_b1_r0.bn
    for fold, eps in ((expected, 1e-5), (got, 0.1)):
        w, _ = fold_conv_bn_weights(conv.weight.detach(), conv.bias.detach(), bn.running_mean,
                                    bn.running_var, eps, bn.weight.detach(), bn.bias.detach())
        assert torch.equal(fold.b.c2_b1_r0.conv.weight, w)


def test_add_bookkeeping_torchao_quirk():
    """torchao removes the BN ``num_batches_tracked.add_(1)`` only for modules
    whose nn_module_stack says BatchNorm2d; qref removes it for every folded BN."""
    _, expected, got = folded("xnnpack_pc", False)
    left = [n.args[0].target for n in expected.graph.nodes if n.target == aten.add_.Tensor]
    assert left and all(".c1_" in t or ".t1_" in t for t in left)
    assert not any(n.target == aten.add_.Tensor for n in got.graph.nodes)


class _SharedConv(nn.Module):
    """conv output used by the BN and by an add: prepare does not fuse it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x1, x2):
        y = self.conv(x2)
        return (self.bn(y) + y,)


def test_multi_user_conv_model_is_left_alone():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _SharedConv()
    gm = prepare_qat_pt2e(torch.export.export(model, inputs(0)).module(), _xnnpack(True))
    for step in range(2):
        gm(*inputs(100 + step))
    ref = _convert_to_reference_decomposed_fx(gm)
    expected, got = assert_bit_exact(ref, expect_folded=0)
    assert _bn_count(got) == 1


def test_intermediate_with_outside_user_is_not_folded():
    """If the QAT conv (an intermediate of the pattern) gets another user, torchao's
    subgraph match fails and the BN stays; qref must do the same."""
    ref = copy.deepcopy(folded("x86_pc", False)[0])
    first_conv = next(n for n in ref.graph.nodes if n.target == aten.conv2d.default)
    out = next(n for n in ref.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], first_conv),)
    codegen = ref.graph._codegen  # the exported module's pytree output spec: one more leaf
    codegen.pytree_info = codegen.pytree_info._replace(
        out_spec=pytree.tree_structure(tuple(out.args[0])))
    ref.recompile()
    n_branches = len(SETUPS["x86_pc"][1])
    expected, got = assert_bit_exact(ref, expect_folded=n_branches - 1)
    assert _bn_count(got) == 1


def test_ptq_graph_without_bn_passes_through():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Branches(matrix(["c2"], relus=(True,), grouped=False)).eval()
    gm = prepare_pt2e(torch.export.export(model, inputs(0)).module(),
                      XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    gm(*inputs(100))
    ref = _convert_to_reference_decomposed_fx(gm)
    assert _bn_count(ref) == 0  # PTQ prepare folds BN into the conv itself
    code = ref.code
    assert fold_qat_conv_bn(ref) is ref
    assert ref.code == code
    assert _fold_conv_bn_qat(ref) is ref and ref.code == code


# ----------------------------------------------------------------------------
# the folding property's restored eps/momentum (properties/test_folding.py)
# ----------------------------------------------------------------------------


def test_restoring_bn_eps_and_momentum_gives_the_graph_a_keeping_prepare_would():
    """``test_conv_bn_matches_float_model`` writes the model's own BatchNorm eps and momentum back
    into a ``prepare_qat_pt2e`` graph (torchao 0.18 writes 1e-5 / 0.1 there) before calibration.
    That is legitimate only if it changes nothing but those literals and then computes the
    model's own BatchNorm: with fake-quantization off, the restored graph trains the running
    statistics exactly like the float model in train mode and agrees with its eval output; the
    graph as torchao prepared it does neither."""
    from torchao.quantization.pt2e import disable_fake_quant

    from properties.test_folding import _prepared_bn_settings, _set_bn_settings
    from qref.pt2e.eval_mode import move_to_eval

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Branch("c2", eps=0.1, momentum=0.3)
    example = (inputs(0)[1],)
    as_prepared = prepare_qat_pt2e(torch.export.export(copy.deepcopy(model).train(), example).module(),
                                   _xnnpack(True))
    restored = copy.deepcopy(as_prepared)
    _set_bn_settings(restored, 0.1, 0.3)
    assert _prepared_bn_settings(as_prepared) == [(0.1, 1e-5)]
    assert _prepared_bn_settings(restored) == [(0.3, 0.1)]
    changed = [(a.target, a.args, b.args) for a, b in zip(as_prepared.graph.nodes, restored.graph.nodes, strict=True)
               if a.format_node() != b.format_node()]
    assert [t for t, _, _ in changed] == [aten.add.Tensor, aten.batch_norm.default]  # sqrt(var + eps), the BN
    assert changed[0][1][1] == 1e-5 and changed[0][2][1] == 0.1
    assert changed[1][1][6:8] == (0.1, 1e-5) and changed[1][2][6:8] == (0.3, 0.1)

    float_model = copy.deepcopy(model).train()
    for gm in (as_prepared, restored):
        gm.apply(disable_fake_quant)
    with torch.no_grad():
        for step in range(3):
            x = inputs(100 + step)[1]
            float_model(x), as_prepared(x), restored(x)
    bn = float_model.bn
    assert torch.allclose(restored.bn.running_var, bn.running_var, rtol=1e-6, atol=0)
    assert torch.allclose(restored.bn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(as_prepared.bn.running_var, bn.running_var, rtol=1e-3, atol=0)  # momentum 0.1

    # eval (qref's move_to_eval: torchao's move_exported_model_to_eval rewrites the batch norm
    # from a pattern with the default eps, see below), then the float model's output
    move_to_eval(restored)
    float_model.eval()
    x = inputs(7)[1]
    with torch.no_grad():
        expected, got = float_model(x), restored(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


def test_torchao_move_to_eval_resets_bn_eps():
    """torchao 0.18's ``move_exported_model_to_eval`` rewrites a train-mode batch norm from a
    traced pattern with ``ignore_literals=True``: the eval batch norm gets the pattern's eps 1e-5
    (export_utils.py "TODO(Leslie): ... fails to support custom momentum and eps"), so the
    QAT property evaluates with qref's ``move_to_eval``, which keeps each op's arguments."""
    from properties.test_folding import _prepared_bn_settings, _set_bn_settings
    from qref.pt2e.eval_mode import move_to_eval

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Branch("c2", eps=0.1, momentum=0.3)
    gm = prepare_qat_pt2e(torch.export.export(model.train(), (inputs(0)[1],)).module(), _xnnpack(True))
    _set_bn_settings(gm, 0.1, 0.3)
    theirs, ours = copy.deepcopy(gm), copy.deepcopy(gm)
    move_exported_model_to_eval(theirs)
    move_to_eval(ours)
    assert [eps for _, eps in _prepared_bn_settings(ours)] == [0.1]
    assert [eps for _, eps in _prepared_bn_settings(theirs)] == [1e-5]


def test_torchao_constant_folding_runs_the_batch_norm_counter_of_the_prepared_model():
    """Pins torchao 0.18: with fold_quantize=True its constant folding evaluates the QAT graph's
    in-place ``num_batches_tracked.add_(1)`` (a subgraph of constants only), so the prepared model's
    counter moves by one; without folding, and in qref, it does not (the default expectation for
    the prepared-model-unchanged properties names this buffer only)."""
    import qref
    from qref.converters import resolve
    from qref.strategies.cases import prepare_case
    from qref.strategies.models import BatchNorm, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    spec = ModelSpec(input_shape=(2, 1, 1), layers=(Conv(1, 1, dim=1), BatchNorm(num_features=1, dim=1)))
    setup = QuantSetup("pt2e", qat=True, kind="qref", per_channel=False, act_dtype="int8", observer="minmax")
    x = torch.linspace(-1, 1, 2).reshape(2, 1, 1)
    torchao = resolve("torchao-pt2e").fn

    def counter_after(convert, **flags) -> int:
        prepared = prepare_case(spec, setup, [(x,)])
        counter = prepared.state_dict(keep_vars=True)["bn1.num_batches_tracked"]
        before = int(counter)
        convert(prepared, **flags)
        return int(counter) - before

    assert counter_after(torchao, fold_quantize=True) == 1
    assert counter_after(torchao, fold_quantize=False) == 0
    assert counter_after(qref.convert_pt2e, fold_quantize=True) == 0
