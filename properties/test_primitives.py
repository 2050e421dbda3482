"""Property family 1: quantize / dequantize / fake-quantize primitives vs. qref.reference_numpy.

The reference states the documented contract ``clamp(round_half_even(x / scale) + zp)`` in float64.
The torch ops compute in float32: ``round(x * fl32(1/scale)) + zp`` then clamp (read
torch/ao/quantization/fx/_decomposed.py).  The only relaxation allowed is the float32 envelope:

* the product ``x * fl32(1/scale)`` has relative error < 2**-23 vs ``x / scale``, so an element
  may be 1 LSB off *only* when ``x / scale`` lies within ``|x/scale| * 2**-22`` of a half-integer;
* for ``|q| > 2**24`` (int32 ranges) the float32 ``+ zp`` and clamp bounds round to 1 ulp32.

Everything else is exact, in integer steps.  Known torch defects (see KNOWN_DEFECTS and the
``test_known_defect_*`` xfail(strict) reproducers) are excused only element-by-element and only
when the result has the defect's exact signature; every excuse is recorded as a Hypothesis event.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops
from hypothesis import assume, event
from hypothesis import strategies as st

from qref import reference_numpy as ref
from qref.tally import compared
from qref.strategies import FLOAT32_MAX, QDType, as_layout, float_tensors, layouts, qdtypes, qparams, shapes

from ._support import prop

# the tier marker here covers the strict-xfail pins below (plain tests); the properties declare it with @prop
pytestmark = [pytest.mark.qref_family("primitives"), pytest.mark.qref_tier("primitives")]

qd = torch.ops.quantized_decomposed
INT32_MIN = -(2**31)

KNOWN_DEFECTS = {
    "INT32_CLAMP_F32": "quantized_decomposed.quantize_per_*: quant_min/quant_max are rounded to float32 in "
                       "torch.clamp, so for int32 quant_max=2**31-1 saturation casts 2**31 -> int32 and wraps to "
                       "-2**31, and quant_min=-2**31+1 gives -2**31 (outside [quant_min, quant_max])",
    "FQ_PC_INT64_CAST": "fake_quantize_per_channel_affine: x/scale >= 2**63 (incl. +inf) overflows the "
                        "int64 cast and saturates to quant_min instead of quant_max",
    "DQ_PC_INT32_ZP_WRAP": "quantized_decomposed.dequantize_per_channel: int32 q - int32 zero_point is "
                           "computed in int32 and wraps",
    "INT32_F32_ADD": "quantized_decomposed.quantize_per_*: round(x/scale) + zp is added in float32, so for "
                     "int32 with |zp| > 2**24 even x=0 does not map to zero_point (tolerated as 1 ulp32 in P1)",
    "EAGER_ZP_BEFORE_ROUND": "torch.quantize_per_tensor rounds fl32(x/scale + zp) instead of round(x/scale) + zp: "
                             "1 LSB off at exact ties with odd zp (half-to-even parity) and at near-ties where "
                             "the float32 sum with zp loses the fraction",
}


# ---------------------------------------------------------------------------- helpers

@st.composite
def cases(draw, per_channel=None, dtypes=None, big=False):
    """(x, qparams) with x built to hit qparams' edges."""
    if big:
        qp = draw(qparams(per_channel=False, qdtype=qdtypes(dtypes)), label="qparams")
        return draw(float_tensors(qparams=qp, big=True), label="x"), qp
    shape = draw(shapes(), label="shape")
    qp = draw(qparams(per_channel=per_channel, shape=shape, qdtype=qdtypes(dtypes)), label="qparams")
    return draw(float_tensors(shape, qp), label="x"), qp


def _bcast(p: torch.Tensor, ndim: int, axis):
    return ref.broadcast_qparam(p.numpy(), ndim, axis)


