"""The plugin's command-line options, in one group, and the markers it registers.

Any ``--qref-*`` option switches the plugin on; without one it only declares these (inert)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qref import report as _report
from qref.expectations import KNOWN_DEFECT_MARKER, TOLERANCE_MARKER

PROFILES = ("quick", "default", "thorough")
FLOWS = ("pt2e", "fx")
TIERS = _report.TIERS
FAMILIES = _report.FAMILIES
PROFILE_ENV = "QREF_PROFILE"

@dataclass(frozen=True)
class Option:
    """One option, declared once: ``--qref-NAME`` for pytest, ``--NAME`` for ``qref check``
    (which passes it on as ``--qref-NAME``)."""

    name: str
    help: str
    metavar: str | None = None
    choices: tuple | None = None
    type: type | None = None
    flag: bool = False  # given or not (store_true)
    repeat: bool = False  # may be given several times
    in_cli: bool = True  # qref check has it (the converter is its positional argument instead)

    @property
    def dest(self) -> str:
        return "qref_" + self.name.replace("-", "_")

    def kwargs(self, cli: bool = False) -> dict:
        if self.flag:
            return {"action": "store_true", "default": False, "help": self.help}
        kwargs = {"help": self.help, "metavar": self.metavar, "choices": self.choices, "type": self.type}
        if self.repeat:  # pytest: --qref-engine A --qref-engine B; qref check: --engine A B
            kwargs.update(action="extend", nargs="+") if cli else kwargs.update(action="append")
        return {k: v for k, v in kwargs.items() if v is not None}


OPTIONS = (
    Option("converter", "converter to check: qref-pt2e, torchao-pt2e, qref-fx, torch-fx, module:attribute, "
           "or a name registered under the entry-point group qref.converters", metavar="TARGET", in_cli=False),
    Option("flow", "conversion flow (inferred from the converter when possible); tests of the other flow are "
           "deselected", choices=FLOWS),
    Option("profile", f"Hypothesis profile: quick (20 examples per property), default (100), thorough (1000); "
           f"also ${PROFILE_ENV}; --hypothesis-profile wins", choices=PROFILES),
    Option("engine", "quantized engine(s) to exercise (default: every engine that runs here)", metavar="NAME",
           repeat=True),
    Option("backend", "pt2e: lower each converted model with this backend and compare its outputs "
           "(inductor, module:attr, or an entry point of qref.backends; see qref.backends)", metavar="NAME",
           repeat=True),
    Option("report", "write the conformance report as JSON", metavar="FILE.json"),
    Option("html", "write the conformance report as one self-contained HTML page (failures with their model "
           "code, first divergence and a plot of the error at each quantize point)", metavar="FILE.html"),
    Option("artifacts", "write DIR/<test>/repro.py and inputs.pt for each failing property", metavar="DIR"),
    Option("expectations", "TOML file of expected failures, tolerances and accepted not-exercised properties, "
           "each with a mandatory reason (qref check: qref's own list by default)", metavar="FILE"),
    Option("expected-as-skip", "skip expected failures instead of running them (saves shrinking time)", flag=True),
    Option("seed", "Hypothesis seed, for a repeatable run (as --hypothesis-seed N)", metavar="N", type=int),
    Option("coverage-at-least", "fail the run unless its compared examples covered each VALUE: an op (conv2d, "
           "linear, matmul, ...), an activation dtype, an observer, per-channel or per-tensor weights, or a stage "
           "('pt2e QAT'); the report lists every value", metavar="VALUE", repeat=True),
    Option("timeout", "time limit in seconds for one converter call (a hang fails the property)", metavar="S",
           type=float),
)
MARKERS = (
    "qref_family(name): property family: " + ", ".join(FAMILIES),
    "qref_tier(name): tier, run in this order: " + " < ".join(TIERS),
    "qref_flow(name): the conversion flow a test checks: pt2e or fx (absent: flow independent)",
    f"{TOLERANCE_MARKER}(n): tolerance override in LSB from an expectations entry",
    f"{KNOWN_DEFECT_MARKER}(failure, reason): an example on which the converter fails so is not compared",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qref", "qref: check a quantization converter against the property suite")
    for option in OPTIONS:
        group.addoption(f"--qref-{option.name}", dest=option.dest, **option.kwargs())


def active(config: pytest.Config) -> bool:
    """Any ``--qref-*`` option given switches the plugin on."""
    return any(config.getoption(option.dest, None) not in (None, False, []) for option in OPTIONS)


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")
