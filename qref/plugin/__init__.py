"""The pytest plugin for qref: check a converter against the property suite and report conformance.

Registered through the ``pytest11`` entry point, so it is loaded by every pytest session where qref
is installed.  It is therefore *inert* unless one of its ``--qref-*`` options is given: it only
declares its options, markers and fixtures, and it imports neither torch nor hypothesis when pytest
loads it (Hypothesis moved its own plugin out of its package for the same reason,
HypothesisWorks/hypothesis#3140).  All options live in this package (``options.py``), not in the suite's conftest: options
in a package conftest are unreliable (pytest#9337).

With an option it:

* resolves the converter (``--qref-converter``) at start-up and fails with a one-line usage error;
* prints a header: converter, flow, torch/torchao/qref versions, quantized engines, profile, seed;
* applies the expectations file (expected failures with reasons, tolerance overrides);
* deselects the tests of the other flow, runs the tiers in order (primitives < ops < patterns <
  models) and, once a test of a lower tier has failed in this process, skips the higher tiers of
  the same flow with "not run because <test> failed (tier <t>)";
* prints a conformance table (family × property) and writes ``--qref-report`` JSON, also under
  pytest-xdist: per-test data travels on the TestReport objects, never in ``config``;
* writes a reproducer directory per failing test that recorded one (``--qref-artifacts``).

Embedding the suite in a project's own tests: the project's test directory gets a conftest that
overrides the ``qref_converter`` fixture and modules that import the properties::

    # tests/conftest.py
    import pytest
    from qref.converters import resolve

    @pytest.fixture
    def qref_converter():
        return resolve("mypkg.lowering:convert", "pt2e")

    # tests/test_qref_equivalence.py
    from qref.properties.test_equivalence import *  # noqa: F401,F403

``pytest tests --qref-flow pt2e`` then also deselects the fx properties and prints the table.

The rooms: ``options`` (the command line), ``session`` (start-up, header, environment),
``selection`` (flow, tier order and gating), ``expected`` (expectations on the tests),
``record`` (what a property observed, examples compared), ``artifacts`` (reproducers),
``reporting`` (per-test data on the reports, the table and the JSON), ``fixtures``.
pytest loads this module (entry point ``pytest11``); it finds the hooks and fixtures below.
"""

from __future__ import annotations

from .expected import accept_not_exercised, expect_failure
from .fixtures import qref_converter, qref_engines, qref_timeout, qref_tolerance_override
from .options import pytest_addoption
from .record import QrefRecord, pytest_runtest_call, qref_record
from .reporting import pytest_runtest_makereport
from .selection import pytest_collection_modifyitems, pytest_runtest_setup
from .session import pytest_configure, pytest_load_initial_conftests, pytest_report_header, pytest_unconfigure

__all__ = [
    # public: what a project embedding the suite may use
    "QrefRecord", "accept_not_exercised", "expect_failure",
    # hooks and fixtures pytest finds here
    "pytest_addoption", "pytest_collection_modifyitems", "pytest_configure", "pytest_load_initial_conftests",
    "pytest_report_header", "pytest_runtest_call", "pytest_runtest_makereport", "pytest_runtest_setup",
    "pytest_unconfigure", "qref_converter", "qref_engines", "qref_record", "qref_timeout",
    "qref_tolerance_override",
]
