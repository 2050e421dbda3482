"""Faults of the converter itself: it exits, changes torch's global state, or crashes its process.

The first two are caught around each call (``qref.converters.call_guarded``, tested here
in-process); a crash is survived by running the suite in a pytest-xdist worker that is replaced
(``qref.isolation``), tested with ``qref check`` runs against the converters of
``tests/mutants/misbehaving.py`` (quick profile, seed 0, no shrinking: the verdict is the point).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qref
from qref.converters import CONTRACTS, Converter, ConverterMisbehaved, call_guarded, global_state, observe_calls
from qref.isolation import crash_message
from tests.mutants import misbehaving

ROOT = Path(__file__).resolve().parents[1]
QREF = Path(sys.executable).with_name("qref")


def _converter(fn, flow="pt2e"):
    return Converter("test:fn", flow, fn, frozenset(CONTRACTS[flow]))


def _graph_module():
    return torch.fx.symbolic_trace(torch.nn.Identity())


@pytest.fixture
def restore_torch_state():
    """Whatever a test does to torch's settings, the next test does not see it."""
    before = global_state()
    engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
    yield before
    torch.backends.quantized.engine = engine
    torch.set_num_threads(threads)
    torch.set_default_dtype(before["default dtype"])
    torch.set_grad_enabled(before["grad mode"])
    torch.use_deterministic_algorithms(before["deterministic algorithms"][0],
                                       warn_only=before["deterministic algorithms"][1])
    torch.set_float32_matmul_precision(before["float32 matmul precision"])
    torch.set_anomaly_enabled(*before["anomaly detection"])


# --- sys.exit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, call", [(0, "sys.exit(0)"), (3, "sys.exit(3)"), (None, "sys.exit()"),
                                        ("bye", "sys.exit('bye')")])
def test_call_guarded_reports_sys_exit(code, call):
    def exits(model, **kwargs):
        sys.exit(code)

    with pytest.raises(ConverterMisbehaved) as info:  # not SystemExit: the suite's process goes on
        call_guarded(_converter(exits), None, timeout=5)
    assert info.value.kind == "exited"
    assert str(info.value) == f"converter called {call}"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timeout's alarm is off


