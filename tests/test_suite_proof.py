"""The suite is its own proof: `qref check` (quick profile) fails every mutant and passes real converters.

Each run is a fresh `qref check` process, as a converter author would run it, with a fixed seed
so CI is reproducible; the JSON report says which property caught a mutant.  A mutant counts as
killed only by a failed *property* (a crash of the suite itself or a usage error would be exit
status 2 or a report without failures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]
QREF = Path(sys.executable).with_name("qref")


# QREF_PROOF_SEED=N runs the proof at another seed (CI: 0)
PROOF_SEED = int(os.environ.get("QREF_PROOF_SEED", "0"))


def check(target: str, flow: str, tmp_path: Path, *pytest_args: str, shrink: bool = True,
          options: tuple = (), profile: str = "quick", seed: int | None = PROOF_SEED) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    seeded = ("--seed", str(seed)) if seed is not None else ()
    command = [str(QREF), "check", target, "--flow", flow, "--profile", profile, *seeded,
               "--report", str(report), *options, "--", "-q", *pytest_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), QREF_SHRINK="1" if shrink else "0")
    # run elsewhere: the checkout's own files (e.g. an example database) must not matter
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    output = done.stdout[-6000:] + done.stderr[-3000:]
    return done.returncode, (json.loads(report.read_text()) if report.exists() else {}), output


# a failed property whose reason says one of these did not judge the converter's numbers or contract
NOT_A_VERDICT = ("the converter raised", "the converter timeout", "the converter exited", "converter crashed",
                 "the converted model cannot run")


def _failed(report: dict) -> list[str]:
    return [t["nodeid"] for t in report.get("tests", []) if t.get("status") == "failed"]


@pytest.mark.parametrize("mutant", list(MUTANTS.values()), ids=list(MUTANTS))
def test_quick_profile_kills_mutant(mutant, tmp_path):
    # only the properties meant for its bug class (a kill by another one may be an artifact of
    # how the mutant is built); -x and no shrinking: the verdict is all this test needs; -n 0: in
    # one process (no mutant crashes it; tests/test_converter_faults.py proves the isolated worker)
    status, report, output = check(mutant.target, mutant.flow, tmp_path, "-x", "-n", "0", "-k", mutant.caught_by,
                                   shrink=False)
    assert status == 1, (f"{mutant.name} ({mutant.bug_class}) survived the quick profile's "
                         f"'{mutant.caught_by}':\n{output}")
    assert _failed(report), f"exit status 1 but no failed property in the report:\n{output}"
    # a kill is a numeric or contract verdict: none of these mutants' bugs is a crash
    verdicts = [t for t in report["tests"] if t.get("status") == "failed"
                and not any(m in (t.get("reason") or "") for m in NOT_A_VERDICT)]
    assert verdicts, f"{mutant.name}: only crashes or models that cannot run failed, no verdict:\n{output}"


@pytest.mark.parametrize("target, flow", [("qref-pt2e", "pt2e"), ("torchao-pt2e", "pt2e"),
                                          ("qref-fx", "fx"), ("torch-fx", "fx")])
def test_real_converter_passes(target, flow, tmp_path):
    status, report, output = check(target, flow, tmp_path)
    assert status == 0, f"{target} fails the quick profile: {_failed(report)}\n{output}"
    assert report.get("tests"), "the report lists no properties"
    # seeded, so the verdict is the same on every machine: no replay of stored examples
    assert report["environment"]["example_database"] is False


@pytest.mark.slow
@pytest.mark.parametrize("target, flow", [("qref-pt2e", "pt2e"), ("torchao-pt2e", "pt2e"),
                                          ("qref-fx", "fx"), ("torch-fx", "fx")])
def test_real_converter_passes_unseeded_default_profile(target, flow, tmp_path):
    """New examples each run, and the example database the first run wrote (in tmp_path) replayed by
    the second, as a user's repeated `qref check` does: no false alarm."""
    for run in ("new examples", "database replayed"):
        status, report, output = check(target, flow, tmp_path, "-n", "2", profile="default", seed=None)
        assert status == 0, f"{target} fails the default profile unseeded ({run}): {_failed(report)}\n{output}"
        assert report["environment"]["example_database"] is True


@pytest.mark.parametrize("target, flow, prop, says", [
    ("tests.mutants.pt2e:zero_point_off_by_one", "pt2e", "single_op_matches_reference", "first divergence"),
    ("tests.mutants.pt2e:reference_representation_ignored", "pt2e", "reference_representation_honoured",
     "left float ops"),
    ("tests.mutants.misbehaving:raises", "pt2e", "single_op_matches_reference", "the converter raised"),
    ("tests.mutants.fx:qconfig_kept", "fx", "fx_remove_qconfig_honoured", "modules with a qconfig attribute"),
])
def test_reproducer_script_fails_the_same_way(target, flow, prop, says, tmp_path):
    artifacts = tmp_path / "artifacts"
    status, report, output = check(target, flow, tmp_path,
                                   "-x", "-k", prop, options=("--artifacts", str(artifacts)))
    assert status == 1, output
    scripts = sorted(artifacts.rglob("repro.py"))
    assert scripts, f"no reproducer written:\n{output}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(scripts[0])], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    # the property itself runs again on the shrunk case, and fails as it did in the suite
    assert f"test_{prop} fails for {target}" in done.stdout and says in done.stdout, done.stdout


def fx_raises(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
              backend_config=None):
    raise RuntimeError("planted")


