"""qref.engines: which quantized engines run here, running under one, kernel contracts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.ao.nn.quantized as nnq

from qref.engines import KERNEL_CONTRACTS, engines, known_deviation, use_engine


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


@pytest.mark.parametrize("avx512_vnni", [True, False], ids=["AVX512-VNNI CPU", "CPU without VNNI"])
def test_known_deviation_of_int16_pairs_depends_on_the_cpu(monkeypatch, avx512_vnni):
    for engine in ("fbgemm", "x86"):  # the contracts as has_vnni(avx512=True) would set them
        contract = dataclasses.replace(KERNEL_CONTRACTS[engine], seven_bit_activations=not avx512_vnni)
        monkeypatch.setitem(KERNEL_CONTRACTS, engine, contract)
    if avx512_vnni:  # int32 dot products: no int16 pairs to saturate
        assert known_deviation("fbgemm", reduce_range=False) is None
        assert known_deviation("x86", reduce_range=True, input_max=200) is None
    else:
        assert "no AVX512-VNNI" in known_deviation("fbgemm", reduce_range=False)
        assert "pytorch#44939" in known_deviation("x86", reduce_range=True, input_max=200)


def test_known_deviation():
    assert known_deviation("fbgemm", reduce_range=True, threads=1) is None
    assert known_deviation("fbgemm", reduce_range=False, dtype=torch.qint8) is None  # int8 activations
    assert known_deviation("qnnpack", reduce_range=False, threads=8) is None
    assert "set_num_threads(1)" in known_deviation("onednn", reduce_range=True, threads=2)
    assert known_deviation("onednn", reduce_range=True, threads=1) is None
    assert known_deviation("unknown", reduce_range=False) is None
    assert all(c.max_lsb == 1 for c in KERNEL_CONTRACTS.values())


def test_onednn_conv_transpose_deviation_depends_on_channels_per_group():
    from qref.engines import ONEDNN_DECONV_CHANNELS

    def deconv(cin, cout, groups=1):
        return nnq.ConvTranspose2d(cin, cout, 1, groups=groups)

    assert known_deviation("onednn", True, threads=1, modules=[deconv(3, 2)]) == ONEDNN_DECONV_CHANNELS
    assert known_deviation("x86", True, threads=1, modules=[deconv(6, 4, groups=2)]) == ONEDNN_DECONV_CHANNELS
    for same in (deconv(3, 3), deconv(1, 4), deconv(4, 1), deconv(4, 2, groups=2)):
        assert known_deviation("onednn", True, threads=1, modules=[same]) is None
    assert known_deviation("fbgemm", True, threads=1, modules=[deconv(3, 2)]) is None
    assert known_deviation("onednn", True, threads=1, modules=[nnq.Conv2d(3, 2, 1)]) is None


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
