"""The qref pytest plugin, on a tiny fake suite (the real properties are not needed here).

Most runs are in-process (``pytester.runpytest``); inertness and xdist need real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

# A converter module the fake suite names as fakeconv:<attr>.
FAKECONV = """
import torch

def good(model, use_reference_representation=False, fold_quantize=True):
    return torch.fx.symbolic_trace(torch.nn.Identity())

def only_fold(model, fold_quantize=True):
    return torch.fx.symbolic_trace(torch.nn.Identity())

def fx_good(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
            backend_config=None):
    return torch.nn.Identity()
"""

# Families, tiers and flows as the real suite marks them.  test_ops_bad fails; a fixture-free
# primitives test records LSB and a note.
SUITE = '''
import pytest
from qref.tally import compared

@pytest.mark.qref_family("equivalence")
@pytest.mark.qref_tier("models")
@pytest.mark.qref_flow("pt2e")
def test_models_pt2e(qref_converter):
    compared()

@pytest.mark.qref_family("primitives")
@pytest.mark.qref_tier("primitives")
def test_prim(qref_record):
    qref_record.lsb(0.5, where="x")
    qref_record.lsb(0.25)
    qref_record.note("checked 3 layouts")

@pytest.mark.qref_family("equivalence")
@pytest.mark.qref_tier("ops")
@pytest.mark.qref_flow("pt2e")
@pytest.mark.parametrize("n", [0, 1, 2])
def test_ops(qref_converter, qref_record, n):
    qref_record.lsb(n)

@pytest.mark.qref_family("kernels")
@pytest.mark.qref_tier("ops")
@pytest.mark.qref_flow("fx")
def test_fx_ops(qref_converter):
    compared()
    assert qref_converter.flow == "fx"

@pytest.mark.qref_family("folding")
@pytest.mark.qref_tier("patterns")
@pytest.mark.qref_flow("fx")
def test_fx_patterns(qref_converter):
    compared()
'''

BAD_OPS = '''
import pytest

@pytest.mark.qref_family("equivalence")
@pytest.mark.qref_tier("ops")
@pytest.mark.qref_flow("pt2e")
def test_ops_bad(qref_converter):
    assert False, "converter diverges"
'''


@pytest.fixture(scope="module", autouse=True)
def _heavy_modules_preloaded():
    # pytester's in-process runs forget the modules first imported during the run; importing the
    # heavy ones here spares every run a fresh torch import.
    import hypothesis  # noqa: F401
    import torch  # noqa: F401

    import warnings

    import qref
    import qref.fx  # noqa: F401
    import qref.pt2e  # noqa: F401

    with warnings.catch_warnings():  # the engine probe's deprecated quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        qref.engines()


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # table rows on one line each


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(fakeconv=FAKECONV, test_props=SUITE)
    return pytester


def _outcomes(result):
    return result.parseoutcomes()


def _report(pytester, name="report.json"):
    return json.loads((pytester.path / name).read_text())


def _by_property(document):
    """Rows by property name, each with its tests' records (the report lists them apart)."""
    tests = {t["nodeid"]: t for t in document["tests"]}
    return {p["property"]: dict(p, tests=[tests[n] for n in p["tests"]]) for p in document["properties"]}


# --- options, inertness --------------------------------------------------------------------------


def test_help_lists_every_option_in_one_qref_group(pytester):
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    group = out[out.index("qref: check a quantization converter") :]
    for flag in (
        "--qref-converter", "--qref-flow", "--qref-profile", "--qref-engine", "--qref-report",
        "--qref-artifacts", "--qref-expectations", "--qref-expected-as-skip", "--qref-seed",
        "--qref-timeout",
    ):  # fmt: skip
        assert flag in group, flag


def test_markers_are_registered(pytester):
    out = pytester.runpytest("--markers").stdout.str()
    for marker in ("qref_family(name)", "qref_tier(name)", "qref_flow(name)", "qref_max_lsb(n)"):
        assert marker in out


@pytest.mark.parametrize("failure, expected", [("known defect", True), ("other defect", False)])
def test_failure_condition_holds_with_the_plugin_inert(pytester, failure, expected):
    # the plain-pytest path of properties/conftest.py marks its default expectations this way
    pytester.makeconftest(f"""
        from qref.expectations import Expectation
        from qref.plugin import expect_failure

        def pytest_collection_modifyitems(items):
            for item in items:
                expect_failure(item, Expectation(0, "*", "pinned", failure="{failure}"))
        """)
    pytester.makepyfile(test_x="def test_x():\n    assert False, 'a known defect'\n")
    result = pytester.runpytest()
    if expected:
        result.assert_outcomes(xfailed=1)
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*expected to fail with 'other defect' (pinned), but it failed otherwise*"])


