"""Per-test data on the reports, and the controller's conformance table and JSON report."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest

from qref import coverage
from qref import report as _report

from .artifacts import portable, write_artifact
from .expected import EXPECTATION, not_exercised_fails, unexpected_failure_fails
from .record import TALLY
from .selection import TIERS, add_tier_failure, marker_arg, tier_rank
from .session import FAILED, SHARED_FAILURES, State, converter_json, current_profile, example_database_in_use, state_of


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest's own xfail handling
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    unexpected_failure_fails(item, call, report)
    not_exercised_fails(item, call, report)
    # Tensors cannot travel to the xdist controller (nor into junitxml): reports carry metadata only.
    report.user_properties = [portable(k, v) for k, v in report.user_properties]
    state = state_of(item.config)
    if state is None:
        return
    tier = marker_arg(item, "qref_tier")
    flow = marker_arg(item, "qref_flow")
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    info = {
        "family": marker_arg(item, "qref_family"),
        "tier": tier,
        "flow": flow,
        "property": name.removeprefix("test_"),
        "expectation": item.stash.get(EXPECTATION, None),
    }
    tally = item.stash.get(TALLY, None)
    if tally is not None and report.when == "call":
        info["tally"] = tally.to_json()
    if report.failed:
        item.stash[FAILED] = True
        if tier in TIERS and not any(f[3] == item.nodeid for f in state.failures):
            add_tier_failure(state, (tier_rank(tier), tier, flow, item.nodeid))
    if report.when == "teardown" and item.stash.get(FAILED, False) and state.artifacts_dir is not None:
        artifact = write_artifact(state.artifacts_dir, item)
        if artifact is not None:
            info["artifact"] = str(artifact)
    # A plain attribute: xdist serialises the report's __dict__ to the controller.
    report.qref = info


class Controller:
    """Session-level hooks of an active plugin in the controlling process (no xdist worker).

    Under xdist every worker's TestReports reach this process through pytest_runtest_logreport,
    with the per-test data they carry (``report.qref``, ``report.user_properties``).
    """

    def __init__(self, config: pytest.Config, state: State) -> None:
        self.config = config
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.state.outcomes.add(report)
        info = getattr(report, "qref", None) or {}
        if report.failed and report.when == "call" and self.state.failures_dir is not None \
                and info.get("tier") in TIERS:
            # a worker that crashed could not tell the others: gate the higher tiers from here
            add_tier_failure(self.state, (tier_rank(info["tier"]), info["tier"], info.get("flow"), report.nodeid))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            error = _report.collection_error(report)
            if error not in self.state.collection_errors:  # each xdist worker reports it
                self.state.collection_errors.append(error)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        # pytest-xdist: a worker starts; give it the directory where workers share tier failures.
        if self.state.failures_dir is None:
            self.state.failures_dir = tempfile.mkdtemp(prefix="qref-tier-failures-")
        node.workerinput[SHARED_FAILURES] = self.state.failures_dir

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        # pytest-xdist: a worker finished; merge which expectations entries matched there.
        self.state.matched.update(getattr(node, "workeroutput", {}).get("qref_matched", ()))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        state = self.state
        covered = coverage.of_run(state.outcomes.outcomes())
        if state.coverage_required:
            state.coverage_missing = coverage.not_covered(state.coverage_required, covered)
            if state.coverage_missing and session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = exitstatus = pytest.ExitCode.TESTS_FAILED
        state.exit_status = int(exitstatus)
        if state.failures_dir is not None:
            shutil.rmtree(state.failures_dir, ignore_errors=True)
        if state.environment.get("profile") is None:
            state.environment["profile"] = current_profile(self.config)
        if state.environment.get("example_database") is None:
            state.environment["example_database"] = example_database_in_use()
        if state.report_path is None and state.html_path is None:
            return
        document = _report.build_json(
            converter=converter_json(state),
            environment=state.environment,
            outcomes=state.outcomes.outcomes(),
            expectations=self._expectations_json(),
            exit_status=int(exitstatus),
            collection_errors=state.collection_errors,
            coverage=dict(coverage.to_json(covered, coverage.known(state.flow)), required=state.coverage_required,
                          required_missing=state.coverage_missing),
        )
        if state.report_path is not None:
            state.report_path.parent.mkdir(parents=True, exist_ok=True)
            state.report_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        if state.html_path is not None:
            from qref.html_report import write

            write(json.loads(json.dumps(document, default=str)), state.html_path)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        state, tr = self.state, terminalreporter
        target = state.converter.target if state.converter is not None else "qref_converter fixture"
        tr.section(f"qref conformance: {target} ({state.flow or 'pt2e and fx'})")
        table = _report.rows(state.outcomes.outcomes())
        for line in _report.format_table(table, width=tr._tw.fullwidth):
            tr.write_line(line)
        covered = coverage.of_run(state.outcomes.outcomes())
        if covered:
            for line in coverage.matrix_lines(covered, coverage.known(state.flow)):
                tr.write_line(line)
        if state.coverage_missing:
            tr.write_line("coverage required by --coverage-at-least but never compared: "
                          + ", ".join(state.coverage_missing), red=True)
        for error in state.collection_errors:
            tr.write_line(f"not checked, could not collect {error['nodeid']}: {error['error']}", red=True)
        if state.converter is not None and state.converter.not_exercised:
            tr.write_line(
                "not exercised (the converter does not accept them): "
                + ", ".join(state.converter.not_exercised)
            )
        for e in self._unmatched():
            tr.write_line(f"qref expectation matched no test: test = {e.test!r} ({e.reason})", yellow=True)
        for e in self._occurred_nowhere():
            tr.write_line(f"qref expectation did not occur in any property it matches (anywhere = true; "
                          f"the upstream defect may be fixed, or this run drew no model that shows it): "
                          f"test = {e.test!r} ({e.reason})", yellow=True)
        if state.report_path is not None:
            tr.write_line(f"qref report: {state.report_path}")
        if state.html_path is not None:
            tr.write_line(f"qref html report: {state.html_path}")
        if state.artifacts_dir is not None and state.artifacts_dir.exists():
            tr.write_line(f"qref reproducers: {state.artifacts_dir}")

    def _unmatched(self) -> list:
        s = self.state
        return [e for e in s.expectations if e.index not in s.inactive and e.index not in s.matched]

    def _occurred_nowhere(self) -> list:
        """``anywhere`` entries that matched tests in none of whose examples the defect showed."""
        s = self.state
        from qref.expectations import KNOWN_DEFECT_PREFIX

        occurred = {cause for o in s.outcomes.outcomes() for cause in o.not_compared}
        return [e for e in s.expectations if e.anywhere and e.index in s.matched and e.index not in s.inactive
                and KNOWN_DEFECT_PREFIX + e.reason not in occurred]

    def _expectations_json(self) -> dict | None:
        state = self.state
        if not state.expectations_file:
            return None
        entries = []
        for e in state.expectations:
            d = e.to_json()
            if e.index in state.inactive:
                d["applies"], d["inactive_because"] = False, state.inactive[e.index]
            else:
                d["applies"], d["matched"] = True, e.index in state.matched
                if e.anywhere:
                    d["occurred"] = e not in self._occurred_nowhere()
            entries.append(d)
        return {
            "file": state.expectations_file,
            "as_skip": bool(self.config.option.qref_expected_as_skip),
            "entries": entries,
            "unmatched": [e.to_json() for e in self._unmatched()],
        }
