"""Which quantized engines really run here, running code under one, and their known contracts."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["engines", "use_engine", "KERNEL_CONTRACTS", "KernelContract", "KernelDeviation", "Layer",
           "DEVIATIONS", "known_deviation", "ENGINE_LIMITS", "engine_limit", "qnnpack_bias_error", "padding_only_dimension", "thread_deviation", "int16_pair_cap", "has_vnni"]


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

DEGENERATE_SCALE = 2.0**-20
INT16_MAX = 32767


@dataclass(frozen=True)
class Layer:
    """A lowered layer that left its contract, as a deviation judges it: the lowered module and
    the quantized input the reference fed it (``qref.compare.ModuleInput``)."""

    module: Any
    input_high: int | None = None  # the largest quantized input integer it was fed
    input_scale: float | None = None  # its input's scale
    input_dtype: torch.dtype | None = None  # its input's integer dtype (torch.uint8, ...)
    input_zero_point: int | None = None  # its input's zero point (per-tensor inputs)
    input_shape: tuple | None = None  # its input's shape (N, C, spatial...)


@dataclass(frozen=True)
class KernelDeviation:
    """A kernel behaviour seen to leave the contract, and exactly where it may excuse a layer.

    ``cause``: what the kernel does; ``condition``: what must hold of the failing layer itself
    (``applies``); ``cap``: the largest error it can explain on that layer (``max_lsb``), in LSB
    of the layer's output; ``where``: the CPUs and torch versions it was seen on (``seen_here``:
    this CPU's flags, ``torch_versions``: prefixes of ``torch.__version__``)."""

    name: str
    engines: tuple[str, ...]
    cause: str
    condition: str
    cap: str
    where: str
    applies: Callable[[Layer], bool]
    max_lsb: Callable[[Layer], int]
    seen_here: Callable[[str], bool]  # engine -> whether this CPU is one it was seen on
    torch_versions: tuple[str, ...]

    def explains(self, engine: str, layer: Layer, lsb: int) -> bool:
        """Whether this deviation explains ``layer`` being ``lsb`` LSB off on ``engine`` here."""
        return (engine in self.engines and self.seen_here(engine)
                and torch.__version__.startswith(self.torch_versions) and self.applies(layer)
                and lsb <= self.max_lsb(layer))

    def __str__(self) -> str:
        return f"{self.name}: {self.cause}; only where {self.condition}; at most {self.cap}; {self.where}"


def _weighted(module) -> bool:
    import torch.ao.nn.quantized as nnq

    return isinstance(module, (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d,
                               nnq.ConvTranspose2d, nnq.ConvTranspose3d))


def _wide_uint8_input(layer: Layer) -> bool:
    """The layer was fed quint8 activations above 127 (u8 x s8 pairs can exceed int16)."""
    return (layer.input_dtype in (torch.uint8, torch.quint8) and layer.input_high is not None
            and layer.input_high > 127)


def _weight_scales(module) -> torch.Tensor:
    weight = module.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return weight.q_per_channel_scales().double()
    return torch.tensor([weight.q_scale()], dtype=torch.float64)