def test_plain_pytest_run_is_unaffected_and_imports_no_torch(pytester):
    # An unrelated project, in a fresh interpreter: the plugin is loaded (entry point) and idle.
    pytester.makepyfile(
        test_unrelated="""
        import sys

        def test_nothing_heavy_was_imported(request):
            assert "qref.plugin" in sys.modules
            assert "torch" not in sys.modules
            assert "hypothesis" not in sys.modules
            assert request.config.pluginmanager.get_plugin("qref-controller") is None

        def test_user_properties_untouched(record_property):
            record_property("k", [1, 2])
        """
    )
    # not -v: with it, the Hypothesis plugin itself imports hypothesis for its header line
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "qref:" not in out
    assert "qref conformance" not in out


def test_unknown_converter_is_a_one_line_usage_error(suite):
    result = suite.runpytest("--qref-converter", "no_such_converter")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "no_such_converter" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: qref: unknown converter")


def test_engine_that_does_not_run_is_a_usage_error(suite):
    result = suite.runpytest("--qref-flow", "pt2e", "--qref-engine", "no-such-engine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no-such-engine do not run here" in result.stderr.str()


# --- header, flow selection, tiers, table ----------------------------------------------------------


def test_header_names_converter_flow_versions_engines_profile_seed(suite):
    result = suite.runpytest("--qref-converter", "fakeconv:only_fold", "--qref-seed", "7")
    out = result.stdout.str()
    import torch

    assert "qref: converter fakeconv:only_fold -> fakeconv.only_fold (flow pt2e)" in out
    assert "does not accept use_reference_representation" in out
    assert f"qref: torch {torch.__version__}, torchao " in out
    assert "quantized engines: " in out
    assert "qref: Hypothesis profile " in out and "seed 7" in out


def test_other_flow_is_deselected_and_fixture_gives_the_selected_converter(suite):
    suite.makepyfile(
        test_which="""
        import pytest

        @pytest.mark.qref_flow("pt2e")
        def test_selected(qref_converter):
            assert qref_converter.target == "fakeconv:good"
            assert qref_converter.accepted == {"use_reference_representation", "fold_quantize"}
        """
    )
    result = suite.runpytest("--qref-converter", "fakeconv:good")
    result.assert_outcomes(passed=6, deselected=2)  # test_fx_* deselected


def test_flow_option_alone_uses_the_default_converter_of_that_flow(suite):
    result = suite.runpytest("--qref-flow", "fx", "-v")
    result.assert_outcomes(passed=3, deselected=4)
    assert "qref: converter from the qref_converter fixture (flow fx)" in result.stdout.str()


def test_items_run_in_tier_order(suite):
    result = suite.runpytest("--qref-flow", "pt2e", "-v")
    ran = [line.split(" ")[0].split("::")[1] for line in result.stdout.lines if " PASSED" in line]
    assert ran == ["test_prim", "test_ops[0]", "test_ops[1]", "test_ops[2]", "test_models_pt2e"]


def test_lower_tier_failure_skips_higher_tiers_of_the_same_flow(suite):
    suite.makepyfile(test_bad=BAD_OPS)
    result = suite.runpytest("--qref-report", "report.json", "-v")
    # no flow selected: both flows run; the pt2e ops failure gates pt2e models only
    result.assert_outcomes(passed=6, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*::test_models_pt2e SKIPPED (not run because test_bad.py::test_ops_bad failed (tier ops))*"]
    )
    rows = _by_property(_report(suite))
    assert rows["models_pt2e"]["status"] == "not run"
    assert rows["models_pt2e"]["reason"] == "test_bad.py::test_ops_bad failed (tier ops)"
    assert rows["fx_patterns"]["status"] == "passed"


def test_lower_tier_failure_gates_the_other_xdist_workers(pytester):
    # --dist loadfile: one file per worker; the ops test of the second waits for the first's failure
    pytester.makepyfile(fakeconv=FAKECONV, test_low="""
        import pytest

        @pytest.mark.qref_tier("ops")
        def test_ops_bad(qref_converter):
            assert False, "converter diverges"
        """, test_high="""
        import pathlib, time
        import pytest

        @pytest.mark.qref_tier("ops")
        def test_ops_waits(qref_converter, request):
            shared = pathlib.Path(request.config.workerinput["qref_tier_failures"])
            deadline = time.monotonic() + 120
            while not list(shared.glob("*.json")) and time.monotonic() < deadline:
                time.sleep(0.05)

        @pytest.mark.qref_tier("models")
        def test_models(qref_converter):
            pass
        """)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "-n", "2", "--dist", "loadfile", "-v")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    worker = {name: next(line.split("]")[0] for line in result.stdout.lines
                         if line.startswith("[gw") and line.rstrip().endswith(f"::{name}"))
              for name in ("test_ops_bad", "test_models")}
    assert worker["test_ops_bad"] != worker["test_models"], f"one worker ran both files: {worker}"
    result.stdout.fnmatch_lines(["*SKIPPED*test_models*", "*models*not run: ops_bad failed (tier ops)*"])


