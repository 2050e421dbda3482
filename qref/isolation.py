"""Run the property suite in pytest-xdist workers so that a converter that crashes its process
fails the property that was running, and the run carries on in a new worker.

``qref check`` loads this plugin and runs one worker (``-n 1``) unless its pytest arguments
choose otherwise; with plain pytest: ``pytest -p qref.isolation -n 1 ...``.  Without a worker
(no ``-n``) it does nothing.

What a converter can do to its process, and what the suite then reports for the property that
was running:

* ``sys.exit()``, or leaving torch's global settings changed: caught in the process by
  :func:`qref.converters.call_guarded` (kinds ``exited``, ``changed-global-state``; the settings
  are restored), nothing here is involved;
* a fatal signal (SIGSEGV in a native lowering, SIGABRT from a failed C++ check, ...), SIGKILL
  (e.g. the out-of-memory killer) or ``os._exit()``: the worker dies; xdist reports the test it
  was running as failed and starts a new worker for the rest.  This plugin rewrites that report:
  ``converter crashed the process (signal 11): Segmentation fault`` when the converter was
  running, or that the process died elsewhere (in the converted model or the property), with the
  Python traceback of the crash, and files it under the property's family and tier in the
  conformance table.

How the controller knows: each worker keeps three files named by its id in a directory it shares
with the controller, which outlive any death of the process: ``<id>.fault``, the ``faulthandler``
dump of a fatal signal; ``<id>.state``, two memory-mapped bytes saying which phase of the test is
running and whether the converter is being called; ``<id>.json``, the running test's family,
property, tier and flow.  The worker's exit status comes from its ``Popen``.  Costs: the
worker's start-up (it imports torch again, 2-3 s here), a small file write per test, and two
byte writes per converter call.

xdist restarts at most ``4 × workers`` crashed workers by default; once the first worker has
collected the suite, this plugin allows one crash per test (unless ``--max-worker-restart`` is
given), so that a converter that crashes every property still gets every property reported.
A crash before collection (e.g. while importing the converter) keeps xdist's limit.
"""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

import pytest

__all__ = ["crash_message"]

_DIR_KEY = "qref_isolation_dir"  # workerinput: the directory shared with the controller
_DIR = pytest.StashKey[str]()  # controller: that directory
_WORKER = pytest.StashKey[object]()  # worker: its _WorkerState

_PHASES = {1: "setup", 2: "call", 3: "teardown"}
_PHASE_CODE = {name: code for code, name in _PHASES.items()}
_FAMILIES_BY_MODULE = {"primitives", "equivalence", "folding", "kernels", "contract"}


# --- in each worker ------------------------------------------------------------------------------


class _WorkerState:
    def __init__(self, directory: Path, worker_id: str) -> None:
        import faulthandler
        import mmap

        self.info_path = directory / f"{worker_id}.json"
        # faulthandler writes to the file descriptor directly when a fatal signal arrives
        self.fault_file = open(directory / f"{worker_id}.fault", "w")  # noqa: SIM115 - open until exit
        faulthandler.enable(file=self.fault_file, all_threads=True)
        state_path = directory / f"{worker_id}.state"
        state_path.write_bytes(b"\0\0")
        with open(state_path, "r+b") as f:
            self.state = mmap.mmap(f.fileno(), 2)  # byte 0: phase, byte 1: in the converter

    def converter_call(self, entering: bool) -> None:
        self.state[1] = 1 if entering else 0


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin has pointed it at stderr
def pytest_configure(config: pytest.Config) -> None:
    directory = getattr(config, "workerinput", {}).get(_DIR_KEY)
    if directory is None:
        return
    from qref.converters import observe_calls

    worker = config.stash[_WORKER] = _WorkerState(Path(directory), config.workerinput["workerid"])
    observe_calls(worker.converter_call)


def pytest_unconfigure(config: pytest.Config) -> None:
    worker = config.stash.get(_WORKER, None)
    if worker is not None:
        from qref.converters import observe_calls

        observe_calls(None)
    directory = config.stash.get(_DIR, None)
    if directory is not None:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    worker = item.config.stash.get(_WORKER, None)
    if worker is not None:
        worker.info_path.write_text(json.dumps(_item_info(item)))
    yield
    if worker is not None:
        worker.state[0] = 0


