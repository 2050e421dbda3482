"""Quantization parameters from recorded observer statistics.

qref never calls an observer's ``calculate_qparams``: it reads the statistics the
observer recorded (min/max, histogram, fixed scale) and derives scale and zero
point here. The float32 arithmetic follows the observers' own formulas step by
step, because the converters under comparison must agree bit for bit.
"""

from __future__ import annotations

import itertools
import struct
import warnings
from typing import Any, NamedTuple

import torch

_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_PER_CHANNEL = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)


class QParams(NamedTuple):
    """Scale and zero point plus how to apply them: qref's one quantization-parameters type.

    Derived from observers (:func:`qref.observers.observer_qparams`) they are 1-D tensors; read
    from a recorded quantize/dequantize call (:mod:`qref.compare`) a float and an int per tensor,
    or 1-D tensors per channel; in the reference representation's rewrites
    (:mod:`qref.pt2e.reference_representation`) the graph nodes or literals that hold them.
    """

    scale: Any  # 1-D tensor, float, or graph node
    zero_point: Any  # 1-D tensor, int, or graph node
    quant_min: Any  # int, or graph node
    quant_max: Any
    dtype: torch.dtype  # the plain integer dtype, e.g. torch.uint8, never a quantized one
    axis: int | None = None  # None for per-tensor


def is_per_channel(qscheme) -> bool:
    return qscheme in _PER_CHANNEL


def _recorded(min_val: torch.Tensor, max_val: torch.Tensor) -> bool:
    """False when the observer never saw data (qparams then default to 1.0 / 0)."""
    if min_val.numel() == 0 or max_val.numel() == 0:
        return False
    if min_val.dim() == 0 and min_val == float("inf") and max_val == float("-inf"):
        return False
    if not bool(torch.all(min_val <= max_val)):
        raise ValueError(
            f"observer recorded min {min_val} > max {max_val}; its statistics are corrupt "
            "(re-run calibration)"
        )
    return True