def test_flow_independent_primitive_failure_gates_both_flows(pytester):
    pytester.makepyfile(
        test_gate="""
        import pytest

        @pytest.mark.qref_tier("primitives")
        def test_prim_bad():
            assert False

        @pytest.mark.qref_tier("ops")
        @pytest.mark.qref_flow("fx")
        def test_fx_op():
            pass

        @pytest.mark.qref_tier("ops")
        @pytest.mark.qref_flow("pt2e")
        def test_pt2e_op():
            pass

        @pytest.mark.qref_tier("primitives")
        def test_prim_other():
            pass
        """
    )
    result = pytester.runpytest("--qref-timeout", "5")
    result.assert_outcomes(failed=1, passed=1, skipped=2)


def test_gating_is_off_without_qref_options(pytester):
    pytester.makepyfile(test_bad=BAD_OPS.replace("qref_converter", ""), test_props=SUITE)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, passed=7)  # qref_converter: the flow's default converter
    assert "qref conformance" not in result.stdout.str()


def test_conformance_table_in_terminal_summary(suite):
    suite.makepyfile(test_bad=BAD_OPS)
    result = suite.runpytest("--qref-converter", "fakeconv:good")
    out = result.stdout.str()
    table = out[out.index("qref conformance: fakeconv:good (pt2e)") :]
    result.stdout.fnmatch_lines(
        [
            "*family*property*worst LSB*status*",
            "*primitives*prim*0.5*passed*",
            "*equivalence*ops*2*passed (3)*",
            "*ops_bad*failed*",
            "*models_pt2e*not run: ops_bad failed (tier ops)*",
        ]
    )
    assert "fx_ops" not in table  # deselected, not a row


# --- JSON report ------------------------------------------------------------------------------------


def _check_report(document, *, xdist):
    assert document["schema"] == "qref-report/3"
    assert document["converter"]["target"] == "fakeconv:only_fold"
    assert document["converter"]["not_exercised"] == ["use_reference_representation"]
    env = document["environment"]
    assert set(env) >= {"torch", "torchao", "qref", "engines", "profile", "seed"}
    assert document["exit_status"] == 1 and document["all_hold"] is False
    assert document["counts"]["passed"] == 4
    assert document["counts"]["failed"] == 1
    assert document["counts"]["not run"] == 1
    statuses = {t["nodeid"]: t["status"] for t in document["tests"]}
    assert statuses["test_bad.py::test_ops_bad"] == "failed" and len(statuses) == 6
    rows = _by_property(document)
    assert rows["prim"]["max_lsb"] == 0.5
    assert rows["prim"]["tests"][0]["notes"] == ["checked 3 layouts"]
    assert rows["prim"]["tests"][0]["max_lsb_where"] == "x"
    assert rows["ops"]["counts"] == {"passed": 3} and rows["ops"]["max_lsb"] == 2
    assert rows["ops_bad"]["status"] == "failed"
    assert "converter diverges" in rows["ops_bad"]["tests"][0]["reason"]
    assert rows["ops"]["family"] == "equivalence"
    assert [t["nodeid"] for t in rows["ops"]["tests"]] == [f"test_props.py::test_ops[{n}]" for n in range(3)]
    if not xdist:
        assert rows["models_pt2e"]["status"] == "not run"


def test_json_report(suite):
    suite.makepyfile(test_bad=BAD_OPS)
    suite.runpytest("--qref-converter", "fakeconv:only_fold", "--qref-report", "report.json")
    _check_report(_report(suite), xdist=False)


