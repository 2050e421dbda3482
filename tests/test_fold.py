"""qref.fold: eval-mode conv + BatchNorm folding.

Oracles: the unfused float computation ``bn(conv(x))`` (within a derived float
tolerance), torch's ``fuse_conv_bn_eval`` / ``fuse_conv_bn_weights`` (bit-equal,
where torch is correct: every non-transposed conv, and transposed with
groups 1), and a per-channel loop for the grouped transposed layout.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from qref.fold import fold_conv_bn, fold_conv_bn_weights, fold_linear_bn_weights

CONVS = {
    "conv1d": (nn.Conv1d, nn.BatchNorm1d, 1),
    "conv2d": (nn.Conv2d, nn.BatchNorm2d, 2),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, 3),
    "convt1d": (nn.ConvTranspose1d, nn.BatchNorm1d, 1),
    "convt2d": (nn.ConvTranspose2d, nn.BatchNorm2d, 2),
    "convt3d": (nn.ConvTranspose3d, nn.BatchNorm3d, 3),
}
GROUPS = {  # name -> (in_channels, out_channels, groups)
    "g1": (4, 6, 1),
    "g2": (4, 6, 2),
    "dw": (4, 4, 4),  # depthwise: one channel per group (out/groups == 1)
    "dw_x2": (4, 8, 4),  # depthwise with channel multiplier 2
}
BNS = ["random", "zero_gamma", "eps_1", "eps_0.1", "non_affine", "tiny_var"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(kind, groups, bias, bn_kind, seed=0):
    conv_cls, bn_cls, dim = CONVS[kind]
    cin, cout, g = GROUPS[groups]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        conv = conv_cls(cin, cout, 3, stride=1, padding=1, groups=g, bias=bias)
    eps = {"eps_1": 1.0, "eps_0.1": 0.1}.get(bn_kind, 1e-5)
    bn = bn_cls(cout, eps=eps, affine=bn_kind != "non_affine")
    gen = _gen(seed + 1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(cout, generator=gen))
        bn.running_var.copy_(0.1 + 3 * torch.rand(cout, generator=gen))
        if bn_kind == "tiny_var":
            bn.running_var[::2] = 1e-7  # scale ~ 1/sqrt(eps): large folded weights
        if bn.affine:
            bn.weight.copy_(2 * torch.randn(cout, generator=gen))
            bn.bias.copy_(torch.randn(cout, generator=gen))
            if bn_kind == "zero_gamma":
                bn.weight[::2] = 0.0
    bn.eval()
    x = torch.randn(2, cin, *([5] * dim), generator=_gen(seed + 2))
    return conv, bn, x


def error_bound(conv, bn, x):
    """Elementwise bound on |fold(conv, bn)(x) - bn(conv(x))| in float32.

    With s = gamma / sqrt(var + eps), output channel c of both computations is a
    sum of K = (in / groups) * prod(kernel) products w*x (each w multiplied by s
    before or after), plus (b - mean) * s + beta.  Standard summation analysis
    bounds each side's rounding error by about (K + 4) * u * M with
    u = 2**-24 and M = |s| * (|w| conv |x|) + |s| * (|b| + |mean|) + |beta|
    (reassociation only: the two sides add the same terms in another order and
    round s*w vs. s*(sum w x)).  We allow 4 * (K + 8) * u * M for both sides
    together; the factor covers rsqrt vs. 1/sqrt and the kernel's blocking.
    """
    u = 2.0**-24
    k = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    s = (gamma / torch.sqrt(bn.running_var + bn.eps)).abs()
    abs_conv = copy.deepcopy(conv)
    with torch.no_grad():
        abs_conv.weight.abs_()
        abs_conv.bias = None
        b = conv.bias.detach().abs() if conv.bias is not None else 0.0
        shape = [-1] + [1] * (x.dim() - 2)
        magnitude = (
            s.reshape(shape) * (abs_conv(x.abs()) + (b + bn.running_mean.abs()).reshape(shape))
            + beta.abs().reshape(shape)
        )
    return 4 * (k + 8) * u * magnitude


def _snapshot(*modules):
    return [({k: v.clone() for k, v in m.state_dict().items()}, m.training) for m in modules]


def _same_snapshot(a, b):
    return all(
        ta == tb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        for (sa, ta), (sb, tb) in zip(a, b)
    )


# every conv x groups x bias with random BN statistics; the BN edge cases
# (zero gamma, eps 1 and 0.1, non-affine, tiny variance) on groups 1 and depthwise
CASES = [
    pytest.param(kind, groups, bias, bn_kind, id=f"{kind}-{groups}-{'bias' if bias else 'nobias'}-{bn_kind}")
    for kind in CONVS
    for groups in GROUPS
    for bias in (True, False)
    for bn_kind in BNS
    if bn_kind == "random" or groups in ("g1", "dw")
]


@pytest.mark.parametrize("kind,groups,bias,bn_kind", CASES)
def test_fold_matches_unfused(kind, groups, bias, bn_kind):
    conv, bn, x = make(kind, groups, bias, bn_kind)
    before = _snapshot(conv, bn)
    folded = fold_conv_bn(conv, bn)

    assert type(folded) is type(conv) and folded is not conv
    assert folded.bias is not None and folded.weight.shape == conv.weight.shape
    assert _same_snapshot(before, _snapshot(conv, bn)), "inputs were mutated"
    assert (conv.bias is None) == (not bias)

    with torch.no_grad():
        want = bn(conv(x))
        got = folded(x)
    assert torch.all((got - want).abs() <= error_bound(conv, bn, x))
    if bn_kind == "zero_gamma":  # those output channels are exactly beta
        zero = torch.nonzero(bn.weight == 0).flatten()
        beta = bn.bias.detach()[zero].reshape([1, -1] + [1] * (x.dim() - 2))
        assert torch.equal(got[:, zero], beta.expand_as(got[:, zero]))

    # torch's fusion is the bit-exact oracle wherever it is correct
    transpose = kind.startswith("convt")
    if not transpose or GROUPS[groups][2] == 1:
        ref = fuse_conv_bn_eval(copy.deepcopy(conv).eval(), bn, transpose=transpose)
        assert torch.equal(folded.weight, ref.weight)
        assert torch.equal(folded.bias, ref.bias)


def _loop_fold_transposed(w, scale, groups):
    """Independent oracle: output channel c = g * (out/groups) + j is column j of
    the rows of group g in a [in, out/groups, *k] weight."""
    out = w.clone()
    in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
    for c in range(out_per_group * groups):
        g, j = divmod(c, out_per_group)
        rows = slice(g * in_per_group, (g + 1) * in_per_group)
        out[rows, j] = w[rows, j] * scale[c]
    return out


@pytest.mark.parametrize("groups", ["g2", "dw", "dw_x2"])
def test_grouped_transposed_layout(groups):
    conv, bn, _ = make("convt2d", groups, True, "random")
    folded = fold_conv_bn(conv, bn)
    scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
    want = _loop_fold_transposed(conv.weight.detach(), scale, conv.groups)
    assert torch.equal(folded.weight, want)
    # torch's helper scales axis 1 with all `out` channels (pytorch#180995):
    # a shape error, or (out/groups == 1) a silently broadcast, wrong-shaped weight.
    try:
        bad = fuse_conv_bn_eval(copy.deepcopy(conv).eval(), bn, transpose=True)
    except RuntimeError:
        return
    assert bad.weight.shape != conv.weight.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("none", ["", "conv_b", "bn_w", "bn_b", "conv_b,bn_w,bn_b"])
@pytest.mark.parametrize("transpose", [False, True])
def test_weights_bit_equal_to_torch(dtype, none, transpose):
    gen = _gen(7)
    out = 5
    w = torch.randn(3 if transpose else out, out if transpose else 3, 2, 2, generator=gen, dtype=dtype)
    t = {n: torch.randn(out, generator=gen, dtype=dtype) for n in ("conv_b", "rm", "bn_w", "bn_b")}
    rv = torch.rand(out, generator=gen, dtype=dtype) + 0.05
    for n in filter(None, none.split(",")):
        t[n] = None
    args = (w, t["conv_b"], t["rm"], rv, 1e-3, t["bn_w"], t["bn_b"])
    w_ref, b_ref = fuse_conv_bn_weights(*args, transpose=transpose)
    w_got, b_got = fold_conv_bn_weights(*args, transpose=transpose)
    assert w_got.dtype == w_ref.dtype and b_got.dtype == b_ref.dtype
    assert torch.equal(w_got, w_ref) and torch.equal(b_got, b_ref)
    assert not isinstance(w_got, nn.Parameter)  # plain tensors; fold_conv_bn wraps them


def test_errors():
    conv, bn, _ = make("conv2d", "g1", True, "random")
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        fold_conv_bn(nn.Linear(4, 6), bn)
    with pytest.raises(TypeError, match="BatchNorm"):
        fold_conv_bn(conv, nn.LayerNorm(6))
    with pytest.raises(ValueError, match=r"\.eval\(\)"):
        fold_conv_bn(conv, copy.deepcopy(bn).train())
    with pytest.raises(ValueError, match="6 output channels"):
        fold_conv_bn(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="BatchNorm2d"):
        fold_conv_bn(conv, nn.BatchNorm1d(6).eval())
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(6, track_running_stats=False).eval())
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        fold_conv_bn_weights(w, None, torch.zeros(5), torch.ones(5), 1e-5, None, None)
    with pytest.raises(ValueError, match="groups=4"):
        fold_conv_bn_weights(w, None, torch.zeros(6), torch.ones(6), 1e-5, None, None, groups=4)


def test_conv_mode_and_grad_flags_are_kept():
    conv, bn, _ = make("conv2d", "g1", False, "random")
    conv.train()
    folded = fold_conv_bn(conv, bn)
    assert folded.training and conv.training
    assert folded.weight.requires_grad and isinstance(folded.bias, nn.Parameter)


# --- Linear + BatchNorm1d (FX QAT LinearBn1d) ------------------------------------------


def _linear_bn_args(seed, dtype=torch.float32, out=7, none=""):
    gen = _gen(seed)
    w = torch.randn(out, 5, generator=gen, dtype=dtype)
    t = {n: torch.randn(out, generator=gen, dtype=dtype) for n in ("b", "rm", "bn_w", "bn_b")}
    rv = torch.rand(out, generator=gen, dtype=dtype) + 0.05
    for n in filter(None, none.split(",")):
        t[n] = None
    return w, t["b"], t["rm"], rv, 1e-3, t["bn_w"], t["bn_b"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_weights_bit_equal_to_torch(dtype, bias):
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    args = _linear_bn_args(3, dtype, none="" if bias else "b")
    w_ref, b_ref = fuse_linear_bn_weights(*args)
    w_got, b_got = fold_linear_bn_weights(*args)
    assert w_got.dtype == w_ref.dtype and b_got.dtype == b_ref.dtype
    assert torch.equal(w_got, w_ref) and torch.equal(b_got, b_ref)
    assert not isinstance(w_got, nn.Parameter)


def test_linear_bn_bias_order_is_not_the_conv_order():
    """Why a separate function: the conv order ((b - mean) * r) * gamma rounds differently from
    the linear order (b - mean) * (gamma * r) for some inputs, and torch's LinearBn1d uses the latter."""
    differs = False
    for seed in range(20):
        w, b, rm, rv, eps, bn_w, bn_b = _linear_bn_args(seed, out=64)
        _, b_linear = fold_linear_bn_weights(w, b, rm, rv, eps, bn_w, bn_b)
        _, b_conv = fold_conv_bn_weights(w[:, :, None], b, rm, rv, eps, bn_w, bn_b)
        differs |= not torch.equal(b_linear, b_conv)
    assert differs


