"""The fixtures the suite needs: the converter under test, its engines, its time limit and an
expectations entry's tolerance override (a project embedding the suite may override them)."""

from __future__ import annotations

import pytest

from .options import FLOWS
from .selection import marker_arg
from .session import DEFAULT_CONVERTERS, engines_here, state_of


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def qref_converter(request: pytest.FixtureRequest):
    """The converter under test (a :class:`qref.converters.Converter`).

    ``--qref-converter`` when given; else the default for the test's ``qref_flow`` marker
    (qref-pt2e / qref-fx).  A conftest may override this fixture to embed the suite.
    """
    state = state_of(request.config)
    if state is not None and state.converter is not None:
        return state.converter
    flow = marker_arg(request.node, "qref_flow") or (state.flow if state is not None else None)
    if flow not in FLOWS:
        pytest.fail(
            f"{request.node.nodeid} uses qref_converter without a qref_flow marker: "
            "mark it @pytest.mark.qref_flow('pt2e') or ('fx')",
            pytrace=False,
        )
    from qref.converters import DEFAULT_FOR_FLOW, resolve

    cache = request.config.stash.setdefault(DEFAULT_CONVERTERS, {})
    if flow not in cache:
        cache[flow] = resolve(DEFAULT_FOR_FLOW[flow], flow)
    return cache[flow]


@pytest.fixture(scope="session")
def qref_engines(request: pytest.FixtureRequest) -> list[str]:
    """The quantized engines to exercise: ``--qref-engine`` values, else every engine that runs here."""
    state = state_of(request.config)
    return list(state.engines) if state is not None else engines_here()


@pytest.fixture(scope="session")
def qref_timeout(request: pytest.FixtureRequest) -> float | None:
    """Seconds one converter call may take (``--qref-timeout``), or ``None`` for no limit."""
    return request.config.getoption("qref_timeout", None)


@pytest.fixture
def qref_tolerance_override(request: pytest.FixtureRequest):
    """The ``max_lsb`` an expectations entry sets for this test, or ``None``."""
    from qref.expectations import qref_tolerance_override as override

    return override(request)