def test_json_report_under_xdist(suite):
    # Gating is per process, so which worker ran what decides "not run": make it deterministic.
    suite.makepyfile(test_bad=BAD_OPS)
    result = suite.runpytest(
        "--qref-converter", "fakeconv:only_fold", "--qref-report", "report.json", "-n", "2",
        "--dist", "loadgroup", "-p", "no:randomly",
    )  # fmt: skip
    assert result.ret == 1
    document = _report(suite)
    assert sum(document["counts"].values()) == 6
    models = _by_property(document)["models_pt2e"]["status"]
    assert models in ("passed", "not run")
    if models == "passed":  # ran on the other worker: fix the counts for the shared checks
        document["counts"]["passed"] -= 1
        document["counts"]["not run"] += 1
    _check_report(document, xdist=True)


# --- expectations -----------------------------------------------------------------------------------

EXPECTATIONS = """
[[expect]]
test = "ops_bad"
reason = "known divergence, upstream issue 123"
converter = "fakeconv:*"

[[expect]]
test = "test_props.py::test_ops[[]2]"
reason = "rounding differs on this kernel"
max_lsb = 3

[[expect]]
test = "re:^test_props\\\\.py::test_nothing_like_this"
reason = "stale entry"

[[expect]]
test = "prim"
reason = "only with an old torch"
torch = "<2.0"

[[expect]]
test = "prim"
reason = "only for another converter"
converter = "torchao-pt2e"
"""


def test_expectations_xfail_tolerance_unmatched_inactive(suite):
    suite.makepyfile(
        test_bad=BAD_OPS,
        test_tol="""
        import pytest

        @pytest.mark.qref_tier("primitives")
        def test_ops_tolerance(qref_tolerance_override, request):
            from qref.expectations import qref_tolerance_override as override
            assert qref_tolerance_override is None
            assert override(request) is None
        """,
    )
    (suite.path / "expect.toml").write_text(EXPECTATIONS)
    suite.makeconftest(
        """
        import pytest

        @pytest.fixture(autouse=True)
        def _tolerance(request, qref_tolerance_override):
            if request.node.name == "test_ops[2]":
                assert qref_tolerance_override == 3
        """
    )
    result = suite.runpytest(
        "--qref-converter", "fakeconv:good", "--qref-expectations", "expect.toml",
        "--qref-report", "report.json",
    )  # fmt: skip
    assert result.ret == 0  # the only failure is expected
    result.assert_outcomes(passed=6, xfailed=1, deselected=2)
    result.stdout.fnmatch_lines(
        [
            "*ops_bad*expected failure: known divergence, upstream issue 123*",
            "*expectation matched no test: test = 're:^test_props*' (stale entry)*",
        ]
    )
    document = _report(suite)
    assert document["all_hold"] is True
    rows = _by_property(document)
    assert rows["ops_bad"]["status"] == "xfailed"
    assert rows["ops_bad"]["tests"][0]["expectation"] == 0
    exp = document["expectations"]
    assert [e["test"] for e in exp["unmatched"]] == ["re:^test_props\\.py::test_nothing_like_this"]
    entries = exp["entries"]
    assert entries[0]["matched"] is True and entries[1]["kind"] == "tolerance"
    assert entries[3]["applies"] is False and "is not <2.0" in entries[3]["inactive_because"]
    assert entries[0]["converter"] == "fakeconv:*" and entries[0]["matched"] is True
    assert entries[4]["applies"] is False
    assert "(fakeconv:good) is not torchao-pt2e" in entries[4]["inactive_because"]