def test_a_keyboard_interrupt_in_the_converter_still_stops_the_run(restore_torch_state):
    def interrupted(model, **kwargs):
        torch.set_num_threads(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call_guarded(_converter(interrupted), None)
    assert global_state() == restore_torch_state


# --- global state ---------------------------------------------------------------------------------


def _other_engine():
    return misbehaving.other_engine()


# what a converter changes -> what the message says (before -> after, from the state before)
CHANGES = {
    "quantized engine": (lambda: setattr(torch.backends.quantized, "engine", _other_engine()),
                         lambda b: f"quantized engine {b['quantized engine']} -> {_other_engine_than(b)}"),
    "threads": (lambda: torch.set_num_threads(torch.get_num_threads() + 1),
                lambda b: f"threads {b['threads']} -> {b['threads'] + 1}"),
    "default dtype": (lambda: torch.set_default_dtype(torch.float64),
                      lambda b: "default dtype torch.float32 -> torch.float64"),
    "grad mode": (lambda: torch.set_grad_enabled(False), lambda b: "grad mode on -> off"),
    "deterministic algorithms": (lambda: torch.use_deterministic_algorithms(True),
                                 lambda b: "deterministic algorithms off -> on"),
    "float32 matmul precision": (lambda: torch.set_float32_matmul_precision("medium"),
                                 lambda b: "float32 matmul precision highest -> medium"),
    "anomaly detection": (lambda: torch.set_anomaly_enabled(True), lambda b: "anomaly detection off -> on"),
}


def _other_engine_than(before):
    engines = [e for e in torch.backends.quantized.supported_engines if e not in (before["quantized engine"], "none")]
    return "qnnpack" if "qnnpack" in engines else engines[0]


@pytest.mark.parametrize("name", list(CHANGES))
def test_call_guarded_restores_and_names_changed_global_state(name, restore_torch_state):
    before = restore_torch_state
    assert before["default dtype"] == torch.float32 and before["grad mode"]  # the premises of CHANGES
    change, says = CHANGES[name]
    gm = _graph_module()

    def changes(model, **kwargs):
        change()
        return gm

    with pytest.raises(ConverterMisbehaved) as info:
        call_guarded(_converter(changes), None, timeout=5)
    assert info.value.kind == "changed-global-state"
    assert str(info.value) == f"converter changed global state: {says(before)}"  # only what changed
    assert global_state() == before  # restored


def test_changes_are_named_together_and_a_clean_call_passes(restore_torch_state):
    gm = _graph_module()
    with qref.use_engine("fbgemm", threads=2):
        with pytest.raises(ConverterMisbehaved) as info:
            call_guarded(_converter(lambda m, **kw: _engine_and_threads(gm)), None)
        assert str(info.value) == "converter changed global state: quantized engine fbgemm -> qnnpack, threads 2 -> 1"
        assert (torch.backends.quantized.engine, torch.get_num_threads()) == ("fbgemm", 2)
        assert call_guarded(_converter(lambda m, **kw: gm), None) is gm  # nothing changed: no complaint


def _engine_and_threads(gm):
    torch.backends.quantized.engine = "qnnpack"
    torch.set_num_threads(1)
    return gm


def test_only_what_the_converter_changed_is_named_inside_a_pinned_engine(restore_torch_state):
    # properties call the converter inside qref.use_engine(engine, threads=1): that is the state
    # the call starts from, and a converter that pins one thread changes nothing of it
    gm = _graph_module()
    with qref.use_engine("fbgemm", threads=1):
        with pytest.raises(ConverterMisbehaved) as info:
            call_guarded(_converter(lambda m, **kw: _engine_and_threads(gm)), None)
        assert str(info.value) == "converter changed global state: quantized engine fbgemm -> qnnpack"
        assert (torch.backends.quantized.engine, torch.get_num_threads()) == ("fbgemm", 1)
    assert global_state() == restore_torch_state  # and use_engine put back its own changes


def test_state_is_restored_when_the_converter_raises_or_hangs(restore_torch_state):
    def raises(model, **kwargs):
        torch.backends.quantized.engine = _other_engine()
        raise RuntimeError("lowering failed")

    def hangs(model, **kwargs):
        torch.set_grad_enabled(False)
        time.sleep(10)

    for fn, kind in ((raises, "raised"), (hangs, "timeout")):
        with pytest.raises(ConverterMisbehaved) as info:
            call_guarded(_converter(fn), None, timeout=0.2)
        assert info.value.kind == kind  # the first misbehaviour is what is reported
        assert global_state() == restore_torch_state


def test_the_mutant_converts_correctly_apart_from_the_state_it_leaves(restore_torch_state):
    from qref.strategies import cases
    from hypothesis import Phase, find, settings

    case = find(cases("pt2e", tier="ops", qat=False), lambda case: True,
                settings=settings(database=None, deadline=None, phases=[Phase.generate]))
    converter = Converter("tests.mutants.misbehaving:changes_global_state", "pt2e",
                          misbehaving.changes_global_state, frozenset(CONTRACTS["pt2e"]))
    with pytest.raises(ConverterMisbehaved, match="converter changed global state: quantized engine"):
        call_guarded(converter, case.prepared())
    assert global_state() == restore_torch_state
    # qref's own converter leaves the state alone
    assert isinstance(call_guarded(Converter("qref-pt2e", "pt2e", qref.convert_pt2e,
                                             frozenset(CONTRACTS["pt2e"])), case.prepared()), torch.fx.GraphModule)


def test_observer_sees_each_call_start_and_end():
    seen = []
    previous = observe_calls(seen.append)
    try:
        call_guarded(_converter(lambda m, **kw: _graph_module()), None)
        with pytest.raises(ConverterMisbehaved):
            call_guarded(_converter(lambda m, **kw: 1 / 0), None)
    finally:
        observe_calls(previous)
    assert seen == [True, False, True, False]


# --- how a dead worker is described --------------------------------------------------------------

SEGFAULT_DUMP = "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"


@pytest.mark.parametrize("status, in_converter, fault, says", [
    (-11, True, SEGFAULT_DUMP, "converter crashed the process (signal 11): Segmentation fault"),
    (-6, True, "Fatal Python error: Aborted\n", "converter crashed the process (signal 6): Aborted"),
    (-11, False, SEGFAULT_DUMP, "the process crashed (signal 11: Segmentation fault) outside the converter call"),
    (-9, True, "", "the process was killed (signal 9) while the converter was running: from outside"),
    (3, True, "", "converter ended the process with exit status 3, without a Python error (os._exit(3)"),
    (None, False, "", "the process running it ended without a Python error (os._exit(), or a signal such as SIGKILL)"),
    (None, True, SEGFAULT_DUMP, "converter crashed the process: Segmentation fault"),
])
def test_crash_message(status, in_converter, fault, says):
    message = crash_message(status, in_converter, fault)
    assert message.startswith(says), message
    assert "\n" not in message


# --- qref check against converters that misbehave ---------------------------------------------------

# Two properties of the same tier (ops), run in this order (contract before equivalence), each
# converting once per example: the fault hits the first, the second must still run.
FIRST, SECOND = "train_eval_disallowed", "single_op_matches_reference"


def check(target: str, tmp_path: Path, *pytest_args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    command = [str(QREF), "check", target, "--flow", "pt2e", "--profile", "quick", "--seed", "0",
               "--report", str(report), "--", "-k", f"{FIRST} or {SECOND}", *pytest_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), QREF_SHRINK="0",
               **{misbehaving.CALLS_FILE: str(tmp_path / "calls")})
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return done, (json.loads(report.read_text()) if report.exists() else {})


def _by_property(report: dict) -> dict[str, dict]:
    return {t["property"]: t for t in report.get("tests", [])}


def _output(done) -> str:
    return done.stdout[-8000:] + done.stderr[-3000:]


def test_a_converter_that_segfaults_fails_the_running_property_and_the_run_carries_on(tmp_path):
    done, report = check("tests.mutants.misbehaving:segfaults_on_third_call", tmp_path)
    output = _output(done)
    assert done.returncode == 1, output  # not -11: the suite's own process survived
    tests = _by_property(report)
    assert set(tests) == {FIRST, SECOND}, output
    crashed = tests[FIRST]
    assert crashed["status"] == "failed", output
    assert crashed["reason"] == "converter crashed the process (signal 11): Segmentation fault", output
    # filed under its family and tier, as the worker knew them
    assert (crashed["family"], crashed["tier"], crashed["flow"]) == ("contract", "ops", "pt2e"), crashed
    assert tests[SECOND]["status"] == "passed", output  # run by the replacement worker
    # the crash's Python traceback is shown, down to the converter's line
    assert "in segfaults_on_third_call" in done.stdout, output
    assert "qref conformance: tests.mutants.misbehaving:segfaults_on_third_call" in done.stdout


@pytest.fixture(scope="module")
def exits_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exits")
    return check("tests.mutants.misbehaving:exits_on_second_call", tmp_path)


def test_a_converter_that_calls_sys_exit_fails_the_running_property_and_the_run_carries_on(exits_run):
    done, report = exits_run
    output = _output(done)
    assert done.returncode == 1, output
    tests = _by_property(report)
    assert tests[FIRST]["status"] == "failed", output
    assert "the converter exited: converter called sys.exit(0)" in done.stdout, output
    assert tests[SECOND]["status"] == "passed", output
    assert "qref conformance: tests.mutants.misbehaving:exits_on_second_call" in done.stdout


def test_the_exit_is_the_reported_reason(exits_run):
    done, report = exits_run
    reason = _by_property(report)[FIRST].get("reason") or ""
    assert "converter called sys.exit(0)" in reason, reason


def test_a_converter_that_changes_global_state_fails_each_property_and_the_state_is_restored(tmp_path):
    done, report = check("tests.mutants.misbehaving:changes_global_state", tmp_path)
    output = _output(done)
    assert done.returncode == 1, output
    tests = _by_property(report)
    assert set(tests) == {FIRST, SECOND}, output
    said = set()
    for name, test in tests.items():
        assert test["status"] == "failed", output
        found = re.search(r"converter changed global state: quantized engine (\w+) -> (\w+)(, threads (\d+) -> 1)?$",
                          test["reason"])
        assert found, test["reason"]
        said.add(found.group(0))
    # the same change named for every property: each started from the restored state (had the
    # engine and thread count not been put back, the second property would see no change)
    assert len(said) == 1, said
    before, after = found.group(1), found.group(2)
    assert after == _other_engine_than({"quantized engine": before}) and before != after


# --- the controller's side of qref.isolation, with stand-ins for xdist's objects -------------------


class _Config:
    def __init__(self, options=None, dsession=None):
        self.options = options or {}
        self.stash = pytest.Stash()
        self.pluginmanager = type("PM", (), {"get_plugin": lambda _, name: dsession if name == "dsession" else None})()

    def getoption(self, name, default=None):
        return self.options.get(name, default)


class _Node:
    def __init__(self, config, worker_id="gw0"):
        self.config = config
        self.workerinput = {"workerid": worker_id}
        self.gateway = type("GW", (), {"id": worker_id, "_io": None})()


def test_one_restart_per_test_once_the_suite_is_collected():
    from qref import isolation

    dsession = type("DSession", (), {"_max_worker_restart": 4})()
    isolation.pytest_xdist_node_collection_finished(_Node(_Config({"numprocesses": 1}, dsession)), ["t"] * 37)
    assert dsession._max_worker_restart == 37 + 4
    # the user's --max-worker-restart stands
    dsession._max_worker_restart = 2
    isolation.pytest_xdist_node_collection_finished(
        _Node(_Config({"numprocesses": 1, "maxworkerrestart": "2"}, dsession)), ["t"] * 37)
    assert dsession._max_worker_restart == 2


def test_xdist_still_keeps_its_restart_limit_where_isolation_raises_it():
    import inspect

    from xdist.dsession import DSession

    # a private attribute of pytest-xdist (pinned in constraints.txt): fail loudly if it moves
    assert "self._max_worker_restart" in inspect.getsource(DSession)


def _crash_report(nodeid, node):
    # as xdist's DSession.handle_crashitem makes it
    report = pytest.TestReport(nodeid=nodeid, location=(nodeid.split("::")[0], None, nodeid.split("::")[0]),
                               keywords={}, outcome="failed", longrepr="worker 'gw0' crashed", when="???")
    report.node = node
    return report


def test_crash_report_from_what_the_worker_left(tmp_path):
    from qref import isolation

    config = _Config({"qref_flow": "pt2e"})
    node = _Node(config)
    isolation.pytest_configure_node(node)
    directory = Path(node.workerinput["qref_isolation_dir"])
    try:
        nodeid = "properties/test_contract.py::test_no_observer_left"
        (directory / "gw0.json").write_text(json.dumps({"nodeid": nodeid, "family": "contract",
                                                        "property": "no_observer_left", "tier": "ops", "flow": "pt2e"}))
        (directory / "gw0.state").write_bytes(bytes([2, 1]))  # in the call, inside the converter
        (directory / "gw0.fault").write_text(SEGFAULT_DUMP + '  File "conv.py", line 3 in lower\n\nExtension modules: x\n')
        report = _crash_report(nodeid, node)
        isolation.pytest_handlecrashitem(crashitem=nodeid, report=report, sched=None)
        lines = report.longrepr.splitlines()
        # no exit status from a stand-in gateway: the faulthandler dump names the signal
        assert lines[0] == "converter crashed the process: Segmentation fault"
        assert '  File "conv.py", line 3 in lower' in lines and "Extension modules: x" not in lines
        assert report.when == "call" and report.location[2] == "test_no_observer_left"
        assert report.qref == {"family": "contract", "property": "no_observer_left", "tier": "ops",
                               "flow": "pt2e", "expectation": None}
        assert not list(directory.iterdir())  # consumed: the next worker starts clean

        # nothing left (the worker died before writing): the family from the module's name
        other = "properties/test_equivalence.py::test_model_matches_reference[True]"
        report = _crash_report(other, node)
        isolation.pytest_handlecrashitem(crashitem=other, report=report, sched=None)
        assert report.longrepr.splitlines()[0].startswith("the process running it ended without a Python error")
        assert report.qref["family"] == "equivalence" and report.qref["property"] == "model_matches_reference"
        assert report.qref["flow"] == "pt2e"  # the run's flow
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
