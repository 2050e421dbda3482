"""The model zoo, quantizer setups and prepare helpers work, and torchao converts them.

The default run keeps to a budget (~1 min on 2 cores): every small model under
the two main PTQ setups and the two main QAT setups (QAT: 1-d conv models
excluded, each new conv kind costs torchao ~6 s of pattern exports), the other
setups on a few core models, ``mobilenet_v2_like`` under ``x86_ptq_pc`` only.
Everything else (the full model x setup matrix, mobilenet's train export, the
5000-node chain, the check that qref/_torchao_patterns.py changes nothing)
is marked ``slow`` (``--run-slow``).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from qref import _torchao_patterns as torchao_patterns
from fixtures import zoo as Z
from fixtures.prepare import (
    EVAL_SEED_OFFSET,
    all_pairs,
    calibration_inputs,
    export_model,
    finish_qat,
    inputs,
    observer_nodes,
    prepare,
    supported,
)
from qref.quantizers import SETUPS
from qref._quiet import import_torchao_quietly, quiet_loggers

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e  # noqa: E402

MODELS = list(Z.ZOO)
BIG = "mobilenet_v2_like"
# default-run matrix (see module doc)
FAST_SETUPS_ALL_MODELS = ("x86_ptq_pc", "qref_int8_sym", "x86_qat_pc", "qref_int8_sym_qat")
CORE_MODELS = ("conv_bn_relu", "conv_transpose2d_bn", "residual_add", "cat_branches",
               "sigmoid_tanh", "linear_bn")
ONE_D_MODELS = ("conv1d_bn_relu", "conv_transpose1d_bn")


def _is_fast(m: str, s: str) -> bool:
    if m == BIG:
        return s == "x86_ptq_pc"
    if SETUPS[s].is_qat and m in ONE_D_MODELS:
        return False
    return s in FAST_SETUPS_ALL_MODELS or m in CORE_MODELS


def _pair_param(m: str, s: str):
    marks = [] if _is_fast(m, s) else [pytest.mark.slow]
    return pytest.param(m, s, id=f"{m}-{s}", marks=marks)


# Pairs that prepare: every pair except QAT on models torchao's QAT flow cannot take.
PAIRS = [
    _pair_param(m, s)
    for m, s in all_pairs()
    if not (SETUPS[s].is_qat and not Z.ZOO[m].qat_ok)
]


def _out(gm, args):
    with torch.no_grad():
        y = gm(*args)
    return y if isinstance(y, (tuple, list)) else (y,)


# ----------------------------------------------------------------------------
# zoo
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_builds_runs_and_is_reproducible(name):
    z = Z.ZOO[name]
    assert z.name == name and z.description
    rng = torch.get_rng_state()
    m1, m2 = z.build(), z.build()
    assert torch.equal(torch.get_rng_state(), rng), "build() touched the global RNG"
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(p.dtype == torch.float32 for p in m1.parameters())

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, x2 = z.example_inputs(g1), z.example_inputs(g2)
    assert isinstance(x1, tuple) and all(torch.equal(a, b) for a, b in zip(x1, x2))
    for mode in ("eval", "train"):
        getattr(m1, mode)()
        for y in _out(m1, x1):
            assert torch.isfinite(y).all()

    bns = [m for m in m1.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert z.has_bn == bool(bns)
    assert ("bn" in z.ops) == z.has_bn
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", MODELS)
def test_zoo_fx_traceable_flag(name):
    z = Z.ZOO[name]
    try:
        torch.fx.symbolic_trace(z.build())
        traceable = True
    except Exception:
        traceable = False
    assert traceable == z.fx_traceable


@pytest.mark.parametrize(
    "name,train",
    [
        pytest.param(m, t, id=f"{m}-{'train' if t else 'eval'}",
                     marks=[pytest.mark.slow] if (m == BIG and t) else [])
        for m in MODELS
        for t in (False, True)
    ],
)
def test_zoo_model_exports(name, train):
    z = Z.ZOO[name]
    gm = export_model(z, train=train)
    assert isinstance(gm, torch.fx.GraphModule)
    if not train:  # eval export must match eager exactly enough
        m = z.build().eval()
        args = inputs(z, 0)
        for a, b in zip(_out(m, args), _out(gm, args)):
            torch.testing.assert_close(a, b)
    # export_model returns independent copies
    assert export_model(z, train=train) is not gm


def test_zero_gamma_model_has_zero_gammas():
    bn = Z.ZOO["conv_bn_zero_gamma"].build().bn
    assert (bn.weight == 0).any() and (bn.weight != 0).any()


def test_some_bn_has_nondefault_eps_and_momentum():
    bn2 = Z.ZOO["conv_bn_relu"].build().bn2
    assert bn2.eps == 1e-3 and bn2.momentum == 0.05


def test_mobilenet_prepared_graph_is_large(prepared_cache):
    p = prepared_cache.get(BIG, "x86_ptq_pc")
    assert len(p.graph.nodes) >= 500


@pytest.mark.parametrize(
    "n", [50, 500, pytest.param(5000, marks=pytest.mark.slow)], ids=lambda n: f"n{n}"
)
def test_chain_hits_target_size(n):
    z = Z.chain(n)
    assert z.name.startswith("chain_")
    gm = export_model(z, train=False, cache=False)
    got = len(gm.graph.nodes)
    assert abs(got - n) <= 0.2 * n, f"chain({n}) exported to {got} nodes"


def test_chain_block_constants():
    for nb in (1, 3):
        gm = export_model(Z.chain_blocks(nb), train=False, cache=False)
        assert len(gm.graph.nodes) == Z.CHAIN_FIXED_NODES + nb * Z.CHAIN_NODES_PER_BLOCK


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------


def test_inputs_are_seeded_scaled_and_disjoint_from_calibration():
    name = "conv_bn_relu"
    a, b = inputs(name, 0), inputs(name, 0)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(inputs(name, 1)[0], a[0])
    torch.testing.assert_close(inputs(name, 0, scale=50.0)[0], a[0] * 50.0)
    assert not inputs(name, 0, scale=0.0)[0].any()
    calib = calibration_inputs(name, 0, 4)
    assert all(not torch.equal(c[0], a[0]) for c in calib)
    assert torch.equal(calibration_inputs(name, 0, 4)[3][0], calib[3][0])
    assert EVAL_SEED_OFFSET > 1000


# ----------------------------------------------------------------------------
# prepare + torchao convert
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,setup_name", PAIRS)
def test_prepares_and_torchao_converts(prepared_cache, model_name, setup_name):
    setup = SETUPS[setup_name]
    prepared = prepared_cache.get(model_name, setup_name)
    n_obs = len(observer_nodes(prepared))
    assert (n_obs > 0) == supported(model_name, setup_name), (
        f"supported() says {supported(model_name, setup_name)} but the prepared graph "
        f"has {n_obs} observers"
    )
    args = inputs(model_name, 0)
    for y in _out(prepared, args):
        assert torch.isfinite(y).all()

    converted = convert_pt2e(prepared)
    if setup.is_qat:
        finish_qat(converted)
    assert not observer_nodes(converted)
    for scale in (1.0, 50.0):
        for y in _out(converted, inputs(model_name, 0, scale)):
            assert torch.isfinite(y).all()


def test_prepared_cache_hands_out_independent_copies(prepared_cache):
    a = prepared_cache.get("linear", "qref_int8_sym")
    b = prepared_cache.get("linear", "qref_int8_sym")
    assert a is not b and a.graph is not b.graph
    convert_pt2e(a)  # mutates a
    assert observer_nodes(b) and observer_nodes(prepared_cache.get("linear", "qref_int8_sym"))


def test_zero_gamma_is_ptq_only():
    for s in SETUPS.values():
        assert supported("conv_bn_zero_gamma", s) == (not s.is_qat)


# ----------------------------------------------------------------------------
# quantizer coverage
# ----------------------------------------------------------------------------

EXPECTED_OBS_KINDS = {
    "MinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "HistogramObserver",
    "FakeQuantize",
    "FusedMovingAvgObsFakeQuantize",
    "FixedQParamsObserver",
    "FixedQParamsFakeQuantize",
    "DerivedObserverOrFakeQuantize",
}


def _kinds(gm) -> set[str]:
    out = set()
    for n in observer_nodes(gm):
        mod = gm.get_submodule(n.target)
        out.add(type(mod).__name__)
        inner = getattr(mod, "activation_post_process", None)
        if inner is not None:
            out.add(type(inner).__name__)
    return out


def test_setups_cover_every_observer_kind(prepared_cache):
    seen: set[str] = set()
    for s in SETUPS:
        for m in ("sigmoid_tanh", "cat_branches"):
            seen |= _kinds(prepared_cache.get(m, s))
    assert EXPECTED_OBS_KINDS <= seen, EXPECTED_OBS_KINDS - seen


@pytest.mark.parametrize("setup_name", ["qref_int8_sym", "qref_int8_sym_qat"])
def test_qref_quantizer_specs(prepared_cache, setup_name):
    # conv_transpose weights are per-channel on axis 1, biases derived per channel
    p = prepared_cache.get("conv_transpose2d_bn", setup_name)
    convt = next(
        n for n in p.graph.nodes if n.target == torch.ops.aten.conv_transpose2d.input
    )
    w_obs = p.get_submodule(convt.args[1].target)
    assert w_obs.ch_axis == 1
    b_obs = p.get_submodule(convt.args[2].target)
    assert type(b_obs).__name__ == "DerivedObserverOrFakeQuantize"
    assert b_obs.dtype == torch.int32
    scale, zp = b_obs.calculate_qparams()
    assert scale.numel() == convt.meta["val"].shape[1] and not zp.any()

    # cat inputs and output share one observer
    p = prepared_cache.get("cat_branches", setup_name)
    cat = next(n for n in p.graph.nodes if n.target == torch.ops.aten.cat.default)
    in_obs = {p.get_submodule(a.target) for a in cat.args[0]}
    (user,) = cat.users
    assert len(in_obs) == 1 and p.get_submodule(user.target) in in_obs

    # sigmoid / tanh outputs have fixed qparams
    p = prepared_cache.get("sigmoid_tanh", setup_name)
    for target, zp_expected in (
        (torch.ops.aten.sigmoid.default, -128),
        (torch.ops.aten.tanh.default, 0),
    ):
        node = next(n for n in p.graph.nodes if n.target == target)
        (user,) = node.users
        scale, zp = p.get_submodule(user.target).calculate_qparams()
        assert int(zp) == zp_expected and 0 < float(scale) < 0.01


def test_x86_per_tensor_vs_per_channel(prepared_cache):
    for setup_name, qscheme in (
        ("x86_ptq_pc", torch.per_channel_symmetric),
        ("x86_ptq_pt", torch.per_tensor_symmetric),
        ("x86_qat_pc", torch.per_channel_symmetric),
        ("x86_qat_pt", torch.per_tensor_symmetric),
    ):
        p = prepared_cache.get("linear", setup_name)
        lin = next(n for n in p.graph.nodes if n.target == torch.ops.aten.linear.default)
        assert p.get_submodule(lin.args[1].target).qscheme == qscheme, setup_name


# ----------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------


def test_import_torchao_quietly_is_idempotent_and_restores_levels():
    lg = logging.getLogger("torchao")
    before = lg.level
    mod = import_torchao_quietly()
    assert mod is import_torchao_quietly()
    assert mod.__name__ == "torchao"
    assert lg.level == before
    with quiet_loggers():
        assert logging.getLogger("torch.utils._pytree").getEffectiveLevel() >= logging.ERROR
    assert lg.level == before


def test_pattern_cache_is_active(prepared_cache):
    assert torchao_patterns.is_enabled()
    prepared_cache.get("conv_bn_relu", "x86_qat_pc")  # prepare_qat_pt2e uses patterns
    st = torchao_patterns.stats()
    assert st["misses"] + st["hits"] > 0 and st["size"] > 0


@pytest.mark.slow
def test_pattern_accelerator_changes_nothing():
    """Prepared/converted code, weights, node metadata and outputs are identical
    with torchao's own pattern functions and with qref._torchao_patterns."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as convert

    cases = [
        ("conv_transpose2d_bn", "qref_int8_sym_qat"),
        ("conv1d_bn_relu", "qref_int8_sym_qat"),
        ("residual_add", "x86_qat_pc"),
        ("linear_bn", "x86_qat_pc"),
        ("conv_nobias_bn", "x86_qat_pt"),
    ]

    def snapshot(m, s):
        p = prepare(m, s, cache_export=False)
        prepared_code = p.code
        c = finish_qat(convert(p))
        meta = [
            (n.name, str(n.target), sorted(n.meta), n.meta.get("stack_trace"),
             str(n.meta.get("nn_module_stack")), str(n.meta.get("val")))
            for n in c.graph.nodes
        ]
        outs = [y for i in range(2) for sc in (1.0, 30.0) for y in _out(c, inputs(m, i, sc))]
        return prepared_code, c.code, dict(c.state_dict()), outs, meta

    torchao_patterns.disable(clear_cache=False)
    try:
        plain = {case: snapshot(*case) for case in cases}
    finally:
        torchao_patterns.enable()
    for case in cases:
        a, b = plain[case], snapshot(*case)
        assert a[0] == b[0] and a[1] == b[1], case
        assert a[2].keys() == b[2].keys()
        assert all(torch.equal(a[2][k], b[2][k]) for k in a[2]), case
        assert all(torch.equal(x, y) for x, y in zip(a[3], b[3])), case
        assert a[4] == b[4], case