def test_expected_failures_as_skips(suite):
    suite.makepyfile(test_bad=BAD_OPS)
    (suite.path / "expect.toml").write_text(EXPECTATIONS)
    result = suite.runpytest(
        "--qref-converter", "fakeconv:good", "--qref-flow", "pt2e", "--qref-expectations", "expect.toml",
        "--qref-expected-as-skip", "-rs",
    )  # fmt: skip
    assert result.ret == 0
    result.assert_outcomes(passed=5, skipped=1, deselected=2)
    result.stdout.fnmatch_lines(["*expected failure: known divergence*"])


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[[expect]]\ntest = "x"\n', "'reason' is mandatory"),
        ('[[expect]]\ntest = "x"\nreason = "  "\n', "'reason' is mandatory"),
        ('[[expect]]\nreason = "r"\n', "'test'"),
        ('[[expect]]\ntest = "x"\nreason = "r"\nreasn = "typo"\n', "unknown key(s) ['reasn']"),
        ('[[expect]]\ntest = "x"\nreason = "r"\ntorch = "two"\n', "not a version specifier"),
        ('[[expect]]\ntest = "x"\nreason = "r"\nconverter = 3\n', "'converter' must be a converter name"),
        ('[[expect]]\ntest = "x"\nreason = "r"\nfailure = "(("\n', "'failure' is not a valid regex"),
        ("[[expect]\n", "not valid TOML"),
    ],
)
def test_bad_expectations_file_is_a_usage_error(suite, toml, message):
    (suite.path / "expect.toml").write_text(toml)
    result = suite.runpytest("--qref-expectations", "expect.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_engine_condition(suite):
    suite.makepyfile(test_bad=BAD_OPS)
    (suite.path / "expect.toml").write_text(
        '[[expect]]\ntest = "ops_bad"\nreason = "fbgemm only"\nengine = "fbgemm"\n'
    )
    import qref

    other = next(e for e in qref.engines() if e != "fbgemm")
    result = suite.runpytest("--qref-flow", "pt2e", "--qref-expectations", "expect.toml", "--qref-engine", other)
    result.assert_outcomes(failed=1, passed=4, skipped=1, deselected=2)  # entry inactive: a real failure
    if "fbgemm" in qref.engines():
        result = suite.runpytest("--qref-flow", "pt2e", "--qref-expectations", "expect.toml")
        result.assert_outcomes(xfailed=1, passed=5, deselected=2)


# --- artifacts, records under xdist ------------------------------------------------------------------

REPRO_TESTS = '''
import pytest, torch

SCRIPT = """
import pathlib, torch
inputs = torch.load(pathlib.Path(__file__).with_name("inputs.pt"), weights_only=True)
diff = (inputs["got"] - inputs["want"]).abs().max().item()
print(f"max divergence {diff}")
raise SystemExit(f"diverges by {diff}")
"""

@pytest.mark.qref_tier("ops")
@pytest.mark.qref_flow("pt2e")
@pytest.mark.parametrize("k", ["a/b", "c d"])
def test_diverges(qref_record, k):
    got, want = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 5.0])
    qref_record.reproducer(SCRIPT, {"got": torch.zeros(2), "want": torch.zeros(2)})  # superseded
    qref_record.reproducer(SCRIPT, {"got": got, "want": want})
    assert torch.equal(got, want)

@pytest.mark.qref_tier("ops")
@pytest.mark.qref_flow("pt2e")
def test_holds(qref_record):
    qref_record.reproducer(SCRIPT, {"got": torch.ones(1), "want": torch.ones(1)})
'''


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_artifacts_for_failing_tests_with_a_reproducer(pytester, xdist):
    pytester.makepyfile(test_repro=REPRO_TESTS)
    args = ["--qref-artifacts", "out", "--qref-report", "report.json"] + (["-n", "2"] if xdist else [])
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=2, passed=1)
    written = sorted(p.name for p in (pytester.path / "out").iterdir())
    assert written == ["test_repro.py_test_diverges_a_b", "test_repro.py_test_diverges_c_d"]
    directory = pytester.path / "out" / written[0]
    assert sorted(p.name for p in directory.iterdir()) == ["inputs.pt", "repro.py"]
    import torch

    inputs = torch.load(directory / "inputs.pt", weights_only=True)
    assert torch.equal(inputs["want"], torch.tensor([1.0, 5.0]))
    run = subprocess.run([sys.executable, str(directory / "repro.py")], capture_output=True, text=True)
    assert run.returncode == 1
    assert "max divergence 3.0" in run.stdout and "diverges by 3.0" in run.stderr
    # the report keeps the script and the tensors' metadata, never the tensors
    test = _by_property(_report(pytester))["diverges"]["tests"][0]
    assert test["artifact"] == str(directory)
    assert test["reproducer"]["tensors"]["got"] == {"shape": [2], "dtype": "torch.float32"}
    assert "torch.load" in test["reproducer"]["script"]
    result.stdout.fnmatch_lines([f"qref reproducers: {pytester.path / 'out'}"])


def test_reproducer_with_tensors_survives_xdist_without_qref_options(pytester):
    pytester.makepyfile(test_repro=REPRO_TESTS)
    result = pytester.runpytest("-n", "2")
    result.assert_outcomes(failed=2, passed=1)
    assert "INTERNALERROR" not in result.stdout.str()


# --- profile, seed, timeout, engines ---------------------------------------------------------------