def from_min_max(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    *,
    qscheme,
    dtype: torch.dtype,
    quant_min: int,
    quant_max: int,
    eps: torch.Tensor,
    has_customized_qrange: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine or symmetric qparams covering [min(min_val, 0), max(max_val, 0)]."""
    if not _recorded(min_val, max_val):
        warnings.warn("observer has no statistics (never calibrated); using scale 1.0, zero point 0")
        return torch.tensor([1.0]), torch.tensor([0])
    zero = torch.zeros_like(min_val)
    lo = torch.min(min_val, zero)
    hi = torch.max(max_val, zero)
    if qscheme in _SYMMETRIC:
        bound = torch.max(-lo, hi)
        scale = torch.max(bound / (float(quant_max - quant_min) / 2), eps)
        # uint symmetric centres the range; signed types keep zero point 0.
        if dtype in (torch.quint8, torch.uint8):
            zp = (quant_min + quant_max) // 2 if has_customized_qrange else 128
        elif dtype == torch.uint16:
            zp = 2**15
        else:
            zp = 0
        zero_point = torch.full(lo.size(), zp, dtype=torch.int64)
    elif qscheme == torch.per_channel_affine_float_qparams:
        scale = (max_val - min_val) / float(quant_max - quant_min)
        scale = torch.where(scale > eps, scale, torch.ones_like(scale))
        zero_point = -1 * min_val / scale
    else:
        scale = torch.max((hi - lo) / float(quant_max - quant_min), eps)
        zero_point = quant_min - torch.round(lo / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)
    if scale.dim() == 0:
        scale = scale.reshape(1)
    if zero_point.dim() == 0:
        zero_point = zero_point.reshape(1)
    return scale, zero_point


# ---------------------------------------------------------------------------
# Histogram search (the L2-minimising range used by HistogramObserver).
# The observer walks inward over quantiles and stops at the first candidate range
# whose quantization error exceeds the last one's. The candidates do not depend on
# the errors (only where the walk stops does), so the walk is plain Python
# arithmetic and the errors of many candidates are one float32 tensor computation:
# element for element the observer's own, so the result is identical.

_STEP = 1e-5
_MAX_BATCH_ELEMENTS = 32767  # below at::internal::GRAIN_SIZE (32768): the row sums stay single-threaded


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32, as torch does for a scalar operand."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _lt_f32(a: float, b: float) -> bool:
    """``a < float32(b)`` for a float32-representable ``a``; cheap unless a and b are close."""
    if abs(a - b) > 3e-7 * abs(b) + 1e-38:
        return a < b
    return a < _f32(b)


def _gt_f32(a: float, b: float) -> bool:
    if abs(a - b) > 3e-7 * abs(b) + 1e-38:
        return a > b
    return a > _f32(b)


def _candidate_ranges(csum: list, total: float):
    """The walk's candidate (start bin, end bin) ranges in order, each taken as accepted."""
    alpha, beta = 0.0, 1.0
    start, end = 0, len(csum) - 1
    while alpha < beta:
        beta = _steps_until_the_end_moves(csum, total, start, end, alpha, beta)
        if not alpha < beta:
            break
        next_alpha = alpha + _STEP
        next_beta = beta - _STEP
        lo_bound = next_alpha * total
        hi_bound = next_beta * total
        left, right = start, end
        while left < end and _lt_f32(csum[left], lo_bound):
            left += 1
        while right > start and _gt_f32(csum[right], hi_bound):
            right -= 1
        if left - start > end - right:
            new_start, new_end, alpha = left, end, next_alpha
        else:
            new_start, new_end, beta = start, right, next_beta
        if (new_start, new_end) != (start, end):
            yield new_start, new_end
            start, end = new_start, new_end


def _steps_until_the_end_moves(csum: list, total: float, start: int, end: int, alpha: float, beta: float) -> float:
    """Take the walk's idle steps at once: while the start bin stays (alpha fixed), beta steps
    down until the end bin would move. Returns beta before that step (the observer's own float
    sequence, so the walk is unchanged; it only skips one tensor-free iteration per step)."""
    left = start
    if left < end and _lt_f32(csum[left], (alpha + _STEP) * total):
        return beta  # the start moves: a full step
    if end <= start:
        return alpha  # nothing can move any more: the walk ends
    last = csum[end]
    while alpha < beta:
        next_beta = beta - _STEP
        bound = next_beta * total
        # the end moves iff last > float32(bound); rounding is monotonic, so bound >= last cannot
        if bound < last and last > _f32(bound):
            return beta
        beta = next_beta
    return beta


class _RangeNorm:
    """L2 quantization error of mapping the histogram onto ``dst_bins`` uniform bins."""

    def __init__(self, histogram: torch.Tensor, min_val: float, max_val: float, dst_bins: int):
        self.bins = histogram.numel()
        self.dst_bins = dst_bins
        self.bin_width = (max_val - min_val) / self.bins
        self.src = torch.arange(self.bins)
        self.density = histogram / self.bin_width

    @staticmethod
    def _cube_integral(begin, end, density):
        return density * ((end * end * end - begin * begin * begin) / 3)

    def __call__(self, ranges: list[tuple[int, int]]) -> list[float]:
        """The error of each candidate range (one row per range)."""
        width = self.bin_width
        dst_widths = [width * (end - start + 1) / self.dst_bins for start, end in ranges]
        # float32 columns: what the observer's Python-float scalars become in its ops
        dst_width = torch.tensor(dst_widths).unsqueeze(1)
        half = torch.tensor([w / 2 for w in dst_widths]).unsqueeze(1)
        last = self.dst_bins - 1
        begin = (self.src - torch.tensor([start for start, _ in ranges]).unsqueeze(1)) * width
        finish = begin + width
        dst_of_begin = torch.clamp(torch.div(begin, dst_width, rounding_mode="floor"), 0, last)
        dst_of_end = torch.clamp(torch.div(finish, dst_width, rounding_mode="floor"), 0, last)
        # error of the part of each source bin inside its first destination bin,
        norm = torch.zeros(len(ranges), self.bins)
        norm += self._cube_integral(
            begin - (dst_of_begin + 0.5) * dst_width, torch.ones(self.bins) * half, self.density
        )
        # of the destination bins it covers entirely,
        norm += (dst_of_end - dst_of_begin - 1) * self._cube_integral(-half, half, self.density)
        # and of the part inside its last destination bin.
        norm += self._cube_integral(-half, finish - (dst_of_end * dst_width + half), self.density)
        return [0.0 if w == 0.0 else n for w, n in zip(dst_widths, norm.sum(dim=1).tolist())]


def histogram_range(
    histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, dst_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The [min, max] that a greedy quantile walk finds to minimise L2 quantization error."""
    bins = histogram.numel()
    walk = _candidate_ranges(torch.cumsum(histogram, dim=0).tolist(), torch.sum(histogram).item())
    norm_of = _RangeNorm(histogram, min_val.item(), max_val.item(), dst_bins)
    start, end, best = 0, bins - 1, float("inf")
    # Most walks stop within a few candidates: evaluate 4, then batches of up to
    # _MAX_BATCH_ELEMENTS, which run on one thread and never wait for a core another
    # process holds (4-8x slower when they did, on a busy 2-core machine).
    chunk = min(4, max(1, _MAX_BATCH_ELEMENTS // bins))
    while ranges := list(itertools.islice(walk, chunk)):
        for (new_start, new_end), norm in zip(ranges, norm_of(ranges)):
            if norm > best:
                return _range_bounds(min_val, max_val, bins, start, end)
            best, start, end = norm, new_start, new_end
        chunk = max(1, _MAX_BATCH_ELEMENTS // bins)
    return _range_bounds(min_val, max_val, bins, start, end)


def _range_bounds(min_val, max_val, bins: int, start: int, end: int):
    bin_width = (max_val - min_val) / bins
    return min_val + bin_width * start, min_val + bin_width * (end + 1)