def envelope(x: torch.Tensor, qp):
    """(ref, lo, hi): exact reference integers and the float32-arithmetic envelope around them."""
    x64 = x.double().numpy()
    s = _bcast(qp.scale.double(), x64.ndim, qp.axis)
    zp = _bcast(qp.zero_point.long(), x64.ndim, qp.axis)
    want = ref.quantize(x64, qp.scale.double().numpy(), qp.zero_point.long().numpy(),
                        qp.quant_min, qp.quant_max, qp.axis)
    with np.errstate(over="ignore", invalid="ignore"):
        v = x64 / s
        e = np.abs(v) * 2.0**-22
        r_lo, r_hi = np.rint(v - e), np.rint(v + e)
        r_lo = np.where(np.isnan(r_lo), v, r_lo)
        r_hi = np.where(np.isnan(r_hi), v, r_hi)
    lo_f = np.clip(r_lo, qp.quant_min - zp, qp.quant_max - zp) + zp
    hi_f = np.clip(r_hi, qp.quant_min - zp, qp.quant_max - zp) + zp
    mag = np.maximum(np.abs(lo_f), np.abs(hi_f))
    ulp = np.where(mag > 2.0**24, np.spacing(mag.astype(np.float32)).astype(np.float64), 0.0)
    lo = np.maximum(qp.quant_min, lo_f - ulp).astype(np.int64)
    hi = np.minimum(qp.quant_max, hi_f + ulp).astype(np.int64)
    return want, lo, hi


def check_integers(prop: str, op: str, x: torch.Tensor, qp, got: torch.Tensor, excuse=None):
    """Assert ``got`` (integers) is within the float32 envelope of the reference; explain otherwise."""
    compared()
    g = got.long().numpy()
    want, lo, hi = envelope(x, qp)
    bad = (g < lo) | (g > hi)
    if excuse is not None and bad.any():
        ok, name = excuse(g, want)
        if (bad & ok).any():
            event(f"excused known defect {name}")
        bad &= ~ok
    off = np.abs(g - want)
    if off.size:
        event(f"{op}: max |got - reference| = {min(int(off.max()), 2)}{'+' if off.max() > 2 else ''} LSB")
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        c = i[qp.axis] if qp.axis is not None else None
        s = float(qp.scale.reshape(-1)[c or 0])
        raise AssertionError(
            f"[{prop}] {op} disagrees with the reference clamp(round_half_even(x/scale)+zp) "
            f"beyond float32 rounding ({int(bad.sum())} of {bad.size} elements).\n"
            f"  qparams: {qp.describe()}\n  first offending element index {i}"
            f"{'' if c is None else f' (channel {c})'}: x={float(x[i])!r}, x/scale={float(x[i]) / s!r}\n"
            f"  expected q={int(want[i])} (float32 envelope [{int(lo[i])}, {int(hi[i])}]), got q={int(g[i])}, "
            f"off by {int(g[i]) - int(want[i])} LSB")


def decomposed_quantize(x, qp):
    if qp.axis is None:
        return qd.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), qp.quant_min, qp.quant_max, qp.dtype)
    return qd.quantize_per_channel(x, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max, qp.dtype)


def _f32_bound_as_int32(b: int) -> int:
    """What ``torch.clamp(f32, ..., b).to(int32)`` yields at the bound: fl32(b), wrapped if >= 2**31."""
    f = int(np.float32(b))
    return INT32_MIN if f >= 2**31 else f


def int32_wrap_excuse(qp):
    """INT32_CLAMP_F32 signature: reference within 1 ulp32 of a range end and got == the float32-rounded
    end as the op casts it (-2**31 for quant_max=2**31-1)."""
    def f(g, want):
        if qp.dtype != torch.int32:
            return np.zeros(g.shape, bool), "INT32_CLAMP_F32"
        hi_sig, lo_sig = _f32_bound_as_int32(qp.quant_max), _f32_bound_as_int32(qp.quant_min)
        near_hi = (want >= qp.quant_max - 256) & (g == hi_sig) & (hi_sig != qp.quant_max)
        near_lo = (want <= qp.quant_min + 256) & (g == lo_sig) & (lo_sig != qp.quant_min)
        return near_hi | near_lo, "INT32_CLAMP_F32"
    return f


# ---------------------------------------------------------------------------- properties 1-4

