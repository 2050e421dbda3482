"""Read an observer or fake-quantize module (pt2e or FX flavour) into QParams.

Observers are recognised by what they recorded, not by class, so torchao's and
torch.ao's classes (and third-party look-alikes) are handled alike.
"""

from __future__ import annotations

import torch

from . import qparams as qp

_UNDERLYING = {
    torch.quint8: torch.uint8,
    torch.qint8: torch.int8,
    torch.qint32: torch.int32,
    torch.quint4x2: torch.uint8,
}
STATIC_DTYPES = (
    torch.quint8, torch.qint8, torch.qint32, torch.uint8, torch.int8,
    torch.uint16, torch.int16, torch.int32,
)  # fmt: skip


def is_observer(module) -> bool:
    """Observers and fake-quantizers both carry ``dtype`` and either statistics or an inner observer."""
    name = type(module).__name__
    return ("Observer" in name or "FakeQuant" in name) and hasattr(module, "dtype")


def underlying_dtype(dtype: torch.dtype) -> torch.dtype:
    return _UNDERLYING.get(dtype, dtype)


def statistics_holder(module):
    """The module whose recorded statistics define the qparams (a fake-quant's inner observer)."""
    return getattr(module, "activation_post_process", module)


def kind(module) -> str:
    """How ``module`` converts: 'static', 'dynamic', 'float16' or 'drop' (no quantization)."""
    if getattr(module, "is_dynamic", False):
        return "dynamic"
    if module.dtype in STATIC_DTYPES:
        return "static"
    if module.dtype == torch.float16:
        return "float16"
    return "drop"


class _QParamsView:
    """Stands in for an observer inside a user's ``derive_qparams_fn``: answers with qref's qparams."""

    def __init__(self, module):
        self._module = module

    def calculate_qparams(self):
        q = observer_qparams(self._module)
        return q.scale, q.zero_point

    def __getattr__(self, name):
        return getattr(self._module, name)


def _scale_zero_point(module) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(module, "derive_qparams_fn"):
        return module.derive_qparams_fn([_QParamsView(m) for m in module.obs_or_fqs])
    stats = statistics_holder(module)
    if hasattr(stats, "histogram"):
        uninitialised = stats.min_val == float("inf") and stats.max_val == float("-inf")
        if uninitialised:
            return torch.tensor([1.0]), torch.tensor([0])
        lo, hi = qp.histogram_range(stats.histogram, stats.min_val, stats.max_val, stats.dst_nbins)
        return _from_min_max(stats, lo, hi)
    if hasattr(stats, "min_val"):
        return _from_min_max(stats, stats.min_val, stats.max_val)
    if hasattr(stats, "scale") and hasattr(stats, "zero_point"):  # fixed qparams
        return stats.scale, stats.zero_point
    raise TypeError(
        f"qref cannot read qparams from {type(module).__name__}: it records neither min/max, "
        "a histogram, fixed qparams nor derived qparams"
    )


def _from_min_max(stats, lo, hi):
    return qp.from_min_max(
        lo,
        hi,
        qscheme=stats.qscheme,
        dtype=stats.dtype,
        quant_min=stats.quant_min,
        quant_max=stats.quant_max,
        eps=stats.eps,
        has_customized_qrange=getattr(stats, "has_customized_qrange", False),
    )


def observer_qparams(module) -> qp.QParams:
    """QParams for a static observer/fake-quant ``module`` as the converted graph must use them."""
    scale, zero_point = _scale_zero_point(module)
    per_channel = qp.is_per_channel(module.qscheme)
    return qp.QParams(
        scale=scale,
        zero_point=zero_point,
        quant_min=module.quant_min,
        quant_max=module.quant_max,
        dtype=underlying_dtype(module.dtype),
        axis=int(module.ch_axis) if per_channel else None,
    )
