"""What a pass covered: combinations read from compared examples, the run's summary, and
``--coverage-at-least`` failing a run that never compared a required value."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qref import coverage
from qref.coverage import Combination
from qref.strategies.models import Act, Conv, Linear, ModelSpec, Residual, layer_kinds
from qref.strategies.setups import QuantSetup
from qref.strategies.tensors import QParamsCase
from qref.tally import Tally, compared, not_compared

QREF = str(Path(sys.executable).with_name("qref"))
ROOT = Path(__file__).resolve().parents[1]


def _case(layers, input_shape=(1, 2, 4, 4), **setup):
    return SimpleNamespace(spec=ModelSpec(input_shape=input_shape, layers=layers),
                           setup=QuantSetup(**{"flow": "pt2e", **setup}))


def test_a_model_case_covers_each_of_its_ops_with_its_setup():
    case = _case((Conv(2, 2), Residual((Act("relu"),))), qat=True, observer="minmax", per_channel=False)
    got = coverage.of_example({"case": case, "fold_quantize": True})
    assert got == [
        Combination("add", "affine", "uint8", "fake-quant (minmax)", "-", "pt2e QAT", "qref"),
        Combination("conv2d", "affine", "uint8", "fake-quant (minmax)", "per-tensor", "pt2e QAT", "qref"),
        Combination("relu", "affine", "uint8", "fake-quant (minmax)", "-", "pt2e QAT", "qref"),
    ]


def test_an_fx_case_names_its_engine_and_reduced_range():
    case = _case((Linear(4, 3),), input_shape=(2, 4), flow="fx", kind="default", engine="fbgemm",
                 reduce_range=True)
    (got,) = coverage.of_example({"case": case})
    assert got.quantizer == "default (fbgemm)" and got.scheme == "affine reduce_range"
    assert got.stage == "fx PTQ" and got.weights == "per-channel"


def test_a_qref_case_names_its_ranges_weight_axis_dynamic_linears_and_int16_layers():
    case = _case((Linear(4, 3), Act("relu"), Linear(3, 2)), input_shape=(2, 4), act_dtype="int8", symmetric=True,
                 narrow_range=True, reduce_range=True, weight_qrange=(-64, 63), weight_axis="input", dynamic=True,
                 int16_layers=(1,), observer="minmax")
    linear, relu = coverage.of_example({"case": case})
    assert linear == Combination("linear", "dynamic symmetric narrow reduce_range", "int8+int16", "minmax",
                                 "per-channel input-axis 7-bit", "pt2e PTQ", "qref")
    assert relu.scheme == "symmetric narrow reduce_range" and relu.weights == "-"
    universe = coverage.known("pt2e")
    gaps = coverage.missing(Counter({linear: 1, relu: 1}), universe)
    for axis, covered in [("scheme", ["symmetric", "narrow", "reduce_range", "dynamic"]), ("dtype", ["int8+int16"]),
                          ("weights", ["per-channel", "input-axis", "7-bit"])]:
        assert set(covered) <= set(universe[axis]) and not set(covered) & set(gaps[axis]), axis
    assert {"affine", "per-tensor", "full-range", "uint8+int16"} <= {v for g in gaps.values() for v in g}
    assert coverage.not_covered(["narrow", "7-bit", "full-range"], Counter({linear: 1})) == ["full-range"]
    assert "i8+i16" in next(line for line in coverage.matrix_lines(Counter({linear: 1}), universe)
                            if line.strip().startswith("linear"))
    assert "narrow" not in coverage.known("fx")["scheme"] and coverage.known("fx")["dtype"] == ("uint8",)


def test_a_primitive_case_covers_its_dtype_and_axis():
    q = QParamsCase(torch.ones(3), torch.zeros(3, dtype=torch.int64), 1, -128, 127, torch.int8)
    (got,) = coverage.of_example({"q": q, "data": object()})
    assert got == Combination("q/dq primitive", "-", "int8", "-", "per-channel (axis 1)", "primitive", "-")


def test_only_compared_examples_add_coverage():
    tally = Tally()
    case = _case((Conv(2, 2),))

    def body(case, compare):
        (compared if compare else lambda: not_compared("float output"))()

    counted = tally.counting(body)
    counted(case=case, compare=False)
    assert tally.coverage == Counter()
    counted(case=case, compare=True)
    counted(case=case, compare=True)
    (combination,) = tally.coverage
    assert combination.op == "conv2d" and tally.coverage[combination] == 2
    assert tally.to_json()["coverage"] == [[*combination, 2]]


def _x86_reference(model, x):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    import qref
    from qref.quantizers import x86_ptq

    prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(), x86_ptq())
    prepared(x)
    return qref.convert_pt2e(prepared)


def test_an_op_the_quantizer_left_float_is_not_covered():
    """X86InductorQuantizer quantizes the conv2d, not the transposed conv after it nor the tanh
    after that (float in, float out): an example comparing that graph covered conv2d only."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.ConvTranspose2d(2, 2, 1), torch.nn.Tanh())
    reference = _x86_reference(model, torch.randn(1, 2, 4, 4))
    ops = frozenset({"conv2d", "conv_transpose", "tanh"})
    assert coverage.compared_ops(ops, reference) == {"conv2d"}
    tally = Tally()

    def body(case):
        from qref import tally as current

        current.compared_graph(case, reference)
        compared()

    tally.counting(body)(case=_case((Conv(2, 2), Conv(2, 2, transpose=True), Act("tanh"))))
    assert {c.op for c in tally.coverage} == {"conv2d"}


