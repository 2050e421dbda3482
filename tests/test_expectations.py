"""The default expectations are narrow: each names its failure message and the upstream versions."""

from __future__ import annotations

from importlib.resources import files

import pytest

from qref.expectations import ExpectationsError, load

DEFAULTS = load(files("qref") / "default_expectations.toml")


@pytest.mark.parametrize("entry", DEFAULTS, ids=[e.test for e in DEFAULTS])
def test_default_entry_names_its_failure_and_versions(entry):
    assert entry.kind in ("xfail", "known-defect")
    assert entry.failure, f"{entry.test}: a default expectation names the failure message it expects"
    assert entry.torch or entry.torchao, f"{entry.test}: a default expectation names the versions it applies to"
    assert len(entry.reason) > 40


def test_bn_eps_entry_expects_only_the_reset_to_defaults():
    (entry,) = [e for e in DEFAULTS if e.test.startswith("qat_prepare_keeps_bn_eps")]
    reset = ("PRECONDITION (prepare stage, not the converter): the float model's BatchNorm has eps=0.001, "
             "momentum=0.5; the prepared graph uses (momentum, eps)=[(0.1, 1e-05), (0.1, 1e-05)]")
    assert entry.expects(reset)
    assert not entry.expects(reset.replace("(0.1, 1e-05)]", "(0.5, 1e-05)]"))  # another change
    assert not entry.expects("no batch norm left in the QAT-prepared graph")
    assert entry.torchao == "==0.18.*"
    assert entry.inactive_because("2.13.0", [], "qref-pt2e", "0.19.0") is not None
    assert entry.inactive_because("2.13.0", [], "qref-pt2e", "0.18.0") is None


def test_torch_fx_weight_reobservation_entry_expects_only_weight_fake_quant_statistics():
    (entry,) = [e for e in DEFAULTS if e.test.startswith("fx_prepared_model_not_silently_changed")]
    head = "the converter mutated the prepared model it was given (its graph was rewritten in place): "
    assert entry.expects(head + "observer statistics changed: conv0.weight_fake_quant.scale, "
                                "conv0.weight_fake_quant.activation_post_process.min_val\n\nmodel: ...")
    assert not entry.expects(head + "parameters and buffers changed: conv0.weight; observer statistics "
                                    "changed: conv0.weight_fake_quant.scale\n\nmodel: ...")
    assert not entry.expects(head + "observer statistics changed: activation_post_process_0.min_val\n\nmodel")
    assert entry.converter == "torch-fx"


def test_unknown_and_conflicting_keys_are_refused(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('[[expect]]\ntest = "x"\nreason = "r"\nnot_exercised = true\nmax_lsb = 1\n')
    with pytest.raises(ExpectationsError, match="cannot be combined"):
        load(path)
    path.write_text('[[expect]]\ntest = "x"\nreason = "r"\ntorchao = "banana"\n')
    with pytest.raises(ExpectationsError, match="'torchao'"):
        load(path)
    path.write_text('[[expect]]\ntest = "x"\nreason = "r"\nnot_exercised = "yes"\n')
    with pytest.raises(ExpectationsError, match="true or false"):
        load(path)
    path.write_text('[[expect]]\ntest = "x"\nreason = "no weights here"\nnot_exercised = true\n')
    assert load(path)[0].kind == "not-exercised"


def test_torchao_counter_entry_expects_only_batch_norm_counters():
    (entry,) = [e for e in DEFAULTS if "qat_fold_leaves_prepared_model_unchanged" in e.test]
    head = "the converter mutated the prepared model it was given (its graph was rewritten in place): "
    assert entry.expects(head + "parameters and buffers changed: bn1.num_batches_tracked\n\nmodel: ...")
    assert not entry.expects(head + "parameters and buffers changed: bn1.num_batches_tracked, conv0.weight\n\nm")
    assert not entry.expects(head + "parameters and buffers changed: bn1.num_batches_tracked; observer statistics "
                                    "changed: x\n\nm")
    assert entry.converter == "torchao-pt2e" and entry.torchao == "==0.18.*"
    assert entry.matches("properties/test_contract.py::test_prepared_model_not_silently_changed")


def _run_single_op(tmp_path, expectations: str | None):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "pytest", str(root / "properties" / "test_equivalence.py"), "-q",
            "-p", "no:cacheprovider", "-k", "test_single_op_matches_reference", "--qref-seed", "0",
            "--qref-converter", "tests.test_expectations:output_dequantize_two_steps_off", "--qref-report", str(tmp_path / "r.json")]
    if expectations is not None:
        (tmp_path / "e.toml").write_text(expectations)
        args += ["--qref-expectations", str(tmp_path / "e.toml")]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    (test,) = json.loads((tmp_path / "r.json").read_text())["tests"]
    return done.returncode, test


def output_dequantize_two_steps_off(model, use_reference_representation=False, fold_quantize=True):
    """qref's pt2e conversion, except that a dequantize feeding the graph's output reads
    zero_point - 2: every integer point is exact, a dequantized output is exactly 2 LSB off."""
    from qref.pt2e.ops import DEQUANTIZE, is_call, schema_arguments
    from tests.mutants._graph import convert_and_edit, set_args

    def edit(gm):
        (output,) = [n for n in gm.graph.nodes if n.op == "output"]
        for node in output.all_input_nodes:
            if is_call(node, DEQUANTIZE):
                set_args(node, zero_point=schema_arguments(node)["zero_point"] - 2)

    return convert_and_edit(model, edit, use_reference_representation, fold_quantize)


def test_max_lsb_is_the_tolerance_the_property_compares_with(tmp_path):
    """An expectations entry's max_lsb reaches the comparison: a converter whose dequantized
    outputs are exactly 2 LSB off (and whose integer points are exact, so no example is further
    off) fails exactly, passes with max_lsb = 2, and fails max_lsb = 1 naming the entry."""
    status, test = _run_single_op(tmp_path, None)
    assert status == 1 and test["status"] == "failed", test.get("message")
    assert test["max_lsb"] == 2, test.get("message")
    entry = '[[expect]]\ntest = "single_op_matches_reference"\nreason = "my kernels round differently"\nmax_lsb = 2\n'
    status, test = _run_single_op(tmp_path, entry)
    assert status == 0 and test["status"] == "passed", test.get("message")
    status, test = _run_single_op(tmp_path, entry.replace("max_lsb = 2", "max_lsb = 1"))
    assert status == 1 and "expectations entry: my kernels round differently" in test["message"], test.get("message")