@prop(None, "primitives", cases(per_channel=None))
def test_quantize_matches_reference(case):
    """P1/P2/P3/P4: decomposed quantize == reference within the float32 envelope, any qparams/dtype."""
    x, qp = case
    got = decomposed_quantize(x, qp)
    assert got.dtype == qp.dtype
    check_integers("P1 quantize == reference", "quantized_decomposed.quantize_per_"
                   + ("tensor" if qp.axis is None else "channel"), x, qp, got, int32_wrap_excuse(qp))


@prop(None, "primitives", cases(per_channel=False, big=True))
def test_quantize_big_tensor_tail(case):
    """P1 on 1000-5000 elements (vectorised main loop + scalar tail), specials planted at the tail."""
    x, qp = case
    check_integers("P1 quantize == reference (big)", "quantized_decomposed.quantize_per_tensor",
                   x, qp, decomposed_quantize(x, qp), int32_wrap_excuse(qp))


@prop(None, "primitives", qparams(per_channel=None, channels=3), st.sampled_from(["inf", "-inf", "1e30", "fmax", "-fmax"]))
def test_saturation_never_wraps(qp, kind):
    """P2: +-inf and far-out finite values land at the exact range end, per-tensor and per-channel."""
    v = {"inf": np.inf, "-inf": -np.inf, "1e30": 1e30, "fmax": FLOAT32_MAX, "-fmax": -FLOAT32_MAX}[kind]
    n = qp.scale.numel()
    x = torch.full((n, 5), v, dtype=torch.float32)
    if qp.axis is not None:
        assert qp.axis == 0
    got = decomposed_quantize(x, qp)
    want_end = qp.quant_max if v > 0 else qp.quant_min
    check_integers("P2 saturation", "quantized_decomposed.quantize", x, qp, got, int32_wrap_excuse(qp))
    sig = _f32_bound_as_int32(want_end) if qp.dtype == torch.int32 else want_end
    ok = (got.long() == want_end) | (got.long() == sig)  # sig != want_end: excused INT32_CLAMP_F32
    assert bool(ok.all()), f"[P2 saturation] x={v} must give q={want_end}; {qp.describe()}; got {got.tolist()}"


@prop(None, "primitives", qdtypes(), st.data())
def test_exact_ties_round_half_even(qdt: QDType, data):
    """P3: x = (k + 0.5) * 2**e (exact in float32, exact product) rounds half to even, then + zp."""
    e = data.draw(st.integers(-20, 10), label="scale exponent")
    s = 2.0**e
    # |zp| <= 2**24 keeps fl32(round(.) + zp) exact; beyond it see INT32_F32_ADD (P1 envelope covers it)
    zlo, zhi = max(qdt.quant_min, -(2**24) + 64), min(qdt.quant_max, 2**24 - 64)
    assume(zlo <= zhi)
    zp = data.draw(st.integers(zlo, zhi), label="zero_point")
    ks = data.draw(st.lists(st.integers(-40, 40), min_size=1, max_size=64), label="tie k")
    x = torch.tensor([(k + 0.5) * s for k in ks], dtype=torch.float32)
    got = qd.quantize_per_tensor(x, s, zp, qdt.quant_min, qdt.quant_max, qdt.dtype).long()
    compared()
    for k, g in zip(ks, got.tolist()):
        r = k if k % 2 == 0 else k + 1  # half to even of k + 0.5
        want = min(max(r + zp, qdt.quant_min), qdt.quant_max)
        assert g == want, (f"[P3 round half to even] x=({k}+0.5)*2**{e} scale=2**{e} zp={zp} "
                           f"range=[{qdt.quant_min},{qdt.quant_max}]: expected q={want}, got q={g} "
                           f"({g - want:+d} LSB)")


# ---------------------------------------------------------------------------- property 5

