"""``qref check`` (exit codes, messages, isolation) and the converter machinery behind it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qref import cli
from qref.converters import (
    BUILTINS,
    CONTRACTS,
    Converter,
    ConverterMisbehaved,
    UsageError,
    call_guarded,
    resolve,
)

pytest_plugins = ["pytester"]

QREF = str(Path(sys.executable).with_name("qref"))


def run_qref(*args, cwd, env=None):
    return subprocess.run(
        [QREF, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


# --- usage errors: exit 2, one line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "no-such-converter"], "unknown converter 'no-such-converter': use a built-in"),
        (["check", "os:sep"], "'os:sep' is a str, not a callable"),
        (["check", "os:no_such_attribute"], "module 'os' has no attribute 'no_such_attribute'"),
        (["check", "no_such_module_q:convert"], "cannot import module 'no_such_module_q'"),
        (["check", "qref-fx", "--flow", "pt2e"], "'qref-fx' is an fx converter, not pt2e"),
        (["check", "os.path:join"], "cannot tell whether 'os.path:join' is a pt2e or an fx converter"),
        (["check", "qref-pt2e", "--profile", "huge"], "invalid choice: 'huge'"),
        (["check", "qref-pt2e", "--expectations", "missing.toml"], "'missing.toml' does not exist"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    result = run_qref(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_help(tmp_path):
    top = run_qref("--help", cwd=tmp_path)
    assert top.returncode == 0 and "check" in top.stdout
    check = run_qref("check", "--help", cwd=tmp_path)
    assert check.returncode == 0
    for text in ("qref check CONVERTER", "torchao-pt2e", "torch-fx", "module:attr", "qref.converters",
                 "--flow", "--profile", "--engine", "--report", "--artifacts", "--expectations",
                 "--seed", "--timeout", "exit status", "PYTEST_ARGS", "pytest-xdist worker process"):  # fmt: skip
        assert text in check.stdout, text


# --- running a suite: exit 0/1, any directory, passthrough -----------------------------------------

FAKE_SUITE = {
    "conftest.py": "",
    "test_props.py": """
        import pytest

        from qref import tally

        pytestmark = [pytest.mark.qref_family("equivalence"), pytest.mark.qref_flow("pt2e")]

        @pytest.mark.qref_tier("ops")
        def test_holds(qref_converter):
            assert qref_converter.target.endswith("convert")
            tally.compared()  # an example that compared nothing would be "not exercised"

        @pytest.mark.qref_tier("ops")
        def test_known_issue():
            assert False, "documented divergence"

        @pytest.mark.qref_tier("models")
        def test_model(qref_converter):
            import os
            assert not os.environ.get("FAIL_MODEL"), "model diverges"
            tally.compared()

        @pytest.mark.qref_flow("fx")
        def test_fx_only():
            assert False, "an fx test must not run for a pt2e converter"
        """,
}

USER_CONVERTER = """
import torch

def convert(model, use_reference_representation=False, fold_quantize=True):
    return torch.fx.symbolic_trace(torch.nn.Identity())
"""

EXPECTATIONS = '[[expect]]\ntest = "known_issue"\nreason = "documented divergence"\n'

# Runs the real CLI in a fresh process, with the suite directory pointed at the fake suite.
LAUNCH = "import pathlib, sys; import qref.cli as c; c.suite_dir = lambda: pathlib.Path(sys.argv[1]); sys.exit(c.main(sys.argv[2:]))"


@pytest.fixture
def project(tmp_path):
    """An unrelated project (hostile pytest config) holding the user's converter; the fake suite."""
    suite = tmp_path / "site" / "properties"
    suite.mkdir(parents=True)
    for name, text in FAKE_SUITE.items():
        (suite / name).write_text(textwrap.dedent(text))
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.py").write_text(USER_CONVERTER)
    (work / "expect.toml").write_text(EXPECTATIONS)
    # an ini that would break any run that read it, and a conftest that would too
    (work / "pytest.ini").write_text("[pytest]\naddopts = --no-such-option\n")
    (work / "conftest.py").write_text("raise RuntimeError('the project conftest was loaded')\n")
    return suite, work


