"""The plugin's command-line options, in one group, and the markers it registers.

Any ``--qref-*`` option switches the plugin on; without one it only declares these (inert)."""

from __future__ import annotations

import pytest

from qref import report as _report
from qref.expectations import TOLERANCE_MARKER

PROFILES = ("quick", "default", "thorough")
FLOWS = ("pt2e", "fx")
TIERS = _report.TIERS
FAMILIES = _report.FAMILIES
PROFILE_ENV = "QREF_PROFILE"

# option dest -> flag; any of them switches the plugin on
OPTIONS = {
    "qref_converter": "--qref-converter",
    "qref_flow": "--qref-flow",
    "qref_profile": "--qref-profile",
    "qref_engine": "--qref-engine",
    "qref_report": "--qref-report",
    "qref_html": "--qref-html",
    "qref_artifacts": "--qref-artifacts",
    "qref_expectations": "--qref-expectations",
    "qref_expected_as_skip": "--qref-expected-as-skip",
    "qref_seed": "--qref-seed",
    "qref_timeout": "--qref-timeout",
}
MARKERS = (
    "qref_family(name): property family: " + ", ".join(FAMILIES),
    "qref_tier(name): tier, run in this order: " + " < ".join(TIERS),
    "qref_flow(name): the conversion flow a test checks: pt2e or fx (absent: flow independent)",
    f"{TOLERANCE_MARKER}(n): tolerance override in LSB from an expectations entry",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qref", "qref: check a quantization converter against the property suite")
    group.addoption(
        "--qref-converter",
        metavar="TARGET",
        help="converter to check: qref-pt2e, torchao-pt2e, qref-fx, torch-fx, module:attribute, "
        "or a name registered under the entry-point group qref.converters",
    )
    group.addoption(
        "--qref-flow",
        choices=FLOWS,
        help="conversion flow (inferred from the converter when possible); tests of the other flow "
        "are deselected",
    )
    group.addoption(
        "--qref-profile",
        choices=PROFILES,
        help=f"Hypothesis profile of the suite (sets ${PROFILE_ENV}); --hypothesis-profile wins",
    )
    group.addoption(
        "--qref-engine",
        action="append",
        metavar="NAME",
        help="quantized engine to exercise (repeatable; default: every engine that runs here)",
    )
    group.addoption("--qref-report", metavar="FILE.json", help="write the conformance report as JSON")
    group.addoption("--qref-html", metavar="FILE.html",
                    help="write the conformance report as one self-contained HTML page (failures with their "
                    "model code, first divergence and a plot of the error at each quantize point)")
    group.addoption(
        "--qref-artifacts",
        metavar="DIR",
        help="write DIR/<test>/repro.py and inputs.pt for each failing test that recorded a reproducer",
    )
    group.addoption(
        "--qref-expectations",
        metavar="FILE",
        help="TOML file of expected failures / tolerance overrides, each with a mandatory reason",
    )
    group.addoption(
        "--qref-expected-as-skip",
        action="store_true",
        default=False,
        help="skip expected failures instead of running them as xfail (saves shrinking time)",
    )
    group.addoption("--qref-seed", type=int, metavar="N", help="Hypothesis seed (as --hypothesis-seed N)")
    group.addoption(
        "--qref-timeout",
        type=float,
        metavar="S",
        help="time limit in seconds for one converter call (fixture qref_timeout)",
    )


def active(config: pytest.Config) -> bool:
    return any(config.getoption(dest, None) not in (None, False, []) for dest in OPTIONS)


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")
