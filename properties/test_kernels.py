"""Property family 4: lowered models on the real quantized kernels (FX flow).

Each lowered layer gets exactly the quantized input its reference-decomposed layer saw and must
stay within its engine's contract (qref.engines.KERNEL_CONTRACTS: 1 LSB, onednn pinned to one
thread), on its own output qparams (a lowered op may keep its input's grid only where the
reference graph shows an op without weights).  A layer that leaves the contract is excused only
by a known deviation that explains *that* layer (qref.engines.DEVIATIONS: int16 pair saturation
from its own quantized input range (pytorch#44939), fbgemm's depthwise conv, onednn's
ConvTranspose with unequal channels and its conv whose window along a dimension is all padding,
qnnpack with a degenerate scale or an int32 bias step coarser than its output's), within the deviation's
cap and on the CPUs and torch versions where it was seen; the model's other layers, or its
merely containing a layer type, excuse nothing.
Engines must agree with the reference and with each other where their contracts overlap: each
within 1 LSB per layer of the reference, so two engines within 2 LSB per layer given the same input.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import reject
from hypothesis import strategies as st

import qref
from qref.compare import Tolerance, compare, compare_lowered
from qref.engines import Layer, engine_limit, has_vnni, known_deviation

from ._support import divergence, prop, subject  # noqa: F401 (subject: fixture)

pytestmark = [pytest.mark.qref_family("kernels"), pytest.mark.qref_flow("fx")]


def pytest_generate_tests(metafunc):  # noqa: D103 - engines this run exercises (--qref-engine)
    if "engine" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("qref_engine", None) or qref.engines()
        metafunc.parametrize("engine", [e for e in chosen if e in qref.engines()])


def _engine_runs(subject, case, engine) -> bool:
    """Whether qref's own lowering runs on ``engine``: what the engine refuses to run
    (``qref.engines.ENGINE_LIMITS``) is not the converter's; any other error is qref's, reported."""
    with qref.use_engine(engine, threads=1):
        lowered = qref.convert_fx(case.prepared())
        try:
            lowered(*case.inputs[0])
        except RuntimeError as error:
            cause = engine_limit(engine, error, lowered)
            if cause is None:
                raise
            subject.not_compared(f"{engine} cannot run this model: {cause}")
            return False
    return True


def _lower(subject, case, engine):
    if not _engine_runs(subject, case, engine):
        reject()
    with qref.use_engine(engine, threads=1):
        reference = qref.convert_to_reference_fx(case.prepared())
        lowered = subject.convert(case)
        return reference, lowered


def _layer(lowered, result, path) -> Layer:
    """The failing lowered module at ``path`` with the quantized input the reference fed it."""
    inputs = result.module_inputs.get(path, ())
    first = inputs[0] if inputs else None
    qparams = first.qparams if first is not None else None
    return Layer(dict(lowered.named_modules())[path],
                 input_high=max((i.high for i in inputs if i.high is not None), default=None),
                 input_scale=float(qparams.scale) if qparams is not None and qparams.axis is None else None,
                 input_dtype=qparams.dtype if qparams is not None else None,
                 input_zero_point=int(qparams.zero_point) if qparams is not None and qparams.axis is None else None,
                 input_shape=first.shape if first is not None else None)


def _layers_behind(lowered, result, key) -> list:
    """The lowered modules that computed point or output ``key`` from the points before it (each
    point passes the reference's integers on): the module itself, or, for a point that is no
    module (the quantize after a float ReLU the lowering fused, an output), those behind it."""
    if key in result.points and result.points[key].kind == "module":
        return [key]
    nodes = list(lowered.graph.nodes)
    if key.startswith("output["):
        leaves = torch.utils._pytree.tree_flatten(nodes[-1].args[0])[0]
        start = leaves[int(key[7:-1])] if int(key[7:-1]) < len(leaves) else None
    else:
        start = next((n for n in nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor
                      and getattr(n.args[0], "name", None) == key), None)  # fmt: skip
    found, todo, seen = [], [start] if isinstance(start, torch.fx.Node) else [], set()
    while todo:
        node = todo.pop()
        if node in seen or node.op in ("placeholder", "get_attr"):
            continue
        seen.add(node)
        if node.op == "call_module":
            found.append(node.target)
            if node.target in result.points:  # a point: the reference's integers came from here on
                continue
        if node.op == "call_function" and node.target is torch.quantize_per_tensor and node is not start:
            continue
        todo.extend(node.all_input_nodes)
    return found


def _excuses(engine, lowered, result) -> tuple[dict, list]:
    """Each failing point of a kernel comparison: key -> the deviation that explains a lowered
    layer that computed it, and the points none explains (a wrong qparam or dtype, a missing or
    extra point, or an error beyond every deviation's cap on each layer behind it)."""
    modules = dict(lowered.named_modules())
    excused, unexplained = {}, []
    for key in result.failures:
        point = result.points.get(key) or result.outputs.get(key)
        if point is None or point.mismatch or point.max_lsb is None:
            unexplained.append(key)
            continue
        layers = [p for p in _layers_behind(lowered, result, key) if p in modules]
        deviation = next((d for d in (known_deviation(engine, _layer(lowered, result, p), point.max_lsb)
                                      for p in layers) if d is not None), None)
        if deviation is None:
            unexplained.append(key)
        else:
            excused[key] = deviation
    return excused, unexplained


def _kernel_verdict(subject, engine, reference, lowered, inputs) -> tuple[dict, str | None]:
    """Every lowered layer against ``engine``'s contract: the excused layers (path -> deviation),
    and the failure message if a layer is neither within it nor excused."""
    with qref.use_engine(engine, threads=1):
        result = compare_lowered(reference, lowered, inputs, subject.tolerance(Tolerance.kernel(engine)))
    subject.record.lsb(result.max_lsb)
    if result.ok:
        return {}, None
    excused, unexplained = _excuses(engine, lowered, result)
    for path, deviation in excused.items():
        lsb = (result.points.get(path) or result.outputs[path]).max_lsb
        subject.record.note(f"{engine}: {path} {lsb} LSB, known deviation: {deviation}")
    if not unexplained:
        return excused, None
    subject.record.divergence(divergence(result))
    shown = "" if not excused else "\n  excused: " + "; ".join(
        f"{path} ({(result.points.get(path) or result.outputs[path]).max_lsb} LSB, {d.name})"
        for path, d in excused.items())
    return excused, f"lowered on {engine}, a layer leaves the kernel contract:\n{result.message()}{shown}"


@prop("fx", "ops", specs="patterns", data=st.data())  # the case is drawn for the parametrized engine
def test_lowered_within_kernel_contract(subject, engine, data):
    subject.drew(engine=engine)  # data: only the case (a replay passes it)
    case = data.draw(subject.cases(engine=engine), label="case")
    reference, lowered = _lower(subject, case, engine)
    _, failure = _kernel_verdict(subject, engine, reference, lowered, case.inputs)
    if failure:
        subject.fail(case, failure)


ENGINES_AGREE_CAUSE = ("each engine is within 1 LSB of the reference per lowered layer given the same "
                       "quantized input, so two engines fed the same input may differ by 2 LSB")


@prop("fx", "patterns", engine="fbgemm")
def test_engines_agree(subject, qref_engines, case):
    """fbgemm-prepared models (reduce_range, so 7-bit activations) lowered on fbgemm and on qnnpack
    (and onednn/x86 on a VNNI CPU): the engines whose 1-LSB contracts overlap here.  Each is
    judged against the reference layer by layer (as the kernel property), then each against
    fbgemm with every layer fed fbgemm's integers; a layer a known deviation excused against the
    reference on either engine is not held to the 2 LSB there."""
    subject.drew(qref_engines=qref_engines)  # a fixture, but its reproducer needs the list
    others = [e for e in qref_engines if e == "qnnpack" or (e in ("onednn", "x86") and has_vnni())]
    others = [e for e in others if e in qref.engines()]
    if "fbgemm" not in qref.engines() or not others:
        pytest.skip("needs fbgemm and another engine")
    if not _engine_runs(subject, case, "fbgemm"):
        reject()
    with qref.use_engine("fbgemm", threads=1):
        baseline = subject.convert(case)
        reference = qref.convert_to_reference_fx(case.prepared())
    baseline_excused, failures = _kernel_verdict(subject, "fbgemm", reference, baseline, case.inputs)
    failures = [failures] if failures else []
    compared = False
    for engine in others:
        if not _engine_runs(subject, case, engine):
            continue
        with qref.use_engine(engine, threads=1):
            lowered = subject.convert(case)
        excused, failure = _kernel_verdict(subject, engine, reference, lowered, case.inputs)
        failures += [failure] if failure else []
        with qref.use_engine(engine, threads=1):
            result = compare(baseline, lowered, case.inputs, Tolerance.within(2, ENGINES_AGREE_CAUSE), isolate=True)
        subject.record.lsb(result.max_lsb)
        compared = True
        failing = [k for k in result.failures if k not in set(baseline_excused) | set(excused)]
        if failing:
            subject.fail(case, f"fbgemm and {engine} disagree beyond their overlapping contracts "
                               f"(at {', '.join(failing[:8])}):\n{result.message()}")
    if failures:  # the engines agree, but not with the reference
        subject.fail(case, "\n".join(failures))
    if not compared:
        subject.not_compared("no other engine runs this model")