def launch(suite, work, *args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, str(suite), *args],
        cwd=work, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_check_exits_0_when_all_hold_from_an_unrelated_directory(project):
    suite, work = project
    result = launch(suite, work, "check", "mine:convert", "--expectations", "expect.toml",
                    "--report", "out.json")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qref: the suite runs in 1 isolated worker process" in result.stdout  # a crash cannot end the run
    assert "qref conformance: mine:convert (pt2e)" in result.stdout
    assert "expected failure: documented" in result.stdout  # (cut to the terminal's width)
    document = json.loads((work / "out.json").read_text())
    assert document["all_hold"] is True and document["converter"]["target"] == "mine:convert"
    assert not (work / ".pytest_cache").exists()


def test_check_exits_1_when_a_property_fails(project):
    suite, work = project
    result = launch(suite, work, "check", "mine:convert", "--expectations", "expect.toml", "--", "-n", "0",
                    env_extra={"FAIL_MODEL": "1"})  # fmt: skip
    assert result.returncode == 1
    assert "model diverges" in result.stdout
    assert "worker" not in result.stdout  # the user's -n 0: in this process


def test_check_uses_the_default_expectations_and_passes_pytest_args(project):
    suite, work = project
    # The default list does not know test_known_issue, so it fails -> 1; with -k it is not run.
    result = launch(suite, work, "check", "mine:convert", "--", "-p", "no:xdist")
    assert result.returncode == 1
    assert "expectation matched no test: test = 'qat_prepare_keeps_bn_eps*'" in result.stdout
    assert result.stderr.splitlines() == [
        "qref check: the suite runs in this process (-p no:xdist): a converter that crashes it ends the run"]
    result = launch(suite, work, "check", "mine:convert", "--", "-k", "not known_issue", "-n", "0")
    assert result.returncode == 0, result.stdout


def test_check_no_test_selected_is_not_success(project):
    suite, work = project
    result = launch(suite, work, "check", "mine:convert", "--", "-k", "nothing_matches_this")
    assert result.returncode == 1
    assert "no property was run" in result.stderr


def test_real_suite_is_located_and_invoked_in_isolation():
    suite = cli.suite_dir()
    assert (suite / "__init__.py").is_file() and (suite / "conftest.py").is_file()
    options = cli._parser().parse_args(["check", "qref-pt2e", "--engine", "x86", "fbgemm", "--seed", "3"])
    args = cli.pytest_args(options, "pt2e", suite, ["-x"])
    assert args[0] == str(suite) and args[-1] == "-x"
    assert args[args.index("-c") + 1] == os.devnull
    assert args[args.index("--rootdir") + 1] == str(suite.parent)
    assert args[args.index("--qref-expectations") + 1] == cli.default_expectations()
    assert args.count("--qref-engine") == 2 and "--qref-seed" in args
    assert Path(cli.default_expectations()).is_file()


def test_every_option_reaches_pytest_as_the_plugin_declares_it():
    """qref check's options are the plugin's (declared once): each given value arrives as --qref-NAME,
    a seed of 0 included, and -v leaves pytest's own output on."""
    from qref.plugin.options import OPTIONS

    suite = cli.suite_dir()
    argv = ["check", "qref-pt2e", "--seed", "0", "--profile", "default", "--report", "r.json", "--html", "r.html",
            "--artifacts", "a", "--expected-as-skip", "--timeout", "5", "--engine", "x86",
            "--coverage-at-least", "conv2d", "linear", "--backend", "inductor"]
    args = cli.pytest_args(cli._parser().parse_args(argv), "pt2e", suite, [])
    for name, value in [("seed", "0"), ("profile", "default"), ("report", "r.json"), ("html", "r.html"),
                        ("artifacts", "a"), ("timeout", "5.0"), ("engine", "x86"), ("backend", "inductor")]:
        assert args[args.index(f"--qref-{name}") + 1] == value, name
    assert "--qref-expected-as-skip" in args and "qref.plugin.console" in args
    at_least = args.index("--qref-coverage-at-least")
    assert args[at_least + 1] == "conv2d" and args[args.index("--qref-coverage-at-least", at_least + 1) + 1] == "linear"
    assert {o.name for o in OPTIONS if o.in_cli} <= {a[2:] for a in argv if a.startswith("--")} | {"flow", "expectations"}
    verbose = cli.pytest_args(cli._parser().parse_args(["check", "qref-pt2e", "-v"]), "pt2e", suite, [])
    assert "qref.plugin.console" not in verbose