@pytest.mark.parametrize("none", ["", "b", "bn_w", "bn_b", "b,bn_w,bn_b"])
def test_linear_bn_fold_matches_unfused(none):
    """``linear(x, w', b') == bn(linear(x, w, b))`` in float64, within the rounding of a
    K-term dot product: 4 * (K + 8) * u * M, M the magnitude of the terms (as error_bound)."""
    w, b, rm, rv, eps, bn_w, bn_b = _linear_bn_args(5, torch.float64, none=none)
    bn = nn.BatchNorm1d(w.shape[0], eps=eps, affine=bn_w is not None or bn_b is not None).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        if bn.affine:
            bn.weight.copy_(bn_w if bn_w is not None else torch.ones_like(rm))
            bn.bias.copy_(bn_b if bn_b is not None else torch.zeros_like(rm))
    x = torch.randn(9, w.shape[1], generator=_gen(6), dtype=torch.float64)
    fw, fb = fold_linear_bn_weights(w, b, rm, rv, eps, bn_w, bn_b)
    got = torch.nn.functional.linear(x, fw, fb)
    want = bn(torch.nn.functional.linear(x, w, b))
    gamma = bn_w if bn_w is not None else torch.ones_like(rm)
    beta = bn_b if bn_b is not None else torch.zeros_like(rm)
    s = (gamma / torch.sqrt(rv + eps)).abs()
    b_abs = b.abs() if b is not None else 0.0
    magnitude = s * (x.abs() @ w.abs().T + b_abs + rm.abs()) + beta.abs()
    assert torch.all((got - want).abs() <= 4 * (w.shape[1] + 8) * 2.0**-53 * magnitude)