@prop(None, "primitives", cases(per_channel=True))
def test_per_channel_equals_per_tensor_by_channel(case):
    """P5: quantize_per_channel == quantize_per_tensor applied to each channel slice, exactly."""
    x, qp = case
    got = qd.quantize_per_channel(x, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max, qp.dtype)
    compared()
    for c in range(qp.scale.numel()):
        sl = x.select(qp.axis, c)
        want = qd.quantize_per_tensor(sl, float(qp.scale[c]), int(qp.zero_point[c]), qp.quant_min,
                                      qp.quant_max, qp.dtype)
        g = got.select(qp.axis, c)
        if not torch.equal(g, want):
            i = tuple(int(k) for k in (g != want).nonzero()[0])
            raise AssertionError(
                f"[P5 per-channel == per-tensor by channel] {qp.describe()} channel {c}, element {i}: "
                f"x={float(sl[i])!r} per-tensor q={int(want[i])}, per-channel q={int(g[i])} "
                f"({int(g[i]) - int(want[i]):+d} LSB)")


# ---------------------------------------------------------------------------- property 6

def fake_quant(x, qp):
    if qp.axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point), qp.quant_min, qp.quant_max)
    return torch.fake_quantize_per_channel_affine(x, qp.scale, qp.zero_point.int(), qp.axis, qp.quant_min, qp.quant_max)


def decomposed_dequantize(q, qp):
    if qp.axis is None:
        return qd.dequantize_per_tensor(q, float(qp.scale), int(qp.zero_point), qp.quant_min, qp.quant_max, qp.dtype)
    return qd.dequantize_per_channel(q, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max, qp.dtype)


@prop(None, "primitives", cases(per_channel=None, dtypes=[torch.uint8, torch.int8, torch.int16]))
def test_dequantize_quantize_equals_fake_quantize(case):
    """P6: dequantize(quantize(x)) == fake_quantize(x) bit-exactly for 8/16-bit ranges.

    Exact, not a tolerance: both round x * fl32(1/scale) (the reciprocal rounds identically whether
    computed in float64 then cast, or in float32 - double rounding is innocuous for division) and
    both compute fl32(fl32(q - zp) * scale), where q - zp is an exact small integer.
    """
    x, qp = case
    dq = decomposed_dequantize(decomposed_quantize(x, qp), qp)
    fq = fake_quant(x, qp)
    compared()
    bad = ~((dq == fq) | (dq.isnan() & fq.isnan()))
    if qp.axis is not None and bad.any():  # FQ_PC_INT64_CAST excuse: x/scale >= 2**62 and fq == qmin value
        s = _bcast(qp.scale.double(), x.ndim, qp.axis)
        zp = _bcast(qp.zero_point.long(), x.ndim, qp.axis)
        with np.errstate(over="ignore"):
            huge = x.double().numpy() / s >= 2.0**62
        qmin_val = torch.from_numpy(((qp.quant_min - zp) * s).astype(np.float32)).expand_as(x)
        ok = torch.from_numpy(np.broadcast_to(huge, x.shape).copy()) & (fq == qmin_val)
        if (bad & ok).any():
            event("excused known defect FQ_PC_INT64_CAST")
        bad &= ~ok
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        c = i[qp.axis] if qp.axis is not None else 0
        s = float(qp.scale.reshape(-1)[c])
        raise AssertionError(
            f"[P6 dequantize(quantize(x)) == fake_quantize(x), exact] {qp.describe()} element {i}: "
            f"x={float(x[i])!r}: dq(q(x))={float(dq[i])!r}, fake_quantize={float(fq[i])!r} "
            f"({(float(fq[i]) - float(dq[i])) / s:+g} LSB)")