def test_a_case_drawn_in_the_property_body_is_covered_through_its_reference():
    """A property that draws its case from st.data() has no case among its arguments: the case
    its reference conversion was made of is read instead, once."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.Tanh())
    reference = _x86_reference(model, torch.randn(1, 2, 4, 4))
    case = _case((Conv(2, 2), Act("tanh")))
    tally = Tally()

    def drawn_in_body(data):  # data stands for st.data(): the case is drawn from it, not passed
        from qref import tally as current

        current.compared_graph(case, reference)
        compared()

    def drawn_as_argument(case):
        from qref import tally as current

        current.compared_graph(case, reference)
        compared()

    tally.counting(drawn_in_body)(data=object())
    assert {c.op: n for c, n in tally.coverage.items()} == {"conv2d": 1}
    tally.counting(drawn_as_argument)(case=case)  # counted once, not once more for compared_graph
    assert {c.op: n for c, n in tally.coverage.items()} == {"conv2d": 2}


def test_an_op_folded_away_or_fed_by_a_dequantize_stays_covered():
    """A BatchNorm folded into its conv has no node left (it was compared through the conv); a
    float op fed by a dequantize sits on a compared quantize point."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Tanh())
    reference = _x86_reference(model, torch.randn(1, 2, 4, 4))
    assert "bn" not in coverage.graph_families(reference)
    assert coverage.compared_ops(frozenset({"conv2d", "bn"}), reference) == {"conv2d", "bn"}


def test_a_failing_example_counts_as_compared_coverage():
    tally = Tally()

    def body(case):
        raise AssertionError("diverges")

    with pytest.raises(AssertionError):
        tally.counting(body)(case=_case((Conv(2, 2),)))
    assert [c.op for c in tally.coverage] == ["conv2d"]


def test_the_universe_lists_every_layer_kinds_ops():
    universe = coverage.known()
    for kind in layer_kinds():
        assert set(kind.ops_drawn()) <= set(universe["op"]), kind
    assert {"conv2d", "conv_transpose", "linear", "matmul", "relu", "sigmoid"} <= set(universe["op"])
    assert coverage.known("fx")["stage"] == ("fx PTQ", "fx QAT", "primitive")


def test_missing_and_matrix_name_what_was_never_compared():
    counts = Counter({Combination("conv2d", "affine", "uint8", "minmax", "per-tensor", "pt2e PTQ", "qref"): 3})
    universe = coverage.known("pt2e")
    gaps = coverage.missing(counts, universe)
    assert "conv2d" not in gaps["op"] and "linear" in gaps["op"]
    assert gaps["weights"] == ["per-channel", "input-axis", "full-range", "7-bit"] and "pt2e QAT" in gaps["stage"]
    lines = coverage.matrix_lines(counts, universe)
    (conv_row,) = [line for line in lines if line.strip().startswith("conv2d")]
    assert "u8" in conv_row
    assert not [line for line in lines if line.strip().startswith("linear ")]  # no row: never compared
    assert lines[-1].startswith("  never compared:") and "linear" in lines[-1]
    assert coverage.not_covered(["conv2d", "linear", "minmax"], counts) == ["linear"]


def _check(tmp_path, *args):
    report = tmp_path / "r.json"
    done = subprocess.run([QREF, "check", "qref-pt2e", "--profile", "quick", "--seed", "0", "--report", str(report),
                           *args, "--", "-k", "test_quantize_matches_reference"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return done, json.loads(report.read_text())


def test_coverage_at_least_fails_a_run_that_never_compared_a_required_value(tmp_path):
    done, report = _check(tmp_path, "--coverage-at-least", "q/dq primitive", "conv2d")
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["coverage"]["required_missing"] == ["conv2d"]
    assert "required coverage never compared: conv2d" in done.stdout
    assert report["coverage"]["by_axis"]["op"]["q/dq primitive"] > 0


def test_coverage_at_least_passes_when_the_values_were_compared(tmp_path):
    done, report = _check(tmp_path, "--coverage-at-least", "q/dq primitive")
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["coverage"]["required_missing"] == []
    assert report["schema"] == "qref-report/3"
    assert "coverage (activation dtypes compared per op and stage):" in done.stdout


def test_coverage_at_least_refuses_an_unknown_value(tmp_path):
    done = subprocess.run([QREF, "check", "qref-pt2e", "--coverage-at-least", "conv9d"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "unknown value(s) 'conv9d'; known: " in done.stderr and "conv2d" in done.stderr