def _set_phase(item: pytest.Item, phase: str) -> None:
    worker = item.config.stash.get(_WORKER, None)
    if worker is not None:
        worker.state[0] = _PHASE_CODE[phase]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _set_phase(item, "setup")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _set_phase(item, "call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _set_phase(item, "teardown")


def _marker_arg(item: pytest.Item, name: str) -> str | None:
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("name")


def _item_info(item: pytest.Item) -> dict:
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    return {
        "nodeid": item.nodeid,
        "family": _marker_arg(item, "qref_family"),
        "property": name.removeprefix("test_"),
        "tier": _marker_arg(item, "qref_tier"),
        "flow": _marker_arg(item, "qref_flow"),
    }


# --- in the controller (pytest-xdist hooks) ---------------------------------------------------------


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    config = node.config
    if _DIR not in config.stash:
        config.stash[_DIR] = tempfile.mkdtemp(prefix="qref-isolation-")
    node.workerinput[_DIR_KEY] = config.stash[_DIR]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    config = node.config
    if config.getoption("maxworkerrestart", None) is not None:
        return  # the user's limit
    session = config.pluginmanager.get_plugin("dsession")
    limit = getattr(session, "_max_worker_restart", None)  # xdist's (4 x workers by default)
    if isinstance(limit, int):
        workers = config.getoption("numprocesses", None) or 1
        session._max_worker_restart = max(limit, len(ids) + 4 * int(workers))


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report, sched) -> None:
    node = getattr(report, "node", None)
    config = getattr(node, "config", None)
    directory = config.stash.get(_DIR, None) if config is not None else None
    if directory is None:
        return
    worker_id = node.workerinput.get("workerid") or node.gateway.id
    found = _collect(Path(directory), worker_id)
    info = found["info"] if (found["info"] or {}).get("nodeid") == crashitem else _info_from_nodeid(crashitem)
    if info.get("flow") is None:
        info["flow"] = config.getoption("qref_flow", None)
    message = crash_message(_exit_status(node), found["in_converter"], found["fault"])
    details = [f"(worker {worker_id} died while running {crashitem}"
               + (f", in {found['phase']}" if found["phase"] else "") + "; a new worker runs the rest)"]
    traceback = _current_thread(found["fault"])
    if traceback:
        details += ["", *traceback]
    report.longrepr = "\n".join([message, *details])
    report.when = found["phase"] or "call"
    path, _, name = crashitem.partition("::")
    report.location = (path, None, name or path)  # the FAILURES header names the test
    report.qref = {
        "family": info.get("family"),
        "property": info.get("property"),
        "tier": info.get("tier"),
        "flow": info.get("flow"),
        "expectation": None,
    }


def _collect(directory: Path, worker_id: str) -> dict:
    """What the dead worker left: the running test, its phase, whether the converter ran, the
    faulthandler dump.  The files are removed (the replacement worker gets another id)."""
    found = {"info": None, "phase": None, "in_converter": False, "fault": ""}
    info, state, fault = (directory / f"{worker_id}{ext}" for ext in (".json", ".state", ".fault"))
    try:
        found["info"] = json.loads(info.read_text())
    except (OSError, ValueError):
        pass
    try:
        data = state.read_bytes()
        found["phase"] = _PHASES.get(data[0]) if data else None
        found["in_converter"] = len(data) > 1 and data[1] == 1
    except OSError:
        pass
    try:
        found["fault"] = fault.read_text(errors="replace")
    except OSError:
        pass
    for path in (info, state, fault):
        try:
            path.unlink()
        except OSError:
            pass
    return found


def _exit_status(node) -> int | None:
    """The worker process's exit status (negative: the signal that ended it), if known."""
    import subprocess

    popen = getattr(getattr(node.gateway, "_io", None), "popen", None)  # execnet's popen gateway
    if popen is None:
        return None
    try:
        return popen.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return None


def _info_from_nodeid(nodeid: str) -> dict:
    """The family and property of a test id, when the worker could not say (the module
    ``test_<family>.py`` of the suite names its family)."""
    path, _, rest = nodeid.partition("::")
    module = Path(path).stem.removeprefix("test_")
    name = rest.split("::")[-1].split("[")[0]
    return {
        "nodeid": nodeid,
        "family": module if module in _FAMILIES_BY_MODULE else None,
        "property": name.removeprefix("test_") or None,
        "tier": None,
        "flow": None,
    }


def _fatal_error(fault: str) -> str | None:
    for line in fault.splitlines():
        if line.startswith("Fatal Python error:"):
            return line.removeprefix("Fatal Python error:").strip() or None
    return None


def crash_message(status: int | None, in_converter: bool, fault: str = "") -> str:
    """One line on how a worker died: ``status`` is its exit status (negative: killed by that
    signal; ``None``: unknown), ``in_converter`` whether the converter was running, ``fault``
    faulthandler's dump (its first line names a fatal signal)."""
    what = _fatal_error(fault)
    if status is not None and status < 0:
        number = -status
        if number == getattr(signal, "SIGKILL", None):
            during = "while the converter was running" if in_converter else "outside the converter call"
            return (f"the process was killed (signal {number}) {during}: from outside, e.g. by the "
                    f"out-of-memory killer")
        described = what or _signal_name(number)
        if in_converter:
            return f"converter crashed the process (signal {number}): {described}"
        return (f"the process crashed (signal {number}: {described}) outside the converter call "
                f"(running the converted model, or the property itself)")
    if what:  # faulthandler saw a fatal signal but the status is unknown
        where = "converter crashed the process" if in_converter else "the process crashed outside the converter call"
        return f"{where}: {what}"
    if status is not None:  # exited on its own, with no Python error: os._exit() or C exit()
        how = f"with exit status {status}, without a Python error (os._exit({status}) or a C exit())"
    else:
        how = "without a Python error (os._exit(), or a signal such as SIGKILL)"
    if in_converter:
        return f"converter ended the process {how}"
    return f"the process running it ended {how}, outside the converter call"


def _signal_name(number: int) -> str:
    try:
        return signal.strsignal(number) or signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _current_thread(fault: str, limit: int = 12) -> list[str]:
    """The crashing thread's stack from a faulthandler dump (most recent call first), cut."""
    lines = fault.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        return []
    block = []
    for line in lines[start:]:
        if block and not line.startswith("  "):
            break
        block.append(line)
    return block[: limit + 1] + (["  ..."] if len(block) > limit + 1 else [])