def test_linear_bn_errors():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="2-d"):
        fold_linear_bn_weights(torch.randn(6, 4, 1), None, torch.zeros(6), torch.ones(6), 1e-5, None, None)
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        fold_linear_bn_weights(w, None, torch.zeros(5), torch.ones(5), 1e-5, None, None)
    with pytest.raises(ValueError, match="linear bias"):
        fold_linear_bn_weights(w, torch.zeros(4), torch.zeros(6), torch.ones(6), 1e-5, None, None)


def test_a_float32_fold_may_round_a_near_tie_weight_apart_from_the_float64_one():
    """Why test_conv_bn_matches_float_model allows more than 1 LSB where a folded weight lies near
    a rounding tie (found by CI, 2 LSB, on another CPU): a converter folds in float32 with
    gamma * rsqrt(var + eps) (qref and torch alike; rsqrt's last bit follows the CPU's vector
    code), the property's closed form in float64, and where the folded weight lies at a tie of the
    weight scale the two round to neighbouring integers.  Every such weight is one the property's
    ``_near_tie_steps`` marks: there, and only there, it takes the candidate's neighbouring
    integer for the expected output (``_expected_from_float``)."""
    from properties.test_folding import _closed_form, _near_tie_steps

    channels, scale = 7, 0.01
    bn = nn.BatchNorm2d(channels).eval()
    bn.running_var.copy_(torch.linspace(0.3, 3.0, channels))
    bn.weight.data.copy_(torch.linspace(0.5, 1.7, channels))
    factor = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, 1, 1, 1)
    ties = (torch.arange(-120, 120).double() + 0.5).reshape(1, 1, 1, -1)
    conv = nn.Conv2d(1, channels, (1, 240), bias=False)
    conv.weight.data.copy_((ties * scale / factor).float())  # folded, each lands (nearly) on a tie
    w32, _ = fold_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    w64, _ = _closed_form(conv, bn)
    integers32 = torch.round(w32.detach() / scale)  # how a converter's fold rounds (ties to even: both alike)
    integers64 = torch.round(w64.float() / scale)  # how the property's closed form rounds
    apart = integers32 != integers64
    assert apart.any(), "no near-tie weight rounded apart: the allowance would have nothing to cover"
    qp = (torch.tensor(scale, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), -128, 127, None)
    marked = _near_tie_steps(w64, qp) > 0
    assert bool(marked[apart].all()), "a weight rounded apart lies outside the property's near-tie margin"
    off_tie = w64 + 0.25 * scale  # a quarter step from every tie: nothing to allow for
    assert not bool((_near_tie_steps(off_tie, qp) > 0).any())