def test_profile_reaches_the_suite_conftest_and_seed_reaches_hypothesis(pytester, monkeypatch):
    monkeypatch.delenv("QREF_PROFILE", raising=False)
    pytester.makeconftest(
        """
        import os
        PROFILE_AT_IMPORT = os.environ.get("QREF_PROFILE")
        """
    )
    pytester.makepyfile(
        test_opts="""
        import os
        import conftest

        def test_options(request, qref_timeout, qref_engines):
            assert conftest.PROFILE_AT_IMPORT == "thorough"
            assert request.config.option.qref_profile == "thorough"
            assert request.config.option.hypothesis_seed == "1234"
            from hypothesis import core
            assert core.global_force_seed == 1234
            assert qref_timeout == 2.5
            import qref
            assert qref_engines == qref.engines()
        """
    )
    result = pytester.runpytest("--qref-profile", "thorough", "--qref-seed", "1234", "--qref-timeout", "2.5")
    result.assert_outcomes(passed=1)
    assert "QREF_PROFILE" not in __import__("os").environ  # restored after the run


def test_profile_loads_a_registered_hypothesis_profile(pytester):
    pytester.makeconftest(
        """
        import os
        from hypothesis import settings
        settings.register_profile("quick", max_examples=3)
        settings.register_profile("thorough", max_examples=7)
        settings.load_profile(os.environ.get("QREF_PROFILE", "quick"))
        """
    )
    pytester.makepyfile(
        test_p="""
        from hypothesis import settings
        def test_profile():
            assert settings.default.max_examples == 7
        """
    )
    result = pytester.runpytest("--qref-profile", "thorough")
    result.assert_outcomes(passed=1)
    assert "Hypothesis profile thorough" in result.stdout.str()