def int16_pair_cap(layer: Layer, contract_lsb: int = 1) -> int:
    """The most int16 pair saturation can move this layer's output, in its output LSB.

    u8 x s8 products are summed in pairs into int16 before int32 accumulation (vpmaddubsw): with
    inputs in 0..high and |weights| <= wmax a pair reaches 2 * high * wmax, so saturation takes at
    most ``2 * high * wmax - 32767`` from each of the ceil(K / 2) pairs of an output's K products;
    times input_scale * weight_scale / output_scale in output LSB, plus the contract's rounding.
    0 beyond the contract when the pairs cannot exceed int16 (inputs <= 127)."""
    module = layer.module
    if layer.input_high is None or layer.input_scale is None or not _weighted(module):
        return contract_lsb
    w = module.weight().int_repr().to(torch.int64)
    if type(module).__name__.startswith("ConvTranspose"):
        products = (module.in_channels // module.groups) * math.prod(w.shape[2:])
    else:
        products = math.prod(w.shape[1:])  # (in / groups) * kernel, or in_features
    excess = max(0, 2 * layer.input_high * int(w.abs().max()) - INT16_MAX)
    lsb = math.ceil(products / 2) * excess * layer.input_scale * float(_weight_scales(module).max()) / module.scale
    return contract_lsb + math.ceil(lsb)


def _output_range(layer: Layer) -> int:
    """The whole output range: a wrong or wrapped kernel result can be anywhere in it."""
    return 255 if getattr(layer.module, "scale", None) is not None else 0


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


def _degenerate_scale(layer: Layer) -> bool:
    """The layer's own input or weight scale is degenerate (float32 eps after a zero range)."""
    if layer.input_scale is not None and layer.input_scale < DEGENERATE_SCALE:
        return True
    return _weighted(layer.module) and float(_weight_scales(layer.module).min()) < DEGENERATE_SCALE


INT16_SATURATION = KernelDeviation(
    "int16 pair saturation", ("fbgemm", "x86", "onednn"),
    cause=INT16_PAIRS.format(engine="fbgemm/x86 (and onednn without VNNI)"),
    condition="the failing conv or linear was itself fed quint8 inputs above 127",
    cap="the most saturating its own products' pairs can change its output (int16_pair_cap)",
    where=("CPUs without AVX512-VNNI (fbgemm, x86) or without VNNI (onednn), as the kernel contract "
           "says; torch 2.x (pytorch#44939, open since 2020)"),
    applies=lambda layer: _weighted(layer.module) and _wide_uint8_input(layer),
    max_lsb=int16_pair_cap,
    seen_here=lambda engine: KERNEL_CONTRACTS[engine].seven_bit_activations,
    torch_versions=("2.",),
)

FBGEMM_DEPTHWISE_INT16 = KernelDeviation(
    "fbgemm depthwise int16", ("fbgemm",),
    cause=("fbgemm's depthwise conv kernel pairs u8 x s8 products in int16 also on AVX512-VNNI CPUs, "
           "where its dense and grouped convs do not: quantized activations above 127 (inputs beyond "
           "the calibrated range of a reduce_range model) saturate, seen 24-255 LSB"),
    condition="the failing layer is a depthwise conv that was itself fed quint8 inputs above 127",
    cap="the most saturating its own products' pairs can change its output (int16_pair_cap)",
    where="seen on an AVX512-VNNI/AMX CPU, torch 2.13 (pinned in tests/test_fx_kernels.py)",
    applies=lambda layer: _depthwise_conv(layer.module) and _wide_uint8_input(layer),
    max_lsb=int16_pair_cap,
    seen_here=lambda engine: has_vnni(avx512=True),
    torch_versions=("2.13",),
)

ONEDNN_DECONV_CHANNELS = KernelDeviation(
    "onednn ConvTranspose channels", ("onednn", "x86"),
    cause=("onednn's quantized ConvTranspose (also under the x86 engine, which hands it to onednn) is "
           "wrong when in and out channels per group differ and both exceed 1: up to 255 LSB inside "
           "the calibrated range, exact with equal channel counts; fbgemm and qnnpack are exact on the "
           "same model"),
    condition="the failing layer is a ConvTranspose with unequal channels per group, both above 1",
    cap="its whole output range (255 LSB): the result is wrong, not imprecise; the shape confines it",
    where=("seen on AVX512-VNNI CPUs with and without AMX (3 -> 2 channels: 90 LSB without AMX), torch 2.13 "
           "(pinned in tests/test_fx_kernels.py)"),
    applies=lambda layer: _onednn_deconv_channels(layer.module),
    max_lsb=_output_range,
    seen_here=lambda engine: "avx512_vnni" in _cpu_flags(),
    torch_versions=("2.13",),
)

QNNPACK_DEGENERATE_SCALE = KernelDeviation(
    "qnnpack degenerate scale", ("qnnpack",),
    cause=("qnnpack wraps a requantized output beyond the uint8 range instead of saturating when an "
           "input or weight scale is degenerate (a zero-range calibration, or all-zero weights as after "
           "folding a BatchNorm with zero gamma, give scale = float32 eps, so the int32 bias is huge): "
           "seen 255 -> 7 on a Linear whose output is its bias, 106 for 0 on a conv1d with zero-gamma "
           "BatchNorm"),
    condition=f"the failing layer's own input or weight scale is below 2**{int(math.log2(DEGENERATE_SCALE))}",
    cap="its whole output range (255 LSB): a wrapped uint8 value can land anywhere in it",
    where="seen on an x86-64 CPU (qnnpack's SSE2 kernels), torch 2.13 (pinned in tests/test_fx_kernels.py)",
    applies=_degenerate_scale,
    max_lsb=_output_range,
    seen_here=lambda engine: "sse2" in _cpu_flags(),
    torch_versions=("2.13",),
)


def padding_only_dimension(layer: Layer) -> bool:
    """The layer is a conv (not transposed) and along some spatial dimension every tap of every
    output position falls in the zero padding: its true output there is its bias alone."""
    import torch.ao.nn.quantized as nnq

    module, shape = layer.module, layer.input_shape
    if not isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)) or shape is None:
        return False
    for size, k, stride, pad, dil in zip(shape[2:], module.kernel_size, module.stride, module.padding,
                                         module.dilation):
        outputs = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if all(not 0 <= o * stride + t * dil - pad < size for o in range(outputs) for t in range(k)):
            return True
    return False


