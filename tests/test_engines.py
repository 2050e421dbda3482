"""qref.engines: which quantized engines run here, running under one, kernel contracts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.ao.nn.quantized as nnq

from qref.engines import (
    INT16_SATURATION,
    KERNEL_CONTRACTS,
    ONEDNN_DECONV_CHANNELS,
    QNNPACK_DEGENERATE_SCALE,
    ENGINE_LIMITS,
    Layer,
    engine_limit,
    engines,
    int16_pair_cap,
    known_deviation,
    thread_deviation,
    use_engine,
)


def test_engines_are_supported_and_really_run():
    found = engines()
    assert found, "no quantized engine runs here"
    assert set(found) <= set(torch.backends.quantized.supported_engines) - {"none"}
    x = torch.quantize_per_tensor(torch.rand(1, 3, 6, 6), 0.05, 3, torch.quint8)
    for engine in found:
        with use_engine(engine):
            assert torch.backends.quantized.engine == engine
            assert nnq.Conv2d(3, 2, 3)(x).is_quantized


def test_engines_is_cached_and_returns_a_copy():
    first = engines()
    first.append("bogus")
    assert "bogus" not in engines()


def test_use_engine_restores_engine_and_threads():
    before_engine, before_threads = torch.backends.quantized.engine, torch.get_num_threads()
    other = next((e for e in engines() if e != before_engine), before_engine)
    with use_engine(other, threads=1):
        assert torch.backends.quantized.engine == other
        assert torch.get_num_threads() == 1
    assert torch.backends.quantized.engine == before_engine
    assert torch.get_num_threads() == before_threads


def test_use_engine_restores_on_error():
    before = torch.backends.quantized.engine
    with pytest.raises(RuntimeError, match="boom"):
        with use_engine(engines()[-1]):
            raise RuntimeError("boom")
    assert torch.backends.quantized.engine == before


def test_unknown_engine_lists_available():
    before = torch.backends.quantized.engine
    with pytest.raises(ValueError, match="available: " + ", ".join(engines())):
        with use_engine("tpu9000"):
            pass
    assert torch.backends.quantized.engine == before


def _conv(cin=3, cout=2, k=3, groups=1, scale=0.02, weight_scale=0.01, transpose=False):
    """A lowered conv whose weights are all 127 (the largest pair sums) at ``weight_scale``."""
    cls = nnq.ConvTranspose2d if transpose else nnq.Conv2d
    conv = cls(cin, cout, k, groups=groups)
    shape = (cin, cout // groups, k, k) if transpose else (cout, cin // groups, k, k)
    conv.set_weight_bias(torch.quantize_per_tensor(torch.full(shape, 127 * weight_scale), weight_scale, 0,
                                                   torch.qint8), None)
    conv.scale, conv.zero_point = scale, 0
    return conv


def _wide(module, high=200, scale=0.05):
    return Layer(module, input_high=high, input_scale=scale, input_dtype=torch.uint8)


@pytest.mark.parametrize("avx512_vnni", [True, False], ids=["AVX512-VNNI CPU", "CPU without VNNI"])
def test_int16_saturation_is_excused_only_on_cpus_without_vnni_and_wide_inputs(monkeypatch, avx512_vnni):
    for engine in ("fbgemm", "x86"):  # the contracts as has_vnni(avx512=True) would set them
        contract = dataclasses.replace(KERNEL_CONTRACTS[engine], seven_bit_activations=not avx512_vnni)
        monkeypatch.setitem(KERNEL_CONTRACTS, engine, contract)
    conv = _conv()
    for engine in ("fbgemm", "x86"):
        found = known_deviation(engine, _wide(conv), 5)
        if avx512_vnni:  # int32 dot products: no int16 pairs to saturate
            assert found is None
        else:
            assert found is INT16_SATURATION and "pytorch#44939" in str(found)
        # the layer's own input decides: 7-bit inputs cannot saturate a pair, quint8 only
        assert known_deviation(engine, _wide(conv, high=127), 5) is None
        assert known_deviation(engine, Layer(conv, 200, 0.05, torch.int8), 5) is None
    assert known_deviation("qnnpack", _wide(conv), 5) is None  # int32 accumulation


def test_int16_pair_cap_bounds_the_error_from_the_layers_own_numbers():
    conv = _conv(cin=3, k=3, scale=0.02, weight_scale=0.01)  # 27 products per output: 14 pairs
    excess = 2 * 200 * 127 - 32767  # the most a saturated pair can lose with inputs <= 200
    assert int16_pair_cap(_wide(conv, high=200, scale=0.05)) == 1 + math.ceil(14 * excess * 0.05 * 0.01 / 0.02)
    assert int16_pair_cap(_wide(conv, high=127)) == 1  # 2 * 127 * 127 < 32767: nothing saturates
    cap = int16_pair_cap(_wide(conv))
    assert INT16_SATURATION.applies(_wide(conv)) and INT16_SATURATION.max_lsb(_wide(conv)) == cap


def test_thread_deviation():
    assert thread_deviation("fbgemm", threads=8) is None
    assert thread_deviation("qnnpack", threads=8) is None
    assert "set_num_threads(1)" in thread_deviation("onednn", threads=2)
    assert thread_deviation("onednn", threads=1) is None
    assert thread_deviation("unknown") is None
    assert known_deviation("unknown", _wide(_conv()), 2) is None
    assert all(c.max_lsb == 1 for c in KERNEL_CONTRACTS.values())


def test_onednn_conv_transpose_deviation_depends_on_channels_cpu_torch_and_cap(monkeypatch):
    import importlib

    module = importlib.import_module("qref.engines")  # `qref.engines` is also a function
    monkeypatch.setattr(module, "_cpu_flags", lambda: frozenset({"avx512_vnni", "amx_int8"}))
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")

    def deconv(cin, cout, groups=1):
        return Layer(_conv(cin, cout, 1, groups=groups, transpose=True))

    assert known_deviation("onednn", deconv(3, 2), 200) is ONEDNN_DECONV_CHANNELS
    assert known_deviation("x86", deconv(6, 4, groups=2), 200) is ONEDNN_DECONV_CHANNELS
    assert known_deviation("onednn", deconv(3, 2), 256) is None  # beyond its cap (the output range)
    for same in (deconv(3, 3), deconv(1, 4), deconv(4, 1), deconv(4, 2, groups=2)):
        assert known_deviation("onednn", same, 200) is None
    assert known_deviation("fbgemm", deconv(3, 2), 200) is None
    assert known_deviation("onednn", Layer(_conv(3, 2, 1)), 200) is None
    monkeypatch.setattr(torch, "__version__", "2.14.0")  # not seen there
    assert known_deviation("onednn", deconv(3, 2), 200) is None
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(module, "_cpu_flags", lambda: frozenset({"avx512_vnni"}))  # seen without AMX too
    assert known_deviation("onednn", deconv(3, 2), 200) is ONEDNN_DECONV_CHANNELS
    monkeypatch.setattr(module, "_cpu_flags", lambda: frozenset({"avx2"}))  # not seen on this CPU
    assert known_deviation("onednn", deconv(3, 2), 200) is None


def test_qnnpack_degenerate_scale_is_judged_on_the_layers_own_scales(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    eps = torch.finfo(torch.float32).eps
    linear = nnq.Linear(1, 1)
    assert known_deviation("qnnpack", Layer(linear, 0, eps, torch.uint8), 248) is QNNPACK_DEGENERATE_SCALE
    assert known_deviation("qnnpack", Layer(linear, 0, 0.01, torch.uint8), 248) is None
    zero_weights = _conv(1, 1, 1, weight_scale=eps)
    assert known_deviation("qnnpack", Layer(zero_weights, 10, 0.01, torch.uint8), 250) is QNNPACK_DEGENERATE_SCALE
    assert known_deviation("qnnpack", Layer(zero_weights, 10, 0.01, torch.uint8), 256) is None  # beyond the cap
    assert known_deviation("fbgemm", Layer(linear, 0, eps, torch.uint8), 248) is None


@pytest.mark.parametrize("flags, vnni, avx512_vnni", [
    ({"avx2"}, False, False), ({"avx2", "avx_vnni"}, True, False), ({"avx512f", "avx512_vnni"}, True, True)])
def test_has_vnni_reads_the_cpu_flags(monkeypatch, flags, vnni, avx512_vnni):
    import importlib

    module = importlib.import_module("qref.engines")  # `qref.engines` is also a function
    monkeypatch.setattr(module, "_cpu_flags", lambda: frozenset(flags))
    assert module.has_vnni() is vnni and module.has_vnni(avx512=True) is avx512_vnni


def test_cpu_flags_are_read_from_proc_cpuinfo():
    import os

    from qref.engines import _cpu_flags

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo here")
    flags = _cpu_flags()
    assert "fpu" in flags or "sse2" in flags or "asimd" in flags or "fp" in flags, sorted(flags)[:20]


def _qnnpack_add_of_far_scales():
    a = torch.quantize_per_tensor(torch.ones(4), 1e-6, 0, torch.quint8)
    b = torch.quantize_per_tensor(torch.ones(4), 1.0, 0, torch.quint8)
    torch.ops.quantized.add(a, b, 1.0, 0)


def _onednn_transposed_conv_with_output_padding():
    nnq.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1)


LIMITED = [("qnnpack", _qnnpack_add_of_far_scales, 0), ("onednn", _onednn_transposed_conv_with_output_padding, 1)]


@pytest.mark.parametrize("engine, refused, limit", [c for c in LIMITED if c[0] in engines()],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_engine_limit_is_what_the_kernel_raises(engine, refused, limit):
    """qref.engines.ENGINE_LIMITS: the messages of what an engine refuses to run, as its kernels
    raise them; a model qref's own lowering cannot run there is left not compared (and only then)."""
    with use_engine(engine), pytest.raises(RuntimeError) as raised:
        refused()
    assert engine_limit(engine, raised.value) == ENGINE_LIMITS[limit][2]


def test_another_error_is_no_engine_limit():
    refused = RuntimeError("failed to create QNNPACK Add operator")
    assert engine_limit("qnnpack", refused) is not None
    assert engine_limit("fbgemm", refused) is None  # another engine's limit
    assert engine_limit("qnnpack", RuntimeError("Weight must be provided")) is None  # a lowering's own error
    # qnnpack's message is the same for a zero or non-finite scale: then the lowering is wrong
    lowered = torch.nn.Module()
    lowered.add = torch.ao.nn.quantized.QFunctional()
    assert engine_limit("qnnpack", refused, lowered) is not None
    lowered.add.scale = 0.0
    assert engine_limit("qnnpack", refused, lowered) is None
    lowered.add.scale = float("nan")
    assert engine_limit("qnnpack", refused, lowered) is None
