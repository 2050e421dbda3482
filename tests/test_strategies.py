"""The property strategies really reach their edges (so they cannot silently lose coverage).

Each test uses ``hypothesis.find`` to show an edge is reachable from the public strategy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from qref.strategies import (
    FLOAT32_MAX, QDTYPE_BOUNDS, as_layout, float_tensors, layouts, qdtypes, qparams, scales, shapes,
    zero_points,
)

FIND = settings(max_examples=2000, database=None, deadline=None)


def _find(strategy, cond):
    return find(strategy, cond, settings=FIND)


def test_scales_reach_tiny_huge_and_powers_of_two():
    assert _find(scales(), lambda s: s <= 1e-6) <= 1e-6
    assert _find(scales(), lambda s: s >= 1e3) >= 1e3
    p = _find(scales(), lambda s: s < 1 and math.frexp(s)[0] == 0.5)
    assert math.frexp(p)[0] == 0.5


def test_scales_are_positive_finite_float32():
    @settings(max_examples=200, database=None)
    def check(s):
        assert s > 0 and math.isfinite(s) and float(np.float32(s)) == s
    given(scales())(check)()


def test_zero_points_reach_dtype_ends():
    for dt, (lo, hi) in QDTYPE_BOUNDS.items():
        assert _find(zero_points(lo, hi), lambda z: z == hi) == hi
        assert _find(zero_points(lo, hi), lambda z: z == lo) == lo


def test_qdtypes_reach_every_dtype_and_narrowed_ranges():
    for dt, (lo, hi) in QDTYPE_BOUNDS.items():
        _find(qdtypes(), lambda q: q.dtype == dt and (q.quant_min, q.quant_max) == (lo, hi))
    _find(qdtypes(), lambda q: (q.dtype, q.quant_min, q.quant_max) == (torch.int8, -127, 127))
    _find(qdtypes(), lambda q: (q.dtype, q.quant_min, q.quant_max) == (torch.uint8, 0, 127))


def test_qparams_zero_point_at_qmax_per_channel():
    qp = _find(qparams(per_channel=True, channels=3),
               lambda q: int(q.zero_point.max()) == q.quant_max and q.axis == 0)
    assert qp.scale.shape == (3,) and qp.scale.dtype == torch.float32


def _has(pred):
    return lambda x: bool(pred(x).any())


def test_float_tensors_reach_specials():
    ft = float_tensors()
    _find(ft, _has(torch.isposinf))
    _find(ft, _has(torch.isneginf))
    _find(ft, _has(lambda x: x == FLOAT32_MAX))
    x = _find(ft, _has(lambda x: (x == 0) & torch.signbit(x)))  # -0.0
    assert bool(((x == 0) & torch.signbit(x)).any())


def test_float_tensors_reach_exact_ties_around_zero_point():
    @st.composite
    def case(draw):
        qp = draw(qparams(per_channel=False))
        return qp, draw(float_tensors((8,), qp))

    def exact_tie(c):
        qp, x = c
        with np.errstate(invalid="ignore", over="ignore"):
            v = x.double().numpy() / float(qp.scale)  # exact in float64 for a power-of-two scale
            return bool(np.any((np.abs(v) < 4) & (v - np.floor(v) == 0.5)))
    _find(case(), exact_tie)


def test_float_tensors_reach_saturation_for_tiny_scale():
    @st.composite
    def case(draw):
        qp = draw(qparams(per_channel=False, scale_strategy=scales(max_value=1e-6)))
        return qp, draw(float_tensors((4,), qp, allow_infinity=False))

    def saturating(c):
        qp, x = c
        with np.errstate(invalid="ignore", over="ignore"):
            v = x.double().numpy() / float(qp.scale) + int(qp.zero_point)
        return bool(np.any(np.isfinite(x.numpy()) & ((v > qp.quant_max + 1) | (v < qp.quant_min - 1))))
    _find(case(), saturating)


def test_big_tensors_reach_tail_specials():
    x = _find(float_tensors(big=True), lambda x: bool(torch.isinf(x[-3:]).any()))
    assert 1000 <= x.numel() <= 5000


def test_shapes_reach_size_one_dims_and_four_dims():
    _find(shapes(), lambda s: len(s) == 4 and 1 in s)


def test_layouts_keep_values():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for layout in ["contiguous", "channels_last", "transposed", "strided"]:
        y = as_layout(x, layout)
        assert torch.equal(x, y)
    assert not as_layout(x, "channels_last").is_contiguous()
    _find(layouts(4), lambda l: l == "channels_last")