ONEDNN_PADDING_ONLY_WINDOW = KernelDeviation(
    "onednn padding-only window", ("onednn", "x86"),
    cause=("onednn's VNNI quantized conv (also under the x86 engine, which hands it to onednn) is wrong "
           "when its input zero point is non-zero and, along one spatial dimension, every kernel tap of "
           "every output position lands in the padding (e.g. a width-1 input, padding 1, a 2-tap kernel "
           "with dilation 2): it leaves the input zero point's correction out, seen 72-255 LSB; exact "
           "with a zero input zero point, and with ONEDNN_MAX_CPU_ISA=AVX2; fbgemm and qnnpack are exact"),
    condition="the failing layer is such a conv and was fed an input with a non-zero zero point",
    cap="its whole output range (255 LSB): the result is wrong, not imprecise; the geometry confines it",
    where=("seen with onednn's AVX2-VNNI and AVX512-VNNI kernels (not with ONEDNN_MAX_CPU_ISA=AVX2), "
           "torch 2.13 (pinned in tests/test_fx_kernels.py)"),
    applies=lambda layer: bool(layer.input_zero_point) and padding_only_dimension(layer),
    max_lsb=_output_range,
    seen_here=lambda engine: has_vnni(),
    torch_versions=("2.13",),
)


def qnnpack_bias_error(layer: Layer) -> float:
    """How far qnnpack's int32 bias moves this layer's output, in its output LSB: qnnpack adds
    ``round(bias / (input_scale * weight_scale))`` where the reference adds the float bias, so
    each channel is off by its bias' rounding error times ``input_scale * weight_scale /
    output_scale`` (0 for a layer without bias or input scale)."""
    module = layer.module
    bias = module.bias() if _weighted(module) else None
    if bias is None or layer.input_scale is None:
        return 0.0
    bias = bias.detach().double()
    scales = _weight_scales(module)
    step = layer.input_scale * (scales if scales.numel() == bias.numel() else scales.max())
    return float(((torch.round(bias / step) - bias / step).abs() * step / module.scale).max())


QNNPACK_BIAS_STEP = KernelDeviation(
    "qnnpack int32 bias step", ("qnnpack",),
    cause=("qnnpack adds the bias in int32 at the accumulator's scale input_scale * weight_scale (fbgemm, "
           "x86 and onednn add it in float); where that step is coarser than the output's (a wide input "
           "range, as after calibrating on an outlier) its rounding moves the output by whole LSB: seen "
           "3 LSB on a Linear with input scale 15 and output scale 0.012"),
    condition="rounding the failing layer's own bias to that step moves some output channel by more than 0.5 LSB",
    cap="the contract's 1 LSB plus that rounding error rounded up (qnnpack_bias_error)",
    where="seen on an x86-64 CPU (qnnpack's SSE2 kernels), torch 2.13 (pinned in tests/test_fx_kernels.py)",
    applies=lambda layer: qnnpack_bias_error(layer) > 0.5,
    max_lsb=lambda layer: KERNEL_CONTRACTS["qnnpack"].max_lsb + math.ceil(qnnpack_bias_error(layer)),
    seen_here=lambda engine: "sse2" in _cpu_flags(),
    torch_versions=("2.13",),
)

