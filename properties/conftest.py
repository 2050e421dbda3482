"""Hypothesis profiles and the ``subject`` fixture of qref's property suite.

Profiles: ``quick`` (the default), ``default``, ``thorough``; ``--qref-profile`` (or
``QREF_PROFILE``) chooses one, ``--hypothesis-profile`` still wins.  A profile sets
``max_examples`` for the cheap primitive properties; model-level properties scale from it
(see ``_support.budget``).  All profiles: no deadline (kernels on a loaded machine),
``print_blob=True`` so a failure prints a ``@reproduce_failure`` blob, and no health check
for function-scoped fixtures: ``subject`` deliberately lives across a test's examples (it
remembers a converter that hung so shrinking does not wait for it again).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from ._support import PROFILES, Subject

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
for _name, _budgets in PROFILES.items():
    settings.register_profile(_name, max_examples=_budgets["primitives"], **_COMMON)


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None):
        return  # --hypothesis-profile wins
    name = config.getoption("qref_profile", None) or os.environ.get("QREF_PROFILE", "quick")
    if name not in PROFILES:
        raise pytest.UsageError(f"unknown qref profile {name!r}: choose one of {', '.join(PROFILES)}")
    settings.load_profile(name)


@pytest.fixture
def subject(qref_converter, qref_timeout, qref_record):
    """The converter under test, called through the suite's guard (errors, hangs, bad results)."""
    return Subject(qref_converter, qref_timeout, qref_record)
