"""``qref check``'s console: a header, live progress per property, the conformance table, and a
short message per failure with the path of its reproducer; pytest's own lines (session header,
result letters, warnings summary, tracebacks) stay out.

``qref check`` loads it (``-p qref.plugin.console``) unless ``-v`` asks for pytest's output;
with plain pytest add ``-p qref.plugin.console`` to an active run.  Progress crosses from the
processes that run the properties (pytest-xdist workers too) through small files: each example a
property runs updates ``<dir>/<pid>.json`` (at most twice a second), and the controller shows the
running property with its examples compared so far: a line redrawn in place on a terminal,
plain lines otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .session import pytest_report_header, state_of

PROGRESS_ENV = "QREF_PROGRESS_DIR"
_PLAIN_EVERY = 30.0  # seconds between "still running" lines without a terminal
_WRITE_EVERY = 0.5  # seconds between progress writes of one process


def progress_writer(nodeid: str):
    """A ``Tally`` callback writing its counts for the console, or None when no console listens."""
    directory = os.environ.get(PROGRESS_ENV)
    if not directory or not os.path.isdir(directory):
        return None
    path = Path(directory, f"{os.getpid()}.json")
    last = [0.0]

    def write(tally) -> None:
        now = time.monotonic()
        if now - last[0] < _WRITE_EVERY:
            return
        last[0] = now
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodeid": nodeid, "compared": tally.compared, "drawn": tally.drawn}))
        os.replace(tmp, path)

    return write


@pytest.hookimpl(trylast=True)  # after the plugin's own configure (it makes the session active)
def pytest_configure(config: pytest.Config) -> None:
    if state_of(config) is None or hasattr(config, "workerinput"):
        return  # inactive, or an xdist worker: the controller's console shows everything
    config.pluginmanager.register(Console(config), "qref-console")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config):
    """pytest's own lines out, before its terminal reporter reads the options: no session header,
    no result letters (see Console.pytest_report_teststatus), no warnings summary, no tracebacks
    (each failure's message is printed after the table), no short summary."""
    option = config.option
    option.verbose = min(getattr(option, "verbose", 0), -2)  # -2: no "N passed in T s" line either
    option.no_header = True
    option.disable_warnings = True
    option.tbstyle = "no"
    option.reportchars = "N"


def _silence_xdist_status(config: pytest.Config) -> None:
    """pytest-xdist's "bringing up nodes..." and worker status lines out (the progress line says
    what runs); its other messages (a node going down) stay."""
    reporter = config.pluginmanager.get_plugin("terminaldistreporter")
    if reporter is not None:
        reporter.ensure_show_status = lambda: None
        reporter.rewrite = lambda *args, **kwargs: None


class Console:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.directory = tempfile.mkdtemp(prefix="qref-progress-")
        os.environ[PROGRESS_ENV] = self.directory  # xdist workers start later and inherit it
        # the terminal itself (a copy of stdout's descriptor, taken while pytest does not capture):
        # tests that run in this process have stdout captured while the progress line is redrawn
        self.tty = _isatty(sys.stdout)
        self.terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w") if self.tty else None
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.total: int | None = None
        self.finished = 0
        self.running: dict[str, float] = {}  # nodeid -> start
        self.worst: dict[str, str] = {}  # nodeid -> worst outcome of its phases so far
        self.tallies: dict[str, dict] = {}  # nodeid -> examples drawn and compared (call phase)
        self.drawn_line = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, name="qref-console", daemon=True)

    # --- pytest's own lines out -------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_report_teststatus(self, report, config):
        outcome = yield
        result = outcome.get_result()
        if result:  # keep the category (pytest counts it), drop the letter and the word
            outcome.force_result((result[0], "", ""))

    # --- header and progress ----------------------------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        _silence_xdist_status(self.config)
        for line in pytest_report_header(self.config) or []:
            self._line(line)
        workers = self.config.getoption("numprocesses", None)
        if workers and self.config.pluginmanager.hasplugin("qref.isolation"):
            self._line(f"qref: the suite runs in {workers} isolated worker process{'es' if workers > 1 else ''}: "
                       "a converter that crashes one fails only the property it was running")
        self.thread.start()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.total = len(session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self.total = len(ids)

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        with self.lock:
            self.running[nodeid] = time.monotonic()

    @pytest.hookimpl(trylast=True)  # after the controller has taken the report in
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = "xfailed" if getattr(report, "wasxfail", None) is not None and report.skipped else report.outcome
        previous = self.worst.get(report.nodeid, "passed")
        self.worst[report.nodeid] = outcome if previous == "passed" else previous
        tally = (getattr(report, "qref", None) or {}).get("tally")
        if tally:
            self.tallies[report.nodeid] = tally
        if report.when != "teardown":
            return
        with self.lock:
            start = self.running.pop(report.nodeid, time.monotonic())
            self.finished += 1
        tally = self.tallies.pop(report.nodeid, None)
        status = self._status(report.nodeid)
        compared = f"{tally['compared']}/{tally['drawn']} compared" if tally else ""
        self._line(f"{status:<13} {_short(report.nodeid):<55} {compared:>14}  {time.monotonic() - start:6.1f} s")

    def _status(self, nodeid: str) -> str:
        outcome = self.worst.pop(nodeid, "passed")
        state = state_of(self.config)
        found = next((o for o in state.outcomes.outcomes() if o.nodeid == nodeid), None) if state else None
        return found.status if found is not None else outcome

    def _tick(self) -> None:
        last_plain = time.monotonic()
        while not self.stop.wait(0.5):
            with self.lock:
                running = dict(self.running)
            if not running:
                continue
            nodeid, start = min(running.items(), key=lambda kv: kv[1])
            counts = self._progress(nodeid)
            elapsed = time.monotonic() - start
            done = f"{self.finished}/{self.total}" if self.total else str(self.finished)
            text = (f"[{done}] {_short(nodeid)}  {counts[0]}/{counts[1]} compared so far  {elapsed:.0f} s"
                    if counts else f"[{done}] {_short(nodeid)}  {elapsed:.0f} s")
            if self.tty:
                self._redraw(_bar(self.finished, self.total) + " " + text)
            elif time.monotonic() - last_plain >= _PLAIN_EVERY:
                last_plain = time.monotonic()
                self._line(f"... running {text}")

    def _progress(self, nodeid: str):
        for path in Path(self.directory).glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("nodeid") == nodeid:
                return data["compared"], data["drawn"]
        return None

    # --- after the table: one short message per failure ---------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        self._stop()
        state = state_of(self.config)
        failing = [o for o in state.outcomes.outcomes() if o.status in ("failed", "not exercised")]
        if not failing:
            return
        terminalreporter.write_sep("-", "failures")
        for o in failing:
            terminalreporter.write_line(f"{o.status}: {o.family}/{_short(o.nodeid)}", red=True, bold=True)
            for line in _head(o.message or o.reason or "", 8):
                terminalreporter.write_line(f"    {line}")
            if o.artifact:
                terminalreporter.write_line(f"    reproducer: {o.artifact}/repro.py (run it to see the verdict again)")
            elif o.reproducer:
                terminalreporter.write_line("    reproducer: rerun with --artifacts DIR to write it")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self._stop()

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        state = state_of(config)
        if state is not None:
            counts = _report_counts(state)
            bad = {k: n for k, n in counts.items() if n and k in ("failed", "not exercised", "not run")}
            expected = f" ({counts['xfailed']} expected failures)" if counts.get("xfailed") else ""
            verdict = (", ".join(f"{n} {k}" for k, n in bad.items()) if bad
                       else f"every property holds{expected}" if sum(counts.values()) else "no property ran")
            if state.coverage_missing:
                verdict += "; required coverage never compared: " + ", ".join(state.coverage_missing)
            self._line(f"qref verdict: {verdict} ({time.monotonic() - self.started:.0f} s)")
        self._cleanup()

    def _cleanup(self) -> None:
        if self.terminal is not None:
            self.terminal.close()
            self.terminal = None
        if os.environ.get(PROGRESS_ENV) == self.directory:
            del os.environ[PROGRESS_ENV]
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- writing ----------------------------------------------------------------------------------

    def _stop(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self._redraw(None)

    def _writer(self):
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _line(self, text: str) -> None:
        tr = self._writer()
        with self.lock:
            self._clear()
            if tr is not None:
                tr.write_line(text)

    def _clear(self) -> None:
        if self.drawn_line:
            self.terminal.write("\r\x1b[2K")
            self.terminal.flush()
            self.drawn_line = False

    def _redraw(self, text: str | None) -> None:
        if self.terminal is None:
            return
        with self.lock:
            if text is None:
                self._clear()
                return
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.terminal.write("\r\x1b[2K" + text[:width])
            self.terminal.flush()
            self.drawn_line = True


def _isatty(stream) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a captured or replaced stdout
        return False


def _report_counts(state) -> dict:
    from qref import report

    return report.counts(state.outcomes.outcomes())


def _short(nodeid: str) -> str:
    """``.../test_x.py::test_name[p]`` -> ``name[p]``."""
    return nodeid.split("::")[-1].removeprefix("test_")


def _head(text: str, n: int) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[:n] + ([f"... ({len(lines) - n} more lines in the JSON report)"] if len(lines) > n else [])


def _bar(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return "[" + " " * width + "]"
    filled = round(width * min(done, total) / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"
