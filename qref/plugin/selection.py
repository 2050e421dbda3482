"""Which tests run, in which order: the other flow deselected, tiers in order (primitives < ops <
patterns < models), and higher tiers gated by a lower-tier failure of the same flow, also across
pytest-xdist workers (they share failures through a directory the controller hands them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qref import report as _report

from .expected import apply_default_expectations, apply_expectations
from .session import State, state_of

TIERS = _report.TIERS


def marker_arg(item: pytest.Item, name: str) -> str | None:
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("name")


def tier_rank(tier: str | None) -> int:
    # Tests without a tier run after the tiered ones and neither gate nor are gated.
    return TIERS.index(tier) if tier in TIERS else len(TIERS)


@pytest.hookimpl(tryfirst=True)  # see every collected test, before -k/-m deselect some
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    state = state_of(config)
    if state is None:
        apply_default_expectations(items)
        return
    apply_expectations(config, state, items)
    if state.flow is not None:
        keep, drop = [], []
        for item in items:
            flow = marker_arg(item, "qref_flow")
            (drop if flow is not None and flow != state.flow else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    items.sort(key=lambda item: tier_rank(marker_arg(item, "qref_tier")))  # stable within a tier


# --- running: tier gating, per-test data on the reports, artifacts ----------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = state_of(item.config)
    if state is None:
        return
    rank = tier_rank(marker_arg(item, "qref_tier"))
    flow = marker_arg(item, "qref_flow")
    for failed_rank, failed_tier, failed_flow, nodeid in sorted(tier_failures(state)):
        if failed_rank < rank and (failed_flow is None or flow is None or failed_flow == flow):
            skip_at_item(f"{_report.NOT_RUN_PREFIX}{nodeid} failed (tier {failed_tier})")


def add_tier_failure(state: State, failure: tuple) -> None:
    state.failures.append(failure)
    if state.failures_dir is not None:  # tell the other xdist workers (written whole, then renamed)
        path = Path(state.failures_dir, f"{os.getpid()}-{len(state.failures)}.json")
        path.with_suffix(".tmp").write_text(json.dumps(failure))
        os.replace(path.with_suffix(".tmp"), path)


def tier_failures(state: State) -> list[tuple]:
    """This process's lower-tier failures and, under xdist, those the other workers reported so far."""
    if state.failures_dir is None:
        return state.failures
    shared = [tuple(json.loads(p.read_text())) for p in Path(state.failures_dir).glob("*.json")]
    return state.failures + [f for f in shared if f not in state.failures]


def skip_at_item(reason: str) -> None:
    # Like a skip marker, report the test's location rather than this plugin's line.
    try:
        raise pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without _use_item_location
        pytest.skip(reason)
