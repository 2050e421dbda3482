"""Expectations applied to the collected tests: expected failures (only with their message),
tolerance overrides, and properties allowed to compare no example; a passing property that
compared none is "not exercised"."""

from __future__ import annotations

import pytest

from qref import report as _report

from .options import is_worker
from .record import TALLY
from .session import State


def apply_expectations(config: pytest.Config, state: State, items: list) -> None:
    if not state.expectations:
        return
    active = [e for e in state.expectations if e.index not in state.inactive]
    as_skip = config.option.qref_expected_as_skip
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        xfail_done = tolerance_done = False
        for e in active:
            if not e.matches(item.nodeid, name):
                continue
            state.matched.add(e.index)
            if e.kind == "tolerance" and not tolerance_done:
                item.add_marker(pytest.mark.qref_max_lsb(e.max_lsb, reason=e.reason))
                tolerance_done = True
            elif e.kind == "known-defect":
                item.add_marker(pytest.mark.qref_known_defect(e.failure, reason=e.reason))
            elif e.kind == "not-exercised" and NOT_EXERCISED not in item.stash:
                accept_not_exercised(item, e)
            elif e.kind == "xfail" and not xfail_done:
                reason = f"{_report.EXPECTED_SKIP_PREFIX}{e.reason}"
                if as_skip:
                    item.add_marker(pytest.mark.skip(reason=reason))
                else:
                    expect_failure(item, e)
                xfail_done = True
            else:
                continue
            item.stash[EXPECTATION] = e.index
    if is_worker(config):  # the controller has no items under xdist: send what matched
        config.workeroutput["qref_matched"] = sorted(state.matched)


EXPECTATION = pytest.StashKey[int]()
EXPECTED_FAILURE = pytest.StashKey[object]()  # the Expectation an xfail came from
NOT_EXERCISED = pytest.StashKey[object]()  # the Expectation that accepts "not exercised"


def expect_failure(item: pytest.Item, entry) -> None:
    """Mark ``item`` as an expected failure of ``entry``; a failure with another message than
    the entry's ``failure`` (if it has one) is then reported as a real failure."""
    item.add_marker(pytest.mark.xfail(reason=entry.reason, strict=False))
    item.stash[EXPECTED_FAILURE] = entry


def _known_defect(item: pytest.Item, entry) -> None:
    item.add_marker(pytest.mark.qref_known_defect(entry.failure, reason=entry.reason))


def accept_not_exercised(item: pytest.Item, entry) -> None:
    """``item`` may compare no example, for the reason ``entry`` gives (reported, not failed)."""
    item.stash[NOT_EXERCISED] = entry


def unexpected_failure_fails(item: pytest.Item, call, report) -> None:
    """An expected failure whose message is not the entry's ``failure`` is a real failure."""
    entry = item.stash.get(EXPECTED_FAILURE, None)
    if entry is None or getattr(report, "wasxfail", None) is None or call.excinfo is None:
        return
    if entry.expects(str(call.excinfo.value)):
        return
    report.outcome = "failed"
    del report.wasxfail
    report.sections.append(("qref expectation", f"expected to fail with {entry.failure!r} ({entry.reason}), "
                                                f"but it failed otherwise: not an expected failure"))


def not_exercised_fails(item: pytest.Item, call, report) -> None:
    """A property that passed without comparing any example did not pass: it is "not exercised",
    a failure unless an expectations entry (``not_exercised = true``) names why."""
    tally = item.stash.get(TALLY, None)
    if report.when != "call" or tally is None or tally.exercised:
        return
    # every example rejected: Hypothesis fails with Unsatisfiable, which says less than the causes
    unsatisfiable = report.failed and call.excinfo is not None and call.excinfo.typename == "Unsatisfiable"
    if not (report.passed or unsatisfiable):
        return
    message = f"{_report.NOT_EXERCISED_PREFIX}{tally.summary()}"
    entry = item.stash.get(NOT_EXERCISED, None)
    if entry is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], f"{message}; expected: {entry.reason}")
        return
    report.outcome = "failed"
    report.longrepr = (f"{message}\n(every example lacked what the property checks; an expectations "
                       f"entry with not_exercised = true and a reason accepts this)")


def apply_default_expectations(items: list) -> None:
    """A run without ``--qref-*`` options (plain pytest of the suite, or a project embedding it)
    applies the default expectations to qref's properties, as ``qref check`` does: with their
    torch/torchao conditions; entries for a named converter do not apply to the fixture's."""
    properties = [item for item in items if item.get_closest_marker("qref_family") is not None]
    if not properties:
        return
    from importlib.resources import files

    from qref.expectations import load

    from .session import version

    entries = [e for e in load(files("qref") / "default_expectations.toml")
               if e.kind in ("xfail", "not-exercised", "known-defect")
               and e.inactive_because(version("torch"), None, None, version("torchao")) is None]
    apply = {"xfail": expect_failure, "not-exercised": accept_not_exercised, "known-defect": _known_defect}
    for item in properties:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        for kind, mark in apply.items():
            found = next((e for e in entries if e.kind == kind and e.matches(item.nodeid, name)), None)
            if found is not None:
                mark(item, found)