def test_default_expectations_file_is_valid():
    from qref.expectations import load

    entries = load(cli.default_expectations())
    assert [e.test for e in entries] == ["qat_prepare_keeps_bn_eps*", "reference_representation_*",
                                         "qat_fake_quant_trains_with_the_qparams_convert_uses*",
                                         "fx_prepared_model_not_silently_changed*", "qat_fold_uses_the_graphs_bn_eps*",
                                         "re:test_(qat_fold_leaves_prepared_model_unchanged|prepared_model_not_silently_changed)",
                                         "re:test_(fx_(?!architecture)\\w*matches_reference|lowered_within_kernel_contract|engines_agree)",
                                         "prepare_keeps_the_float_model*", "fx_custom_module_converted*",
                                         "re:^properties/test_(?!primitives)\\w+\\.py::"]
    # real architectures under FX are MobileNets (ReLU6): the dropped-ReLU entry does not apply there
    (relu,) = [e for e in entries if "relu" in e.failure]
    assert not relu.matches("properties/test_architectures.py::test_fx_architecture_matches_reference")
    assert relu.matches("properties/test_equivalence.py::test_fx_model_matches_reference")
    assert entries[0].matches("properties/test_folding.py::test_qat_prepare_keeps_bn_eps_and_momentum")
    assert "prepare_qat_pt2e" in entries[0].reason and entries[0].kind == "xfail"
    assert entries[0].converter is None  # a prepare-stage defect: whatever the converter
    # torchao's own defect: excused for torchao-pt2e only, and only for that failure
    assert entries[1].converter == "torchao-pt2e" and entries[1].failure
    assert entries[1].inactive_because("2.13.0", [], "qref-pt2e", "0.18.0") is not None
    assert entries[1].inactive_because("2.13.0", [], "torchao-pt2e", "0.18.0") is None
    assert entries[1].inactive_because("2.13.0", [], "torchao-pt2e", "0.19.0") is not None
    # torch 2.13's convert_fx re-observing QAT weights in place: torch-fx only, that message only
    assert entries[3].converter == "torch-fx" and "weight_fake_quant" in entries[3].failure
    # torch 2.13's fused fake-quant: a training-stage defect, whatever the converter, pinned to
    # the precondition's own message and to the torch release it was seen on
    assert entries[2].failure.startswith("^PRECONDITION") and "pinned in tests/test_qparams.py" in entries[2].reason
    assert entries[2].expects("PRECONDITION (training stage, not the converter): fake-quantizers trained with "
                              "other qparams than their observers report, which conversion uses: act0: ...")
    assert not entries[2].expects("PRECONDITION (prepare stage, not the converter): the prepared graph ...")
    assert entries[2].inactive_because("2.13.0", [], "qref-pt2e") is None
    assert entries[2].inactive_because("2.14.0", [], "qref-pt2e") is not None


# --- resolving converters --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_resolve_with_their_flow_and_full_contract(name):
    converter = resolve(name)
    assert converter.flow == BUILTINS[name][0]
    assert converter.accepted == frozenset(CONTRACTS[converter.flow])
    assert converter.not_exercised == ()
    assert resolve(name, converter.flow).fn is converter.fn


