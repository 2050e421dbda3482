"""Hypothesis profiles for qref's property suite.

Profiles: ``quick`` (20 examples, the default for now), ``default`` (100), ``thorough`` (1000).
Choose with ``QREF_PROFILE=<name>``; ``--hypothesis-profile=<name>`` still works and wins.
All profiles: no deadline (kernels on a loaded machine), ``print_blob=True`` so a failure prints
a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("quick", max_examples=20, **_COMMON)
settings.register_profile("default", max_examples=100, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("QREF_PROFILE", "quick"))
