"""Property family 4: lowered models on the real quantized kernels (FX flow).

Each lowered layer gets exactly the quantized input its reference-decomposed layer saw and must
stay within its engine's contract (qref.engines.KERNEL_CONTRACTS: 1 LSB, onednn pinned to one
thread).  Where a kernel is known to leave its contract — fbgemm/x86 int16 saturation without
``reduce_range`` or on inputs beyond the calibrated range (pytorch#44939), onednn without VNNI —
the example is recorded under that named deviation instead of passing or failing blindly.
Engines must agree with each other where their contracts overlap: 1 LSB each per layer, so
2 LSB per layer between two engines.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import qref
from qref.compare import Tolerance, compare_lowered, quantize_points
from qref.engines import known_deviation
from qref.strategies import cases

from ._support import budget, subject  # noqa: F401 (subject: fixture)

pytestmark = [pytest.mark.qref_family("kernels"), pytest.mark.qref_flow("fx")]


def pytest_generate_tests(metafunc):  # noqa: D103 - engines this run exercises (--qref-engine)
    if "engine" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("qref_engine", None) or qref.engines()
        metafunc.parametrize("engine", [e for e in chosen if e in qref.engines()])


def _lower(subject, case, engine):
    with qref.use_engine(engine, threads=1):
        reference = qref.convert_to_reference_fx(case.prepared())
        lowered = subject.convert(case)
        return reference, lowered


def _largest_uint8(reference, inputs) -> int | None:
    """The largest quint8 activation the reference fed a kernel (fbgemm saturates above 127)."""
    values = [int(t.max()) for ts in quantize_points(reference, inputs).values() for t in ts
              if t.dtype == torch.uint8 and t.numel()]
    return max(values, default=None)


def _smallest_scale(reference) -> float | None:
    """The smallest activation scale in the reference (a zero-range calibration makes it eps)."""
    scales = [float(getattr(reference, n.args[1].target)) for n in reference.graph.nodes
              if n.target is torch.quantize_per_tensor and isinstance(n.args[1], torch.fx.Node)]
    return min(scales, default=None)


@pytest.mark.qref_tier("ops")
@budget("ops")
@given(data=st.data())
def test_lowered_within_kernel_contract(subject, engine, data):
    case = data.draw(cases("fx", tier="patterns", engine=engine), label="case")
    reference, lowered = _lower(subject, case, engine)
    with qref.use_engine(engine, threads=1):
        result = compare_lowered(reference, lowered, case.inputs, Tolerance.kernel(engine))
    subject.record.lsb(result.max_lsb)
    if result.ok:
        return
    deviation = known_deviation(engine, case.setup.reduce_range, threads=1,
                                input_max=_largest_uint8(reference, case.inputs),
                                input_scale=_smallest_scale(reference))
    if deviation:
        event(f"known kernel deviation on {engine}")
        subject.record.note(f"{engine}: {result.max_lsb} LSB, known deviation: {deviation}")
        return
    subject.fail(case, f"lowered on {engine}, a layer leaves the kernel contract:\n{result.message()}")