DEVIATIONS = (INT16_SATURATION, FBGEMM_DEPTHWISE_INT16, ONEDNN_DECONV_CHANNELS, ONEDNN_PADDING_ONLY_WINDOW,
              QNNPACK_DEGENERATE_SCALE, QNNPACK_BIAS_STEP)


KERNEL_CONTRACTS = {
    "fbgemm": KernelContract(1, not has_vnni(avx512=True), None, INT16_PAIRS.format(engine="fbgemm")),
    "x86": KernelContract(1, not has_vnni(avx512=True), None, INT16_PAIRS.format(engine="x86 (fbgemm/onednn)")),
    "qnnpack": KernelContract(1, False, None, "qnnpack accumulates in int32; within 1 LSB"),
    "onednn": KernelContract(1, not has_vnni(), 1, ONEDNN_THREADS),
}


def known_deviation(engine: str, layer: Layer, lsb: int) -> KernelDeviation | None:
    """The known deviation that explains ``layer`` (a lowered layer that left its contract on
    ``engine``) being ``lsb`` LSB off, here: on this CPU and torch version, from the layer's own
    input and shape, within the deviation's cap; None if none does (then it is a failure)."""
    return next((d for d in DEVIATIONS if d.explains(engine, layer, lsb)), None)


# What an engine refuses to run at all, by the message its kernel raises: a model qref's own
# lowering cannot run there is not compared on that engine (any other error is reported).
# qnnpack raises one message for every operator it cannot create: the scale ratios its cause
# names, but also a zero or non-finite scale, which is a lowering's error (``engine_limit``).
ENGINE_LIMITS = (
    (("qnnpack",), r"failed to create QNNPACK (Add|Average Pooling|Global Average Pooling) operator",
     "qnnpack's add accepts input-to-output scale ratios in [2**-14, 2**8) only, its average "
     "pooling ratios in [2**-8, 2**8)"),
    (("onednn",), r"ONEDNN only supports zero output_padding",
     "onednn's transposed conv takes no output_padding"),
)


def _scales_finite_and_positive(lowered) -> bool:
    for module in lowered.modules():
        scale = getattr(module, "scale", None)
        if isinstance(scale, torch.Tensor):
            scale = scale.double()
        elif not isinstance(scale, float):
            continue
        if not bool(torch.all(torch.isfinite(torch.as_tensor(scale)) & (torch.as_tensor(scale) > 0))):
            return False
    return True


def engine_limit(engine: str, error: BaseException, lowered=None) -> str | None:
    """The engine limit (``ENGINE_LIMITS``) that ``error``, raised running ``lowered`` (a lowered
    model) on ``engine``, is; None when it is none of them (then the error is the lowering's): a
    lowered model with a zero or non-finite output scale is never within a limit."""
    import re

    text = str(error)
    cause = next((cause for names, pattern, cause in ENGINE_LIMITS
                  if engine in names and re.search(pattern, text)), None)
    if cause is not None and lowered is not None and not _scales_finite_and_positive(lowered):
        return None
    return cause


def thread_deviation(engine: str, threads: int | None = None) -> str | None:
    """Why ``engine`` may differ from itself at ``threads`` intra-op threads (default: the current
    count), or None: onednn is deterministic on one thread only."""
    contract = KERNEL_CONTRACTS.get(engine)
    threads = torch.get_num_threads() if threads is None else threads
    if contract is not None and contract.deterministic_threads is not None and threads > contract.deterministic_threads:
        return ONEDNN_THREADS
    return None