def test_fixture_defaults_without_options(pytester):
    pytester.makepyfile(
        test_defaults="""
        import pytest

        def test_defaults(qref_timeout, qref_engines, qref_tolerance_override):
            assert qref_timeout is None and qref_tolerance_override is None
            assert isinstance(qref_engines, list)

        def test_converter_needs_a_flow(qref_converter):
            pass

        @pytest.mark.qref_flow("pt2e")
        def test_default_pt2e(qref_converter):
            assert qref_converter.target == "qref-pt2e"
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*uses qref_converter without a qref_flow marker*"])


# --- embedding the suite in a project's own tests ---------------------------------------------------


def test_conftest_override_of_qref_converter_embeds_the_suite(pytester):
    # A stand-in for qref.properties: an importable package of property modules.
    pkg = pytester.mkpydir("fakeprops")
    (pkg / "test_equivalence.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from qref.tally import compared

            pytestmark = [pytest.mark.qref_family("equivalence"), pytest.mark.qref_flow("pt2e")]

            @pytest.mark.qref_tier("ops")
            def test_converts(qref_converter):
                compared()
                assert qref_converter.target == "mypkg:convert"
                assert qref_converter(object(), fold_quantize=False) == ("converted", False)
            """
        )
    )
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from qref.converters import Converter

            def convert(model, fold_quantize=True):
                return ("converted", fold_quantize)

            @pytest.fixture
            def qref_converter():
                return Converter("mypkg:convert", "pt2e", convert, frozenset({"fold_quantize"}))
            """
        )
    )
    (tests / "test_qref_suite.py").write_text("from fakeprops.test_equivalence import *\n")
    pytester.syspathinsert()  # fakeprops importable, as an installed qref.properties is
    result = pytester.runpytest("tests", "--qref-flow", "pt2e")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*qref conformance: qref_converter fixture (pt2e)*", "*equivalence*converts*passed*"])


def test_collection_errors_are_reported_as_unchecked(suite):
    suite.makepyfile(test_broken="import no_such_module_for_qref\n")
    result = suite.runpytest(
        "--qref-flow", "pt2e", "--qref-report", "report.json", "--continue-on-collection-errors"
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*not checked, could not collect test_broken.py: ModuleNotFoundError*"])
    document = _report(suite)
    assert document["all_hold"] is False
    assert document["collection_errors"][0]["nodeid"] == "test_broken.py"


@pytest.mark.parametrize("failure, expected", [("converter diverg", True), ("cannot run", False)])
def test_failure_condition_expects_only_that_failure(suite, failure, expected):
    suite.makepyfile(test_bad=BAD_OPS)
    (suite.path / "expect.toml").write_text(
        f'[[expect]]\ntest = "ops_bad"\nreason = "a known defect"\nfailure = "{failure}"\n'
    )
    result = suite.runpytest("--qref-converter", "fakeconv:good", "--qref-flow", "pt2e",
                             "--qref-expectations", "expect.toml", "--qref-report", "report.json")  # fmt: skip
    if expected:
        assert result.ret == 0
        assert _by_property(_report(suite))["ops_bad"]["status"] == "xfailed"
    else:  # it fails, but not the way the entry expects: a real failure, and it says why
        assert result.ret == 1
        assert _by_property(_report(suite))["ops_bad"]["status"] == "failed"
        result.stdout.fnmatch_lines(["*expected to fail with 'cannot run' (a known defect), but it failed otherwise*"])


# --- examples compared: "not exercised" ---------------------------------------------------------

COUNTED = '''
import pytest
from hypothesis import given, reject, settings, strategies as st
from qref.tally import compared, not_compared

pytestmark = [pytest.mark.qref_family("equivalence"), pytest.mark.qref_tier("ops"),
              pytest.mark.qref_flow("pt2e")]

@settings(max_examples=10, database=None)
@given(st.integers(0, 9))
def test_never_compares(n):
    not_compared("float output" if n % 2 else "no weight")

@settings(max_examples=10, database=None)
@given(st.integers(0, 9))
def test_silently_returns(n):
    return

@settings(max_examples=10, database=None)
@given(st.integers(0, 9))
def test_compares_some(n):
    if n < 5:
        not_compared("small")
        return
    compared()

def test_plain_compares(qref_record):
    qref_record.lsb(0)

@settings(max_examples=5, database=None)
@given(st.integers(0, 9))
def test_rejects_everything(n):
    not_compared("the quantizer left the op float")
    reject()
'''


def test_property_that_compared_nothing_is_not_exercised_and_fails(pytester):
    pytester.makepyfile(fakeconv=FAKECONV, test_counted=COUNTED)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "--qref-report", "report.json",
                                "-p", "no:randomly")
    assert result.ret == 1
    rows = _by_property(_report(pytester))
    never = rows["never_compares"]
    assert never["status"] == "not exercised"
    assert never["compared"] == {"compared": 0, "drawn": never["compared"]["drawn"]}
    assert never["compared"]["drawn"] >= 2
    assert set(never["not_compared"]) == {"float output", "no weight"}
    assert sum(never["not_compared"].values()) == never["compared"]["drawn"]
    assert "0 of" in never["reason"] and "float output:" in never["reason"]
    silent = rows["silently_returns"]
    assert silent["status"] == "not exercised" and "no cause given" in silent["reason"]
    some = rows["compares_some"]
    assert some["status"] == "passed" and 0 < some["compared"]["compared"] < some["compared"]["drawn"]
    assert rows["plain_compares"]["compared"] == {"compared": 1, "drawn": 1}
    rejected = rows["rejects_everything"]
    assert rejected["status"] == "not exercised" and "the quantizer left the op float:" in rejected["reason"]
    document = _report(pytester)
    assert document["all_hold"] is False and document["counts"]["not exercised"] == 3
    result.stdout.fnmatch_lines(["*never_compares*0/*not exercised*float output*"])


def test_not_exercised_expectation_names_why(pytester):
    pytester.makepyfile(fakeconv=FAKECONV, test_counted=COUNTED)
    pytester.makefile(".toml", expect="""
        [[expect]]
        test = "never_compares"
        reason = "this converter has no weights to compare"
        not_exercised = true
        [[expect]]
        test = "silently_returns"
        reason = "the same, for a silent property"
        not_exercised = true
        [[expect]]
        test = "rejects_everything"
        reason = "this quantizer annotates none of these ops"
        not_exercised = true
        """)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "--qref-report", "report.json",
                                "--qref-expectations", "expect.toml")
    assert result.ret == 0, result.stdout.str()
    never = _by_property(_report(pytester))["never_compares"]
    assert never["status"] == "skipped"
    assert "not exercised: 0 of" in never["reason"] and "no weights to compare" in never["reason"]


def test_not_exercised_fails_a_plain_pytest_run_too(pytester):
    pytester.makepyfile(test_counted=COUNTED)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(["*not exercised: 0 of * compared*"])


def test_expected_failure_that_did_not_occur_says_so(pytester):
    pytester.makepyfile(fakeconv=FAKECONV, test_x="""
        import pytest
        from qref.tally import compared

        @pytest.mark.qref_family("equivalence")
        @pytest.mark.qref_tier("ops")
        def test_defect_fixed():
            compared()
        """)
    pytester.makefile(".toml", expect="""
        [[expect]]
        test = "defect_fixed"
        reason = "upstream defect 123"
        """)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "--qref-expectations", "expect.toml")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*defect_fixed*did not occur: the upstream defect may be fixed; narrow or "
                                 "remove this entry*"])


ANYWHERE_TESTS = """
    import pytest
    from hypothesis import HealthCheck, given, settings, strategies as st
    from qref.properties._support import subject  # noqa: F401 (the fixture)
    from qref.tally import compared

    pytestmark = [pytest.mark.qref_family("equivalence"), pytest.mark.qref_tier("ops")]

    @settings(max_examples=20, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 9))
    def test_draws_the_model_sometimes(subject, n):
        if n == 3 and SHOWS:
            subject._excuse_known_defect("the converter raised: torchao raised InternalError: defect 7 (at x.py:1)")
        compared()

    @settings(max_examples=20, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 9))
    def test_fails_otherwise(subject, n):
        if n == 5:
            subject._excuse_known_defect("the converter raised: outputs differ by 3 LSB")
            raise AssertionError("outputs differ by 3 LSB")
        compared()
    """


@pytest.mark.parametrize("defect_shows", [True, False])
def test_anywhere_entry_excuses_only_the_examples_that_show_it(pytester, defect_shows):
    """An ``anywhere`` entry (a converter's defect on one kind of model, which any property may
    draw) excuses the example that shows it, counted under its reason, and the property goes on
    with the others; another failure stays a failure; "did not occur" only when no example
    showed it."""
    pytester.makepyfile(fakeconv=FAKECONV, test_x=f"SHOWS = {defect_shows}\n" + textwrap.dedent(ANYWHERE_TESTS))
    pytester.makefile(".toml", expect="""
        [[expect]]
        test = "*"
        reason = "upstream defect 7"
        failure = "defect 7 \\\\(at x.py"
        anywhere = true
        """)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "--qref-expectations", "expect.toml",
                                "--qref-report", "report.json", "-p", "no:randomly")
    assert result.ret == 1  # test_fails_otherwise
    rows = _by_property(_report(pytester))
    drawn = rows["draws_the_model_sometimes"]
    assert drawn["status"] == "passed"
    assert rows["fails_otherwise"]["status"] == "failed"
    entry = _report(pytester)["expectations"]["entries"][0]
    if defect_shows:
        assert set(drawn["not_compared"]) == {"known upstream defect: upstream defect 7"}, drawn
        assert drawn["compared"]["compared"] >= 5 and entry["occurred"] is True
        assert "did not occur" not in result.stdout.str()
    else:
        assert not drawn.get("not_compared") and entry["occurred"] is False
        result.stdout.fnmatch_lines(["*qref expectation did not occur in any property it matches*defect 7*"])


def test_anywhere_entry_needs_a_failure_message(tmp_path):
    from qref.expectations import ExpectationsError, load

    path = tmp_path / "expect.toml"
    path.write_text('[[expect]]\ntest = "*"\nreason = "a defect"\nanywhere = true\n')
    with pytest.raises(ExpectationsError, match="'anywhere' needs a 'failure'"):
        load(path)


def test_a_flaky_failure_reports_the_failure_hypothesis_could_not_reproduce(pytester):
    pytester.makepyfile(fakeconv=FAKECONV, test_flaky="""
        import pytest
        from hypothesis import given, settings, strategies as st
        from qref.tally import compared

        calls = []

        @pytest.mark.qref_family("equivalence")
        @settings(max_examples=5, database=None)
        @given(st.integers())
        def test_once(n):
            compared()
            calls.append(n)
            if len(calls) == 1:
                pytest.fail("candidate vs reference:\\nfirst divergence: conv0 (3 LSB)", pytrace=False)
        """)
    result = pytester.runpytest("--qref-converter", "fakeconv:good", "--qref-report", "report.json")
    assert result.ret == 1
    (test,) = _report(pytester)["tests"]
    assert test["status"] == "failed"
    assert test["reason"].startswith("flaky: it failed once and passed when Hypothesis ran the example again")
    assert "first divergence: conv0 (3 LSB)" in test["message"] and "_WrappedBaseException" not in test["message"]


def test_the_suite_caps_shrinking_time_through_hypothesis_engine():
    """properties/conftest.py sets Hypothesis' shrink deadline (a module constant the engine reads
    when shrinking starts); a Hypothesis release that drops it must fail here, not slow the suite."""
    import importlib

    from hypothesis.internal.conjecture import engine

    source = importlib.util.find_spec("hypothesis.internal.conjecture.engine").origin
    assert "time.perf_counter() + MAX_SHRINKING_SECONDS" in open(source).read()
    import properties.conftest as suite_conftest

    assert engine.MAX_SHRINKING_SECONDS == suite_conftest.SHRINK_SECONDS < 300