@prop(None, "primitives", cases(per_channel=None))
def test_dequantize_matches_reference(case):
    """P6b: dequantize == float64 reference (q - zp) * scale within float32 rounding of the op:
    3 * 2**-24 * |ref| (q - zp is exact when |q|, |zp| <= 2**24); for int32 values beyond 2**24 the op's
    fl32(q) - fl32(zp) adds up to 2**-23 * (|q| + |zp|) steps of scale."""
    x, qp = case
    q = decomposed_quantize(x, qp)
    got = decomposed_dequantize(q, qp).double().numpy()
    want = ref.dequantize(q.numpy(), qp.scale.double().numpy(), qp.zero_point.numpy(), qp.axis)
    s64 = _bcast(qp.scale.double(), q.ndim, qp.axis)
    zp64 = _bcast(qp.zero_point.long(), q.ndim, qp.axis)
    qa = np.abs(q.numpy().astype(np.float64))
    big = np.maximum(qa, np.abs(zp64)) > 2.0**24  # int32: fl32(q) and fl32(zp) are not exact
    tol = np.abs(want) * 3 * 2.0**-24 + 2.0**-149 + np.where(big, (qa + np.abs(zp64)) * 2.0**-23 * s64, 0.0)
    wrapped = (qp.dtype == torch.int32) and qp.axis is not None  # DQ_PC_INT32_ZP_WRAP only with int32 zp
    bad = np.abs(got - want) > tol
    compared()
    assert not wrapped or qp.zero_point.dtype == torch.int64
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"[P6b dequantize == reference] {qp.describe()} element {i}: q={int(q[i])} "
                             f"expected {want[i]!r} got {got[i]!r} (tolerance: float32 rounding of (fl32(q) - fl32(zp)) * fl32(scale))")


# ---------------------------------------------------------------------------- property 7

@prop(None, "primitives", st.data())
def test_layout_independence(data):
    """P7: channels-last / transposed / strided input gives the same integers as contiguous."""
    shape = data.draw(shapes(min_dims=2, max_dims=4), label="shape")
    qp = data.draw(qparams(per_channel=None, shape=shape), label="qparams")
    x = data.draw(float_tensors(shape, qp), label="x")
    layout = data.draw(layouts(len(shape)), label="layout")
    xl = as_layout(x, layout)
    assert torch.equal(xl, x)
    a, b = decomposed_quantize(x, qp), decomposed_quantize(xl, qp)
    compared()
    for name, fa, fb in [("quantize", a, b), ("fake_quantize", fake_quant(x, qp), fake_quant(xl, qp))]:
        if not torch.equal(fa, fb):
            i = tuple(int(k) for k in (fa != fb).nonzero()[0])
            raise AssertionError(f"[P7 layout independence] {name} differs for layout={layout} stride="
                                 f"{xl.stride()} {qp.describe()} element {i}: x={float(x[i])!r} "
                                 f"contiguous={fa[i].item()} {layout}={fb[i].item()}")


@prop(None, "primitives", cases(per_channel=True))
def test_zero_point_dtype_independence(case):
    """P7 (executorch #34 class): int32 vs int64 zero_point tensors give identical q and dq."""
    x, qp = case
    z32, z64 = qp.zero_point.int(), qp.zero_point.long()
    args = (qp.axis, qp.quant_min, qp.quant_max, qp.dtype)
    q32 = qd.quantize_per_channel(x, qp.scale, z32, *args)
    q64 = qd.quantize_per_channel(x, qp.scale, z64, *args)
    compared()
    assert torch.equal(q32, q64), f"[P7 zp dtype] quantize_per_channel int32 vs int64 zp differ: {qp.describe()}"
    d32 = qd.dequantize_per_channel(q64, qp.scale, z32, *args)
    d64 = qd.dequantize_per_channel(q64, qp.scale, z64, *args)
    bad = d32 != d64
    if qp.dtype == torch.int32 and bad.any():  # DQ_PC_INT32_ZP_WRAP: exact q - zp outside int32
        zp = torch.from_numpy(_bcast(z64, x.ndim, qp.axis))
        diff = q64.long() - zp
        ok = (diff > 2**31 - 1) | (diff < -(2**31))
        if (bad & ok).any():
            event("excused known defect DQ_PC_INT32_ZP_WRAP")
        bad &= ~ok
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise AssertionError(f"[P7 zp dtype] dequantize_per_channel int32 vs int64 zero_point differ: "
                             f"{qp.describe()} element {i}: q={int(q64[i])} int32-zp={float(d32[i])!r} "
                             f"int64-zp={float(d64[i])!r}")


# ---------------------------------------------------------------------------- eager torch.quantize_per_tensor

