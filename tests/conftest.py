"""Shared fixtures for qref's own tests.

* ``prepared_cache`` (session): each (zoo model, setup) is exported, prepared
  and calibrated once per session; ``get`` returns a deep copy every call, so
  a converter may mutate what it receives.
* torchao's pattern-graph exports are memoised for the session
  (``qref._torchao_patterns``; ``QREF_NO_PATTERN_CACHE=1`` disables it):
  without it every torchao QAT ``convert_pt2e`` costs ~25 s.
* ``@pytest.mark.slow`` tests are skipped unless ``--run-slow`` or
  ``QREF_RUN_SLOW=1``.
"""

from __future__ import annotations

import copy
import os

import pytest

from qref import _torchao_patterns as torchao_patterns

torchao_patterns.enable()


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (or set QREF_RUN_SLOW=1)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("QREF_RUN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or QREF_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class PreparedCache:
    """Session store of prepared models, keyed by (model, setup, prepare kwargs)."""

    def __init__(self) -> None:
        self._store: dict = {}

    def get(self, model_name: str, setup_name: str, **prepare_kwargs):
        """A deep copy of ``fixtures.prepare.prepare(model_name, setup_name, **kw)``."""
        from fixtures.prepare import prepare
        from qref._quiet import silence_noise

        silence_noise()  # deepcopy of exported modules warns about LeafSpec
        key = (model_name, setup_name, tuple(sorted(prepare_kwargs.items())))
        if key not in self._store:
            self._store[key] = prepare(model_name, setup_name, **prepare_kwargs)
        return copy.deepcopy(self._store[key])

    def __contains__(self, key) -> bool:
        return any(k[:2] == tuple(key) for k in self._store)


@pytest.fixture(scope="session")
def prepared_cache() -> PreparedCache:
    return PreparedCache()
