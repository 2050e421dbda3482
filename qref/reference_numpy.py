"""Independent float64 NumPy reference for affine quantization.

Deliberately small and obviously correct; it states the *documented contract*

    q = clamp(round_half_even(x / scale) + zero_point, quant_min, quant_max)

computed in float64 with exact integer clamping, not the float32 arithmetic a
kernel happens to use.  +inf saturates to quant_max, -inf to quant_min.  NaN has
no quantized value: ``quantize`` raises unless ``nan=`` names the integer to use.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize", "dequantize", "fake_quantize", "requantize", "broadcast_qparam"]


def broadcast_qparam(p, ndim: int, axis: int | None) -> np.ndarray:
    """``p`` (scalar, or one value per channel along ``axis``) shaped to broadcast over ``ndim`` dims."""
    p = np.asarray(p)
    if axis is None:
        if p.size != 1:
            raise ValueError(f"per-tensor qparam must be a scalar, got shape {p.shape}")
        return p.reshape(())
    if p.ndim != 1:
        raise ValueError(f"per-channel qparam must be 1-D, got shape {p.shape}")
    shape = [1] * ndim
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def quantize(x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None,
             *, nan: int | None = None) -> np.ndarray:
    """Integers (int64) of ``clamp(round_half_even(x / scale) + zp, qmin, qmax)``, exactly."""
    x = np.asarray(x, dtype=np.float64)
    s = broadcast_qparam(np.asarray(scale, dtype=np.float64), x.ndim, axis)
    zp = broadcast_qparam(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    if not (np.all(s > 0) and np.all(np.isfinite(s))):
        raise ValueError("scale must be positive and finite")
    nan_mask = np.isnan(x)
    if nan_mask.any() and nan is None:
        raise ValueError("NaN input has no quantized value (pass nan=...)")
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint(x / s)  # rint: round half to even; +-inf stays +-inf
    # Clamp *before* adding zp, to bounds that are exact integers: no float64
    # precision is lost for |x/s| >= 2**53 and the result cannot wrap.
    lo = (quant_min - zp).astype(np.float64)
    hi = (quant_max - zp).astype(np.float64)
    r = np.clip(np.where(nan_mask, 0.0, r), lo, hi)
    q = r.astype(np.int64) + zp
    q = np.broadcast_to(q, x.shape).copy()
    if nan_mask.any():
        q[nan_mask] = nan
    assert q.min(initial=quant_min) >= quant_min and q.max(initial=quant_max) <= quant_max
    return q


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """``(q - zp) * scale`` in float64 (``q - zp`` in int64, so it cannot wrap)."""
    q = np.asarray(q).astype(np.int64)
    s = broadcast_qparam(np.asarray(scale, dtype=np.float64), q.ndim, axis)
    zp = broadcast_qparam(np.asarray(zero_point, dtype=np.int64), q.ndim, axis)
    return (q - zp).astype(np.float64) * s


def fake_quantize(x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None,
                  *, nan: int | None = None) -> np.ndarray:
    """``dequantize(quantize(x))`` in float64."""
    return dequantize(quantize(x, scale, zero_point, quant_min, quant_max, axis, nan=nan),
                      scale, zero_point, axis)


def requantize(q, scale_in, zp_in, scale_out, zp_out, quant_min: int, quant_max: int,
               axis: int | None = None) -> np.ndarray:
    """Integers re-expressed in the output qparams: ``quantize(dequantize(q, in), out)``."""
    return quantize(dequantize(q, scale_in, zp_in, axis), scale_out, zp_out,
                    quant_min, quant_max, axis)
