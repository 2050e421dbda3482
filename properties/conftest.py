"""Hypothesis profiles of qref's property suite (fixtures come from the plugin and ``_support``).

Profiles: ``quick`` (the default), ``default``, ``thorough``; ``--qref-profile`` (or
``QREF_PROFILE``) chooses one, ``--hypothesis-profile`` still wins.  A profile sets
``max_examples`` for the cheap primitive properties; model-level properties scale from it
(see ``_support.budget``).  All profiles: no deadline (kernels on a loaded machine),
``print_blob=True`` so a failure prints a ``@reproduce_failure`` blob, and no health check
for function-scoped fixtures: ``subject`` deliberately lives across a test's examples (it
remembers a converter that hung so shrinking does not wait for it again).  A seeded run
(``--seed``/``--hypothesis-seed``) does not use the example database, so it is repeatable.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.internal.conjecture import engine as _engine

from ._support import PROFILES

# Shrinking a model-level failure re-exports and re-prepares a model at every step; Hypothesis'
# own cap is 300 s per failing test.  QREF_SHRINK_SECONDS (default 20) caps it: the failure is
# reported as far as it shrank by then (the verdict is the same; only the case may be larger).
SHRINK_SECONDS = float(os.environ.get("QREF_SHRINK_SECONDS", "20"))
assert hasattr(_engine, "MAX_SHRINKING_SECONDS"), "Hypothesis moved its shrink deadline: see tests/test_plugin.py"
_engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS

# QREF_SHRINK=0 drops the shrink phase: a failure is reported with the example as found. For
# runs that only need the verdict (the mutant-kill test); shrinking re-prepares many models.
_PHASES = [p for p in Phase if p is not Phase.shrink or os.environ.get("QREF_SHRINK", "1") != "0"]
_COMMON = dict(
    deadline=None,
    phases=_PHASES,
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
    if config.getoption("hypothesis_seed", None) is not None:
        # A seeded run gives the same verdict everywhere only if it neither replays nor stores
        # examples of earlier runs (the database would differ between machines and runs).
        settings.register_profile(name, parent=settings.get_profile(name), database=None)
    settings.load_profile(name)