_EAGER = {(torch.uint8, 0, 255): torch.quint8, (torch.int8, -128, 127): torch.qint8,
          (torch.int32, -(2**31), 2**31 - 1): torch.qint32}


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
@prop(None, "primitives", st.data())
def test_eager_quantize_per_tensor_matches_reference(data):
    """P1 for torch.quantize_per_tensor(...).int_repr() on the dtypes it supports (full ranges)."""
    key = data.draw(st.sampled_from(sorted(_EAGER, key=str)), label="eager dtype")
    qp = data.draw(qparams(per_channel=False, qdtype=st.just(QDType(*key))), label="qparams")
    x = data.draw(float_tensors(qparams=qp), label="x")
    got = torch.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), _EAGER[key]).int_repr()

    def excuse(g, want):  # EAGER_ZP_BEFORE_ROUND: got == clamp(rint(fl32(fl32(x * fl32(1/s)) + zp)))
        with np.errstate(over="ignore", invalid="ignore"):
            inv = np.float32(1.0 / float(qp.scale))
            v = (x.numpy() * inv + np.float32(int(qp.zero_point))).astype(np.float64)
            alt = np.clip(np.nan_to_num(np.rint(v), posinf=qp.quant_max, neginf=qp.quant_min),
                          qp.quant_min, qp.quant_max).astype(np.int64)
        return (g == alt) & (np.abs(g - want) == 1), "EAGER_ZP_BEFORE_ROUND"
    check_integers("P1 eager quantize == reference", f"torch.quantize_per_tensor({_EAGER[key]})",
                   x, qp, got, excuse)


# ---------------------------------------------------------------------------- known defects (strict xfail)

@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["INT32_CLAMP_F32"])
def test_known_defect_int32_saturation_wraps():
    x = torch.tensor([float("inf"), 1e30, 3e9])
    got = qd.quantize_per_tensor(x, 1.0, 0, -(2**31), 2**31 - 1, torch.int32)
    assert got.tolist() == [2**31 - 1] * 3, f"got {got.tolist()}"


@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["INT32_CLAMP_F32"])
def test_known_defect_int32_narrow_range_escapes_quant_min():
    got = qd.quantize_per_tensor(torch.tensor([-float("inf")]), 1.0, 0, -(2**31) + 1, 2**31 - 1, torch.int32)
    assert got.item() == -(2**31) + 1, f"got {got.item()}"


@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["INT32_F32_ADD"])
def test_known_defect_int32_zero_does_not_map_to_zero_point():
    got = qd.quantize_per_tensor(torch.zeros(1), 1.0, 2**24 + 1, -(2**31), 2**31 - 1, torch.int32)
    assert got.item() == 2**24 + 1, f"got {got.item()}"


@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["FQ_PC_INT64_CAST"])
def test_known_defect_fake_quantize_per_channel_int64_cast():
    x = torch.tensor([[float("inf"), 1e20]])
    got = torch.fake_quantize_per_channel_affine(x, torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32),
                                                 0, -128, 127)
    assert got.tolist() == [[127.0, 127.0]], f"got {got.tolist()}"


@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["DQ_PC_INT32_ZP_WRAP"])
def test_known_defect_dequantize_per_channel_int32_zp_wraps():
    q = torch.tensor([[2**31 - 1]], dtype=torch.int32)
    got = qd.dequantize_per_channel(q, torch.tensor([1.0]), torch.tensor([-5], dtype=torch.int32), 0,
                                    -(2**31), 2**31 - 1, torch.int32)
    assert got.item() > 0, f"got {got.item()}"


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS["EAGER_ZP_BEFORE_ROUND"])
def test_known_defect_eager_quantize_adds_zp_before_rounding():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5])
    got = torch.quantize_per_tensor(x, 1.0, 1, torch.quint8).int_repr()
    want = qd.quantize_per_tensor(x, 1.0, 1, 0, 255, torch.uint8)  # [1, 3, 3, 1]
    assert torch.equal(got, want), f"eager {got.tolist()} vs decomposed {want.tolist()}"
