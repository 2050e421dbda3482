"""Property family 4: lowered models on the real quantized kernels (FX flow).

Each lowered layer gets exactly the quantized input its reference-decomposed layer saw and must
stay within its engine's contract (qref.engines.KERNEL_CONTRACTS: 1 LSB, onednn pinned to one
thread).  Where a kernel is known to leave its contract — int16 saturation without ``reduce_range``
or on inputs beyond the calibrated range (pytorch#44939) on CPUs without (AVX512-)VNNI, onednn's
ConvTranspose with unequal channels, qnnpack with a degenerate scale — the example is recorded
under that named deviation instead of passing or failing blindly.
Engines must agree with each other where their contracts overlap: 1 LSB each per layer, so
2 LSB per layer between two engines.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, reject
from hypothesis import strategies as st

import qref
from qref.compare import Tolerance, compare, compare_lowered, quantize_points
from qref.engines import has_vnni, known_deviation
from qref.strategies import cases

from ._support import budget, subject  # noqa: F401 (subject: fixture)

pytestmark = [pytest.mark.qref_family("kernels"), pytest.mark.qref_flow("fx")]


def pytest_generate_tests(metafunc):  # noqa: D103 - engines this run exercises (--qref-engine)
    if "engine" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("qref_engine", None) or qref.engines()
        metafunc.parametrize("engine", [e for e in chosen if e in qref.engines()])


def _engine_runs(case, engine) -> bool:
    """Whether qref's own lowering runs on ``engine``: the engine's limits (qnnpack: add scale
    ratios in [2**-14, 2**8); onednn: no output_padding) are not the converter's."""
    with qref.use_engine(engine, threads=1):
        try:
            qref.convert_fx(case.prepared())(*case.inputs[0])
        except Exception as error:  # noqa: BLE001
            event(f"{engine} cannot run this model: {str(error).splitlines()[-1][:80]}")
            return False
    return True


def _lower(subject, case, engine):
    if not _engine_runs(case, engine):
        reject()
    with qref.use_engine(engine, threads=1):
        reference = qref.convert_to_reference_fx(case.prepared())
        lowered = subject.convert(case)
        return reference, lowered


def _largest_uint8(reference, inputs) -> int | None:
    """The largest quint8 activation the reference fed a kernel (fbgemm saturates above 127)."""
    values = [int(t.max()) for ts in quantize_points(reference, inputs).values() for t in ts
              if t.dtype == torch.uint8 and t.numel()]
    return max(values, default=None)


def _failing_modules(lowered, result) -> list:
    """The lowered modules at the points that left the contract (a kernel's limits may depend
    on its shape, e.g. onednn's ConvTranspose channels); empty if a failing point is no lowered
    module (a missing point, a q/dq one), which no module-shaped deviation explains."""
    modules = dict(lowered.named_modules())
    points = [result.points.get(k) for k in result.failures if not k.startswith("output[")]
    if any(p is None or p.kind != "module" or p.key not in modules for p in points):
        return []
    return [modules[p.key] for p in points]


def _transposed_convs(lowered) -> list:
    return [m for m in lowered.modules() if type(m).__name__.startswith("ConvTranspose")]


def _smallest_scale(reference) -> float | None:
    """The smallest activation or weight scale in the reference (a zero-range calibration or
    all-zero weights, e.g. after folding a BatchNorm with zero gamma, make it float32 eps)."""
    scales = [float(getattr(reference, n.args[1].target)) for n in reference.graph.nodes
              if n.target is torch.quantize_per_tensor and isinstance(n.args[1], torch.fx.Node)]
    scales += [float(m.weight_scale.min()) for m in reference.modules()
               if isinstance(getattr(m, "weight_scale", None), torch.Tensor) and m.weight_scale.numel()]
    return min(scales, default=None)


@pytest.mark.qref_tier("ops")
@budget("ops")
@given(data=st.data())
def test_lowered_within_kernel_contract(subject, engine, data):
    subject.drew(engine=engine)  # data: only the case (a replay passes it)
    case = data.draw(cases("fx", tier="patterns", engine=engine), label="case")
    reference, lowered = _lower(subject, case, engine)
    with qref.use_engine(engine, threads=1):
        result = compare_lowered(reference, lowered, case.inputs, Tolerance.kernel(engine))
    subject.record.lsb(result.max_lsb)
    if result.ok:
        return
    deviation = known_deviation(engine, case.setup.reduce_range, threads=1,
                                input_max=_largest_uint8(reference, case.inputs),
                                input_scale=_smallest_scale(reference),
                                modules=_failing_modules(lowered, result))
    if deviation:
        event(f"known kernel deviation on {engine}")
        subject.record.note(f"{engine}: {result.max_lsb} LSB, known deviation: {deviation}")
        return
    subject.fail(case, f"lowered on {engine}, a layer leaves the kernel contract:\n{result.message()}")


ENGINES_AGREE_CAUSE = ("each engine is within 1 LSB of the reference per requantization, so two "
                       "engines may differ by 2 LSB per lowered layer")


@pytest.mark.qref_tier("patterns")
@budget("patterns")
@given(case=cases("fx", tier="patterns", engine="fbgemm"))
def test_engines_agree(subject, qref_engines, case):
    """fbgemm-prepared models (reduce_range, so 7-bit activations) lowered on qnnpack: the engines
    whose 1-LSB contracts overlap here.  onednn without VNNI (and x86, which dispatches to it)
    pairs u8 x s8 products in int16 (INT16_PAIRS), so its contract does not overlap fbgemm's."""
    subject.drew(qref_engines=qref_engines)  # a fixture, but its reproducer needs the list
    others = [e for e in qref_engines if e == "qnnpack" or (e in ("onednn", "x86") and has_vnni())]
    others = [e for e in others if e in qref.engines()]
    if "fbgemm" not in qref.engines() or not others:
        pytest.skip("needs fbgemm and another engine")
    with qref.use_engine("fbgemm", threads=1):
        baseline = subject.convert(case)
        reference = qref.convert_to_reference_fx(case.prepared())
    # inputs whose quantized activations pass 127 leave fbgemm's contract (INT16_PAIRS): not compared
    inputs = [b for b in case.inputs if (_largest_uint8(reference, [b]) or 0) <= 127]
    event(f"{len(case.inputs) - len(inputs)} of {len(case.inputs)} inputs beyond fbgemm's 7-bit range")
    beyond = 127
    for engine in others:
        if not _engine_runs(case, engine):
            continue
        with qref.use_engine(engine, threads=1):
            lowered = subject.convert(case)
            layers = sum(1 for m in baseline.modules() if hasattr(m, "scale") and hasattr(m, "zero_point"))
            result = compare(baseline, lowered, inputs, Tolerance.within(2 * max(layers, 1), ENGINES_AGREE_CAUSE))
        subject.record.lsb(result.max_lsb)
        if not result.ok and not known_deviation(engine, True, threads=1, input_max=beyond,
                                                 input_scale=_smallest_scale(reference),
                                                 # outputs only: the model's ConvTransposes stand
                                                 # for the layers that part
                                                 modules=_transposed_convs(lowered)):
            subject.fail(case, f"fbgemm and {engine} disagree beyond their overlapping contracts:\n"
                               f"{result.message()}")
