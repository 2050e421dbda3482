"""Which quantized engines really run here, running code under one, and their known contracts."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

__all__ = ["engines", "use_engine", "KERNEL_CONTRACTS", "KernelContract", "known_deviation", "has_vnni"]


def _runs(engine: str) -> bool:
    """A quantized linear and conv2d actually execute under ``engine``."""
    import torch.ao.nn.quantized as nnq

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        x = torch.quantize_per_tensor(torch.rand(1, 2, 5, 5), 0.1, 0, torch.quint8)
        nnq.Conv2d(2, 2, 3)(x)
        nnq.Linear(5, 3)(x)
        return True
    except Exception:  # an engine listed but not built/usable here
        return False
    finally:
        torch.backends.quantized.engine = previous


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[str, ...]:
    return tuple(e for e in torch.backends.quantized.supported_engines if e != "none" and _runs(e))


def engines() -> list[str]:
    """The quantized engines that run a quantized linear and conv on this machine (probed once)."""
    return list(_probe())


@contextlib.contextmanager
def use_engine(name: str, threads: int | None = None):
    """Run the block under quantized engine ``name`` (and ``threads`` intra-op threads, if given).

    The previous engine and thread count are restored on exit, also on error.
    """
    available = engines()
    if name not in available:
        raise ValueError(
            f"quantized engine {name!r} does not run here; available: {', '.join(available)}"
        )
    previous_engine, previous_threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.backends.quantized.engine = name
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous_engine
        torch.set_num_threads(previous_threads)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def has_vnni(avx512: bool = False) -> bool:
    """The CPU has VNNI (u8 x s8 dot products accumulated in int32, no int16 pairs); with
    ``avx512``, AVX512-VNNI, the form fbgemm's kernels use. Measured: on an AVX512-VNNI CPU
    fbgemm, x86 and onednn are exact without reduce_range, even on inputs far beyond the
    calibrated range; on a CPU without VNNI fbgemm saturates (~100 LSB)."""
    flags = _cpu_flags()
    return "avx512_vnni" in flags or (not avx512 and "avx_vnni" in flags)


@dataclass(frozen=True)
class KernelContract:
    """What a lowered model promises against the reference model on an engine."""

    max_lsb: int  # off-by-one from rounding order (requantize vs. float round trip)
    seven_bit_activations: bool  # u8 inputs must stay <= 127: u8 x s8 pair sums are int16
    deterministic_threads: int | None  # None: deterministic at any thread count
    note: str


INT16_PAIRS = (
    "{engine} saturates int16 intermediates in u8 x s8 pairwise products (pytorch#44939): "
    "quantized activations above 127 (no reduce_range, or inputs beyond the calibrated range, "
    "which quantize_per_tensor does not clamp to the observer's 0..127) leave the 1-LSB contract"
)
ONEDNN_THREADS = (
    "onednn lowered models are nondeterministic with more than one thread (reduction order); "
    "pin torch.set_num_threads(1) for bit-exact comparisons"
)

QNNPACK_DEGENERATE_SCALE = (
    "qnnpack wraps a requantized output beyond the uint8 range instead of saturating when an "
    "input or weight scale is degenerate (a zero-range calibration, or all-zero weights as after "
    "folding a BatchNorm with zero gamma, give scale = float32 eps, so the int32 bias is huge): "
    "seen 255 -> 7 on a Linear whose output is its bias (tests/test_fx_kernels.py pins it), "
    "106 for 0 on a conv1d with zero-gamma BatchNorm"
)
DEGENERATE_SCALE = 2.0**-20

ONEDNN_DECONV_CHANNELS = (
    "onednn's quantized ConvTranspose (also under the x86 engine, which hands it to onednn) is "
    "wrong when in and out channels per group differ and both exceed 1: up to 255 LSB inside "
    "the calibrated range, exact with equal channel counts; fbgemm and qnnpack are exact on the "
    "same model (seen on an AVX512-VNNI/AMX CPU, torch 2.13; pinned in tests/test_fx_kernels.py)"
)


FBGEMM_DEPTHWISE_INT16 = (
    "fbgemm's depthwise conv kernel pairs u8 x s8 products in int16 also on AVX512-VNNI CPUs, "
    "where its dense and grouped convs do not: quantized activations above 127 (inputs beyond "
    "the calibrated range of a reduce_range model) saturate, seen 24-255 LSB (torch 2.13; pinned "
    "in tests/test_fx_kernels.py)"
)


def _depthwise_conv(module) -> bool:
    import torch.ao.nn.quantized as nnq

    convs = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)  # the fused ConvReLU modules subclass these
    return isinstance(module, convs) and module.groups == module.in_channels > 1


def _onednn_deconv_channels(module) -> bool:
    import torch.ao.nn.quantized as nnq

    if not isinstance(module, (nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)):
        return False
    per_group_in, per_group_out = module.in_channels // module.groups, module.out_channels // module.groups
    return per_group_in > 1 and per_group_out > 1 and per_group_in != per_group_out


KERNEL_CONTRACTS = {
    "fbgemm": KernelContract(1, not has_vnni(avx512=True), None, INT16_PAIRS.format(engine="fbgemm")),
    "x86": KernelContract(1, not has_vnni(avx512=True), None, INT16_PAIRS.format(engine="x86 (fbgemm/onednn)")),
    "qnnpack": KernelContract(1, False, None, "qnnpack accumulates in int32; within 1 LSB"),
    "onednn": KernelContract(1, not has_vnni(), 1, ONEDNN_THREADS),
}


def known_deviation(
    engine: str,
    reduce_range: bool,
    dtype=torch.quint8,
    threads: int | None = None,
    input_max: int | None = None,
    input_scale: float | None = None,
    modules=(),
) -> str | None:
    """Why a lowered model on ``engine`` may leave the 1-LSB contract, or None if it should hold.

    ``reduce_range``: that of the 8-bit activation observers; ``input_max``: the largest
    quantized input value seen, if known; ``input_scale``: the smallest activation or weight
    scale of a kernel, if known; ``threads``: the intra-op thread count the model
    runs with (default: the current one); ``modules``: the lowered modules that left the
    contract, if known (a shape-dependent deviation is named only if it explains each of them).
    """
    contract = KERNEL_CONTRACTS.get(engine)
    if contract is None:
        return None
    modules = list(modules)
    if engine in ("onednn", "x86") and modules and all(_onednn_deconv_channels(m) for m in modules):
        return ONEDNN_DECONV_CHANNELS
    if engine == "qnnpack" and input_scale is not None and input_scale < DEGENERATE_SCALE:
        return QNNPACK_DEGENERATE_SCALE
    too_wide = not reduce_range or (input_max is not None and input_max > 127)
    if contract.seven_bit_activations and dtype in (torch.quint8, torch.uint8) and too_wide:
        cause = INT16_PAIRS.format(engine=engine)
        return cause + (" (this CPU has no VNNI)" if engine == "onednn" else " (this CPU has no AVX512-VNNI)")
    if (engine == "fbgemm" and dtype in (torch.quint8, torch.uint8) and too_wide and modules
            and all(_depthwise_conv(m) for m in modules)):
        return FBGEMM_DEPTHWISE_INT16
    threads = torch.get_num_threads() if threads is None else threads
    if contract.deterministic_threads is not None and threads > contract.deterministic_threads:
        return ONEDNN_THREADS
    return None
