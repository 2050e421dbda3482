"""Hypothesis strategies for quantization parameters and float inputs.

Every strategy reaches its edges on purpose (tests/test_strategies.py checks it):
tiny / huge / power-of-two scales, zero points at the dtype ends, exact rounding
ties, saturating values, +-inf, +-0.0 and float32 max.  All randomness comes from
labelled Hypothesis draws; large tensors are built by tiling a small drawn base
deterministically, so failures still shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from hypothesis import strategies as st

__all__ = [
    "QDType", "QParamsCase", "QDTYPE_BOUNDS", "FLOAT32_MAX",
    "qdtypes", "scales", "zero_points", "qparams", "shapes", "axes",
    "float_tensors", "layouts", "as_layout",
]

FLOAT32_MAX = float(np.finfo(np.float32).max)
QDTYPE_BOUNDS = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}
# Named narrowed ranges seen in real configs (symmetric, reduce_range, 4-bit).
_NARROWED = {
    torch.uint8: [(0, 127), (0, 15)],
    torch.int8: [(-127, 127), (-64, 63), (-8, 7)],
    torch.int16: [(-(2**15) + 1, 2**15 - 1)],
    torch.int32: [(-(2**31) + 1, 2**31 - 1)],
}


class QDType(NamedTuple):
    """A quantized integer dtype with the range actually used (may be narrower than the dtype)."""

    dtype: torch.dtype
    quant_min: int
    quant_max: int


@dataclass(frozen=True)
class QParamsCase:
    """Affine qparams.  Per-tensor: 0-d ``scale``/``zero_point`` and ``axis=None``."""

    scale: torch.Tensor  # float32, 0-d or (C,)
    zero_point: torch.Tensor  # int64 (or int32), same shape as scale
    axis: int | None
    quant_min: int
    quant_max: int
    dtype: torch.dtype

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def describe(self) -> str:
        s = self.scale.tolist()
        z = self.zero_point.tolist()
        kind = "per-tensor" if self.axis is None else f"per-channel axis={self.axis}"
        return (f"{kind} dtype={str(self.dtype).replace('torch.', '')} "
                f"range=[{self.quant_min}, {self.quant_max}] scale={s!r} zero_point={z!r}")


# ---------------------------------------------------------------------------- dtypes, qparams

@st.composite
def qdtypes(draw, dtypes=None, narrowed: bool = True) -> QDType:
    """One of uint8/int8/int16/int32 with (quant_min, quant_max): full range, a named narrowed
    range (int8 [-127,127], uint8 reduce_range [0,127], 4-bit, ...), or an arbitrary sub-range."""
    dtypes = list(QDTYPE_BOUNDS) if dtypes is None else list(dtypes)
    dtype = draw(st.sampled_from(dtypes), label="qdtype")
    lo, hi = QDTYPE_BOUNDS[dtype]
    choices = ["full"] + (["named", "subrange"] if narrowed else [])
    how = draw(st.sampled_from(choices), label="qrange kind")
    if how == "full":
        return QDType(dtype, lo, hi)
    if how == "named":
        qmin, qmax = draw(st.sampled_from(_NARROWED[dtype]), label="named qrange")
        return QDType(dtype, qmin, qmax)
    qmin = draw(st.integers(lo, hi - 1), label="quant_min")
    qmax = draw(st.integers(qmin + 1, hi), label="quant_max")
    return QDType(dtype, qmin, qmax)


def _f32_floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    """float32-representable floats in [lo, hi] (bounds moved inward to float32 values)."""
    flo, fhi = np.float32(lo), np.float32(hi)
    if float(flo) < lo:
        flo = np.nextafter(flo, np.float32(np.inf))
    if float(fhi) > hi:
        fhi = np.nextafter(fhi, np.float32(-np.inf))
    return st.floats(float(flo), float(fhi), width=32)


def scales(min_value: float = 1e-10, max_value: float = 1e6) -> st.SearchStrategy[float]:
    """Positive finite float32-representable scales: tiny, ordinary, huge and powers of two."""
    bands = [
        _f32_floats(1e-10, 1e-6),  # tiny
        _f32_floats(1e-4, 10.0),  # ordinary
        _f32_floats(1e3, 1e6),  # huge
        st.integers(-33, 19).map(lambda e: 2.0**e),  # exact powers of two (exact ties)
        st.sampled_from([1.0, 0.5, 0.1, 1 / 255, 2 / 255, 0.75]).map(lambda v: float(np.float32(v))),  # common literal scales
    ]
    return st.one_of(bands).filter(lambda s: min_value <= s <= max_value and s > 0)


def zero_points(quant_min: int, quant_max: int) -> st.SearchStrategy[int]:
    """Zero points in [quant_min, quant_max], reaching both ends and 0 (when in range) on purpose."""
    ends = [quant_min, quant_max] + ([0] if quant_min <= 0 <= quant_max else [])
    mid = (quant_min + quant_max + 1) // 2
    return st.one_of(st.sampled_from(ends + [mid]), st.integers(quant_min, quant_max))


@st.composite
def qparams(draw, per_channel: bool | None = False, shape=None, axis: int | None = None,
            qdtype=None, channels: int | None = None, symmetric: bool | None = None,
            zero_point_dtype: torch.dtype = torch.int64, scale_strategy=None) -> QParamsCase:
    """A :class:`QParamsCase`.  ``per_channel=None`` draws it.  Per-channel needs a channel count:
    ``shape`` (+ optional ``axis``, else drawn with :func:`axes`) or ``channels`` (axis 0)."""
    qd = draw(qdtypes() if qdtype is None else qdtype, label="qdtype")
    if isinstance(qd, torch.dtype):
        qd = QDType(qd, *QDTYPE_BOUNDS[qd])
    if per_channel is None:
        per_channel = draw(st.booleans(), label="per_channel")
    if symmetric is None:
        symmetric = draw(st.booleans(), label="symmetric")
    scale_strategy = scales() if scale_strategy is None else scale_strategy
    if per_channel:
        if shape is not None:
            if axis is None:
                axis = draw(axes(len(shape)), label="axis")
            n = shape[axis]
        else:
            n = channels if channels is not None else draw(st.integers(1, 8), label="channels")
            axis = 0 if axis is None else axis
    else:
        axis, n = None, 1
    sym_zp = (qd.quant_min + qd.quant_max + 1) // 2 if qd.quant_min >= 0 else 0
    zp_strategy = st.just(sym_zp) if symmetric and qd.quant_min <= sym_zp <= qd.quant_max \
        else zero_points(qd.quant_min, qd.quant_max)
    s_list = draw(st.lists(scale_strategy, min_size=n, max_size=n), label="scales")
    z_list = draw(st.lists(zp_strategy, min_size=n, max_size=n), label="zero_points")
    scale = torch.tensor(s_list, dtype=torch.float32)
    zp = torch.tensor(z_list, dtype=zero_point_dtype)
    if not per_channel:
        scale, zp = scale.reshape(()), zp.reshape(())
    return QParamsCase(scale, zp, axis, qd.quant_min, qd.quant_max, qd.dtype)


# ---------------------------------------------------------------------------- shapes, layouts

def shapes(min_dims: int = 1, max_dims: int = 4, min_side: int = 1, max_side: int = 6):
    """Tuples of 1-4 dims; size-1 dims are sampled on purpose."""
    side = st.one_of(st.just(1), st.integers(min_side, max_side)) if min_side <= 1 \
        else st.integers(min_side, max_side)
    return st.lists(side, min_size=min_dims, max_size=max_dims).map(tuple)


def axes(ndim: int) -> st.SearchStrategy[int]:
    """A per-channel axis in [0, ndim)."""
    return st.integers(0, ndim - 1)


def layouts(ndim: int) -> st.SearchStrategy[str]:
    """Memory layouts :func:`as_layout` can produce for an ``ndim`` tensor."""
    opts = ["contiguous", "strided"]
    if ndim >= 2:
        opts.append("transposed")
    if ndim == 4:
        opts.append("channels_last")
    return st.sampled_from(opts)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``x`` with a different memory layout (strides)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # values equal, storage order of the last two dims swapped
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a twice-as-long last dim
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype).fill_(float("nan"))
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


# ---------------------------------------------------------------------------- float inputs

# Element "kinds".  Unit kinds are in units of the element's scale (so ties are ties for the
# element's own channel); absolute kinds are literal float32 values.
_UNIT_KINDS = ["tie", "tie_near_zp", "integer", "near_tie", "saturate", "uniform"]
_ABS_KINDS = ["inf", "ninf", "zero", "negzero", "fmax", "nfmax", "huge"]


@st.composite
def _element_spec(draw, unit_lo: int, unit_hi: int, allow_infinity: bool):
    kinds = _UNIT_KINDS + [k for k in _ABS_KINDS if allow_infinity or k not in ("inf", "ninf")]
    kind = draw(st.sampled_from(kinds), label="element kind")
    if kind == "tie":
        return ("u", draw(st.integers(unit_lo - 1, unit_hi), label="tie k") + 0.5)
    if kind == "tie_near_zp":
        return ("u", draw(st.integers(-4, 3), label="tie k") + 0.5)
    if kind == "integer":
        return ("u", float(draw(st.integers(unit_lo, unit_hi), label="integer k")))
    if kind == "near_tie":
        k = draw(st.integers(-4, 3), label="tie k") + 0.5
        return ("u", k + draw(st.sampled_from([-1e-6, 1e-6, -2**-20, 2**-20]), label="tie offset"))
    if kind == "saturate":
        mag = draw(st.sampled_from([1.0, 2.0, 1e3, 1e10, 1e30]), label="saturation factor")
        span = max(abs(unit_lo), abs(unit_hi), 1)
        return ("u", draw(st.sampled_from([-1, 1]), label="sign") * (span + 1) * mag)
    if kind == "uniform":
        span = max(abs(unit_lo), abs(unit_hi), 1) * 1.25
        return ("u", draw(st.floats(-span, span, allow_nan=False), label="uniform u"))
    return ("a", {"inf": math.inf, "ninf": -math.inf, "zero": 0.0, "negzero": -0.0,
                  "fmax": FLOAT32_MAX, "nfmax": -FLOAT32_MAX,
                  "huge": draw(st.sampled_from([1e30, -1e30, 9.223372e14, 2.0**63]), label="huge")}[kind])


def _materialise(specs, shape, scale_of_elem: np.ndarray) -> np.ndarray:
    flat = np.empty(len(specs), dtype=np.float64)
    for i, (tag, v) in enumerate(specs):
        flat[i] = v * scale_of_elem[i] if tag == "u" else v
    with np.errstate(over="ignore"):
        out = flat.astype(np.float32)
    # an overflowing unit value means "saturate", not "inf": keep it finite
    out = np.where(np.isinf(out) & np.isfinite(flat), np.sign(flat) * FLOAT32_MAX, out)
    return out.astype(np.float32).reshape(shape)


@st.composite
def float_tensors(draw, shape=None, qparams: QParamsCase | None = None,
                  allow_infinity: bool = True, big: bool = False,
                  big_size=(1000, 5000)) -> torch.Tensor:
    """A float32 tensor whose elements hit the edges of ``qparams`` (default: scale 1, int8 range):
    exact ties ``(k + 0.5) * scale`` (around the zero point and across the range), integers,
    near-ties, saturating values, uniform values, +-inf, +-0.0, +-float32 max, huge literals.

    ``big=True`` ignores ``shape`` and returns a 1-D tensor of a drawn size in ``big_size``
    (reaches vectorised main and tail loops): a small drawn base is tiled deterministically
    and a few drawn specials are planted, including at the tail.
    """
    if qparams is None:
        s_np, zp_np, axis, qmin, qmax = np.array(1.0), np.array(0), None, -128, 127
    else:
        s_np = qparams.scale.double().numpy()
        zp_np = qparams.zero_point.long().numpy()
        axis, qmin, qmax = qparams.axis, qparams.quant_min, qparams.quant_max
    zp_lo, zp_hi = int(zp_np.min()), int(zp_np.max())
    unit_lo, unit_hi = qmin - zp_hi, qmax - zp_lo
    spec = _element_spec(unit_lo, unit_hi, allow_infinity)
    if big:
        if axis is not None:
            raise ValueError("big tensors are per-tensor only (1-D)")
        n = draw(st.integers(*big_size), label="big size")
        base = draw(st.lists(spec, min_size=1, max_size=32), label="big base")
        specs = [base[i % len(base)] for i in range(n)]
        planted = draw(st.lists(st.tuples(st.integers(0, 15), spec), max_size=6), label="tail specials")
        for off, sp in planted:  # indices counted from the end: the scalar tail loop
            specs[n - 1 - off] = sp
        shape = (n,)
    else:
        if shape is None:
            shape = draw(shapes(), label="shape")
        n = int(np.prod(shape))
        specs = draw(st.lists(spec, min_size=n, max_size=n), label="elements")
    if axis is None:
        scale_of_elem = np.full(n, float(s_np.reshape(-1)[0]))
    else:
        bshape = [1] * len(shape)
        bshape[axis] = shape[axis]
        scale_of_elem = np.broadcast_to(s_np.reshape(bshape), shape).reshape(-1)
    return torch.from_numpy(_materialise(specs, shape, scale_of_elem))