def test_torchao_builtin_enables_the_pattern_cache():
    from qref import _torchao_patterns

    resolve("torchao-pt2e")
    assert _torchao_patterns.is_enabled() or os.environ.get("QREF_NO_PATTERN_CACHE")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "userconv.py").write_text(
        textwrap.dedent(
            """
            def only_fold(model, fold_quantize=True):
                return model

            def takes_all(model, **kwargs):
                return kwargs

            def fx_style(model, qconfig_mapping=None, backend_config=None):
                return model

            def declared(model):
                return model
            declared.qref_flow = "fx"

            def no_arguments():
                pass

            class Namespace:
                @staticmethod
                def convert(model, use_reference_representation=False):
                    return model

            broken_flow = lambda m: m
            broken_flow.qref_flow = "onnx"
            """
        )
    )
    (tmp_path / "brokenmod.py").write_text("import no_such_dependency_q\n")
    (tmp_path / "raisingmod.py").write_text("raise ValueError('bad config\\nsecond line')\n")
    monkeypatch.chdir(tmp_path)  # module:attribute is importable from the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("userconv", "brokenmod", "raisingmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_module_attribute_signature_inspection(user_module):
    c = resolve("userconv:only_fold")
    assert (c.flow, c.accepted, c.not_exercised) == ("pt2e", {"fold_quantize"}, ("use_reference_representation",))
    assert resolve("userconv:takes_all", "fx").accepted == frozenset(CONTRACTS["fx"])
    assert resolve("userconv:fx_style").flow == "fx"
    assert resolve("userconv:declared").flow == "fx"
    assert resolve("userconv:Namespace.convert").flow == "pt2e"


def test_converter_call_drops_unaccepted_contract_kwargs(user_module):
    c = resolve("userconv:takes_all", "pt2e")
    assert c("m", fold_quantize=False) == {"fold_quantize": False}
    only = resolve("userconv:only_fold")
    assert only("m", use_reference_representation=True, fold_quantize=False) == "m"
    with pytest.raises(TypeError, match="not keyword arguments of the pt2e converter contract"):
        only("m", qconfig_mapping=None)


@pytest.mark.parametrize(
    "target, flow, message",
    [
        ("userconv:no_arguments", "pt2e", "cannot be called as convert(model)"),
        ("userconv:missing", None, "module 'userconv' has no attribute 'missing'"),
        ("userconv:fx_style", "pt2e", "looks like an fx converter"),
        ("userconv:declared", "pt2e", "looks like an fx converter (declared)"),
        ("userconv:takes_all", None, "cannot tell whether"),
        ("userconv:broken_flow", None, "declares qref_flow='onnx'"),
        ("brokenmod:f", None, "it needs module 'no_such_dependency_q', which is not installed"),
        ("raisingmod:f", None, "importing 'raisingmod' raised ValueError: bad config second line"),
        ("userconv:", None, "is not module:attribute"),
        ("qref-pt2e", "onnx", "unknown flow 'onnx'"),
    ],
)
def test_resolve_usage_errors_are_one_line(user_module, target, flow, message):
    with pytest.raises(UsageError) as info:
        resolve(target, flow)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_entry_point_converters(tmp_path, monkeypatch, user_module):
    dist = tmp_path / "vendor_quant-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-quant\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[qref.converters]\nvendor = userconv:only_fold\nbroken = brokenmod:f\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    c = resolve("vendor")
    assert (c.target, c.flow, c.accepted) == ("vendor", "pt2e", {"fold_quantize"})
    with pytest.raises(UsageError, match="entry point 'broken' .* failed to load"):
        resolve("broken")
    with pytest.raises(UsageError, match=r"registered under the entry-point group qref.converters \(.*vendor"):
        resolve("not-registered")


# --- calling converters: misbehaviour is reported, the run carries on ------------------------------


def _converter(fn, flow="pt2e"):
    return Converter("test:fn", flow, fn, frozenset(CONTRACTS[flow]))


def _graph_module():
    import torch

    return torch.fx.symbolic_trace(torch.nn.Identity())


def test_call_guarded_returns_a_well_typed_result():
    gm = _graph_module()
    assert call_guarded(_converter(lambda m, **kw: gm), None, timeout=5) is gm
    import torch

    assert isinstance(call_guarded(_converter(lambda m, **kw: torch.nn.ReLU(), "fx"), None), torch.nn.ReLU)