def fx_off_on_qnnpack(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
                      backend_config=None):
    """Lowered weighted modules get their bias shifted by 10 output steps, only under qnnpack."""
    import torch

    import qref

    converted = qref.convert_fx(model, convert_custom_config, _remove_qconfig, qconfig_mapping, backend_config)
    if torch.backends.quantized.engine == "qnnpack":
        for module in converted.modules():
            if hasattr(module, "set_weight_bias") and callable(getattr(module, "weight", None)):
                weight, bias = module.weight(), module.bias()
                bias = torch.zeros(weight.shape[0]) if bias is None else bias
                module.set_weight_bias(weight, bias + 10 * module.scale)
    return converted


def test_replay_passes_the_engines_fixture_to_the_engines_agree_property(capsys):
    import qref
    from hypothesis import Phase, find, settings
    from properties._support import _replay_of, replay
    from properties.test_kernels import test_engines_agree as prop
    from qref.strategies import cases

    if not {"fbgemm", "qnnpack"} <= set(qref.engines()):
        pytest.skip("needs fbgemm and qnnpack")
    arguments = {"qref_engines": ["qnnpack"]}
    assert _replay_of(prop, arguments) == ("qref.properties.test_kernels", prop.__name__, arguments)
    # the simplest case whose calibration is not all zeros (a degenerate scale is a named qnnpack deviation)
    case = find(cases("fx", tier="patterns", engine="fbgemm"), lambda case: bool(case.calibration[0][0].any()),
                settings=settings(database=None, deadline=None, derandomize=True, phases=[Phase.generate, Phase.shrink]))
    status = replay("qref.properties.test_kernels", prop.__name__, f"{__name__}:fx_off_on_qnnpack", case, arguments)
    out = capsys.readouterr().out
    assert status == 1 and "fbgemm and qnnpack disagree" in out, f"{case!r}\n{out}"
    assert replay("qref.properties.test_kernels", prop.__name__, "qref-fx", case, arguments) == 0


def test_replay_hands_the_case_to_a_property_that_draws_it_from_data(capsys):
    # in-process: the kernel property draws its case from st.data() (the engine is a fixture)
    import qref
    from hypothesis import Phase, find, settings
    from properties._support import _replay_of, replay
    from properties.test_kernels import test_lowered_within_kernel_contract as prop
    from qref.strategies import cases

    engine = qref.engines()[0]
    assert _replay_of(prop, {"engine": engine}) == ("qref.properties.test_kernels", prop.__name__, {"engine": engine})

    case = find(cases("fx", tier="ops", engine=engine), lambda case: True,
                settings=settings(database=None, deadline=None, phases=[Phase.generate]))  # the simplest
    status = replay("qref.properties.test_kernels", prop.__name__, f"{__name__}:fx_raises", case, {"engine": engine})
    out = capsys.readouterr().out
    assert status == 1 and f"{prop.__name__} fails for" in out and "raised RuntimeError: planted" in out, out


@pytest.mark.parametrize("name, says", [("raises", "raised"), ("hangs", "timeout"),
                                        ("returns_wrong_type", "wrong-type"), ("returns_nan", "NaN"),
                                        ("returns_unrunnable", "cannot run")])
def test_misbehaving_converter_is_reported_and_the_run_carries_on(name, says, tmp_path):
    status, report, output = check(f"tests.mutants.misbehaving:{name}", "pt2e", tmp_path,
                                   "-k", "single_op_matches_reference or train_eval_disallowed",
                                   shrink=False, options=("--timeout", "5"))
    assert status == 1, output
    assert len(report["tests"]) == 2, output  # both properties ran: the suite carried on
    assert any("single_op_matches_reference" in t for t in _failed(report)), output
    assert says in output, output


def test_pytest_runs_the_installed_suite_with_the_plugin_options(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
                           "qref.properties", "--qref-converter=qref-pt2e", "--qref-flow=pt2e",
                           "-k", "train_eval_disallowed"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "qref conformance: qref-pt2e (pt2e)" in done.stdout
    assert "train_eval_disallowed" in done.stdout


_CALLS = []


def pt2e_raises_once(model, use_reference_representation=False, fold_quantize=True):
    _CALLS.append(None)
    if len(_CALLS) == 1:
        raise RuntimeError("planted, first call only")
    import qref

    return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def _simplest(strategy):
    from hypothesis import Phase, find, settings

    return find(strategy, lambda case: True, settings=settings(database=None, deadline=None, phases=[Phase.generate]))


def test_replay_reports_a_failure_that_does_not_repeat_as_a_failure(capsys):
    from properties._support import replay
    from qref.strategies import cases

    _CALLS.clear()
    case = _simplest(cases("pt2e", tier="ops", qat=False))
    status = replay("qref.properties.test_contract", "test_no_observer_left", f"{__name__}:pt2e_raises_once", case, {})
    out = capsys.readouterr().out
    assert status == 1 and "only sometimes" in out and "planted, first call only" in out, out


def test_replay_of_a_case_the_property_rejects_says_not_run(capsys):
    # X86InductorQuantizer leaves sigmoid float: the fixed-qparams property rejects such a case
    import torch

    from properties._support import replay
    from qref.strategies.cases import Case
    from qref.strategies.models import Act, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    x = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
    case = Case(ModelSpec(input_shape=(1, 3, 4, 4), layers=(Conv(3, 3), Act("sigmoid"))),
                QuantSetup("pt2e", kind="x86", per_channel=False), ((x,),), ((x,),), ("linspace",))
    status = replay("qref.properties.test_equivalence", "test_fixed_qparams_op_matches_reference", "qref-pt2e",
                    case, {"fold_quantize": True})
    out = capsys.readouterr().out
    assert status == 0 and "not run: the case does not meet the property's assumptions" in out, out