def test_call_guarded_raises():
    def raises(model, **kwargs):
        raise RuntimeError("unsupported op\naten.foo")

    with pytest.raises(ConverterMisbehaved) as info:
        call_guarded(_converter(raises), None, timeout=5)
    assert info.value.kind == "raised"
    assert "RuntimeError: unsupported op aten.foo" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("swallows", [False, True], ids=["sleeps", "swallows-exceptions"])
def test_call_guarded_times_out(swallows):
    def hangs(model, **kwargs):
        if swallows:
            while True:
                try:
                    time.sleep(10)
                except Exception:  # a converter that swallows errors still times out
                    pass
        time.sleep(10)

    start = time.monotonic()
    with pytest.raises(ConverterMisbehaved) as info:
        call_guarded(_converter(hangs), None, timeout=0.2)
    assert time.monotonic() - start < 5
    assert info.value.kind == "timeout" and "did not return within 0.2 s" in str(info.value)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_call_guarded_restores_an_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        call_guarded(_converter(lambda m, **kw: _graph_module()), None, timeout=5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "flow, result, expected",
    [("pt2e", 42, "torch.fx.graph_module.GraphModule"), ("pt2e", "nn", "GraphModule"), ("fx", None, "Module")],
)
def test_call_guarded_wrong_type(flow, result, expected):
    import torch

    value = torch.nn.ReLU() if result == "nn" else result
    with pytest.raises(ConverterMisbehaved) as info:
        call_guarded(_converter(lambda m, **kw: value, flow), None)
    assert info.value.kind == "wrong-type" and expected in str(info.value)


def test_call_guarded_off_the_main_thread_runs_without_a_limit():
    outcome = []

    def slow(model, **kwargs):
        time.sleep(0.3)
        return _graph_module()

    thread = threading.Thread(target=lambda: outcome.append(call_guarded(_converter(slow), None, timeout=0.05)))
    thread.start()
    thread.join()
    assert len(outcome) == 1


# --- isolation: the suite runs in a worker process that a crash of the converter cannot end ------

ISOLATED = ["-p", "qref.isolation", "-n", "1"]


@pytest.mark.parametrize("passthrough, added", [
    ([], ISOLATED),
    (["-x", "-k", "equivalence"], ISOLATED),
    (["-k", "-n"], ISOLATED),  # a -k expression, not the option
    (["-n", "2"], ["-p", "qref.isolation"]),  # the user's workers, still with crash reports
    (["-n2"], ["-p", "qref.isolation"]),
    (["-nauto"], ["-p", "qref.isolation"]),
    (["--numprocesses=3"], ["-p", "qref.isolation"]),
    (["--numprocesses", "0"], ["-p", "qref.isolation"]),
    (["--pdb"], ["-p", "qref.isolation"]),  # a debugger needs the tests in this process
    (["-p", "no:xdist"], []),
    (["-pno:xdist"], []),
])
def test_isolation_args(passthrough, added, monkeypatch):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    args, note = cli.isolation_args(passthrough)
    assert args == added
    assert (note is None) == bool(added)


def test_isolation_loads_xdist_when_plugins_are_not_autoloaded(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert cli.isolation_args([]) == (["-p", "xdist.plugin", *ISOLATED], None)


def test_without_xdist_the_suite_runs_in_process_and_says_so(monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "xdist" else real(name, *a))
    args, note = cli.isolation_args([])
    assert args == [] and "pytest-xdist is not installed" in note and "\n" not in note


def test_check_runs_pytest_isolated_before_the_users_arguments(monkeypatch, capsys):
    import pytest as pytest_module

    seen = []
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setattr(pytest_module, "main", lambda args: seen.append(args) or pytest_module.ExitCode.OK)
    assert cli.main(["check", "qref-pt2e", "--", "-k", "holds"]) == 0
    assert seen[0][-6:] == [*ISOLATED, "-k", "holds"]
    assert cli.main(["check", "qref-pt2e", "--", "-n", "2"]) == 0
    assert seen[1][-4:] == ["-p", "qref.isolation", "-n", "2"] and seen[1].count("-n") == 1
    assert capsys.readouterr().err == ""
