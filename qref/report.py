"""The conformance report: each test's outcome, the family × property table and the JSON document.

The plugin feeds pytest's test reports (or, under xdist, the controller's copies of them) to
:class:`Outcomes`; everything else here works on plain data.  Imports neither torch nor hypothesis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = [
    "FAMILIES",
    "SCHEMA_VERSION",
    "STATUSES",
    "TIERS",
    "Outcomes",
    "Row",
    "TestOutcome",
    "build_json",
    "format_table",
    "rows",
]

SCHEMA_VERSION = 3  # 2: compared/drawn examples, "not exercised"; 3: coverage
FAMILIES = ("primitives", "equivalence", "folding", "kernels", "contract")
TIERS = ("primitives", "ops", "patterns", "models", "architectures")
NOT_RUN_PREFIX = "not run because "
NOT_EXERCISED_PREFIX = "not exercised: "
EXPECTED_SKIP_PREFIX = "expected failure: "
# A skip whose reason starts so (an optional extra not installed, a profile that leaves the property
# out): the table shows the reason itself; the status stays "skipped", which all_hold allows.
SKIPPED_NOT_RUN_PREFIX = "not run"
# From worst to best: a row shows the worst status of its tests.  "not exercised": it passed
# without comparing a single example (a failure of the run, like "failed").
STATUSES = ("failed", "not exercised", "not run", "xfailed", "xpassed", "skipped", "passed")
# an expected failure that did not fail (expectations.DID_NOT_OCCUR, repeated: no import here)
_LABELS = {"xfailed": "expected failure",
           "xpassed": "did not occur: the upstream defect may be fixed; narrow or remove this entry"}


@dataclass
class TestOutcome:
    """What happened to one test id (all of its setup/call/teardown reports together)."""

    nodeid: str
    family: str
    property: str
    tier: str | None = None
    flow: str | None = None
    status: str = "passed"
    reason: str | None = None  # skip/xfail reason, or the failure's one-line message
    message: str | None = None  # a failure's whole message (the case that shows it, ...)
    max_lsb: float | None = None
    max_lsb_where: str | None = None
    notes: list[str] = field(default_factory=list)
    reproducer: dict | None = None  # script text and tensor metadata (never the tensors)
    divergence: dict | None = None  # failing comparison: first divergence, worst LSB per point
    artifact: str | None = None  # directory with repro.py and inputs.pt
    expectation: int | None = None  # index of the expectations entry that matched
    duration: float = 0.0
    drawn: int | None = None  # examples run (None: not counted, e.g. not a property)
    compared: int | None = None  # examples really compared
    not_compared: dict[str, int] = field(default_factory=dict)  # cause -> examples
    coverage: list = field(default_factory=list)  # [*qref.coverage.Combination, examples] compared

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
        d.setdefault("status", self.status)
        return d


class Outcomes:
    """Accumulates pytest TestReports (any order, any worker) into one :class:`TestOutcome` per id."""

    def __init__(self) -> None:
        self._by_id: dict[str, TestOutcome] = {}

    def add(self, report: Any) -> None:
        info = getattr(report, "qref", None) or {}
        nodeid = report.nodeid
        out = self._by_id.get(nodeid)
        if out is None:
            name = nodeid.split("::")[-1].split("[")[0]
            out = self._by_id[nodeid] = TestOutcome(
                nodeid=nodeid,
                family=info.get("family") or "other",
                property=info.get("property") or name.removeprefix("test_"),
                tier=info.get("tier"),
                flow=info.get("flow"),
            )
        if info.get("expectation") is not None:
            out.expectation = info["expectation"]
        if info.get("artifact"):
            out.artifact = info["artifact"]
        if info.get("tally"):
            tally = info["tally"]
            out.drawn, out.compared, out.not_compared = tally["drawn"], tally["compared"], dict(tally["not_compared"])
            out.coverage = [list(c) for c in tally.get("coverage", ())]
        out.duration += getattr(report, "duration", 0.0) or 0.0
        for key, value in getattr(report, "user_properties", ()):
            if key == "qref_max_lsb" and value is not None:
                if out.max_lsb is None or float(value) > out.max_lsb:
                    out.max_lsb = float(value)
            elif key == "qref_max_lsb_where":
                out.max_lsb_where = value
            elif key == "qref_notes":
                out.notes.extend(n for n in value if n not in out.notes)
            elif key == "qref_reproducer":
                out.reproducer = value
            elif key == "qref_divergence":
                out.divergence = value
        self._classify(out, report)

    @staticmethod
    def _classify(out: TestOutcome, report: Any) -> None:
        # A failure in any phase is final; otherwise the call phase (or a setup skip) decides.
        if out.status == "failed":
            return
        wasxfail = getattr(report, "wasxfail", None)
        if report.failed:
            out.status, out.reason = "failed", _failure_line(report)
            out.message = _failure_text(report)
            if out.reason.startswith(NOT_EXERCISED_PREFIX):
                out.status, out.reason = "not exercised", out.reason[len(NOT_EXERCISED_PREFIX):]
        elif report.when == "call" and wasxfail is not None:
            out.status = "xpassed" if report.passed else "xfailed"
            out.reason = wasxfail or None
        elif report.skipped:
            reason = _skip_reason(report)
            if wasxfail is not None:  # xfail(run=False) or an xfail marker evaluated at setup
                out.status, out.reason = "xfailed", wasxfail or None
            elif reason.startswith(NOT_RUN_PREFIX):
                out.status, out.reason = "not run", reason[len(NOT_RUN_PREFIX) :]
            else:
                out.status, out.reason = "skipped", reason

    def outcomes(self) -> list[TestOutcome]:
        return sorted(self._by_id.values(), key=lambda o: o.nodeid)


def collection_error(report: Any) -> dict:
    """A failed CollectReport as ``{"nodeid", "error"}`` (the exception's last ``E`` line)."""
    lines = [line for line in str(report.longrepr or "").splitlines() if line.strip()]
    marked = [line[1:].strip() for line in lines if line.startswith("E ")]
    return {"nodeid": report.nodeid, "error": (marked or lines or ["collection failed"])[-1]}


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr or "")
    return reason.removeprefix("Skipped: ")


FLAKY_PREFIX = "flaky: it failed once and passed when Hypothesis ran the example again: "


def _failure_text(report: Any) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    text = (getattr(crash, "message", None) or str(report.longrepr or "")).strip()
    if "FlakyFailure" in text:  # Hypothesis' wrapper says nothing: the first failure's message does
        text = FLAKY_PREFIX + _first_failure(str(report.longrepr or ""))
    return text.removeprefix("Failed: ")[:4000]  # pytest.fail's own prefix says nothing


def _first_failure(longrepr: str) -> str:
    """The message Hypothesis could not reproduce, from its FlakyFailure report."""
    lines = longrepr.splitlines()
    start = next((i for i, line in enumerate(lines) if "Failed to reproduce exception. Expected:" in line), None)
    if start is None:
        return "(the first failure's message was not kept)"
    found = []
    for line in lines[start + 1:]:
        content = line.strip().removeprefix("|").strip()
        if not content or line.lstrip().startswith("+-"):
            break
        found.append(content)
    return "\n".join(found) or "(the first failure's message was not kept)"


def _failure_line(report: Any) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    message = getattr(crash, "message", None) or str(report.longrepr or "")
    if "FlakyFailure" in message:
        message = _failure_text(report)
    lines = [line for line in message.splitlines() if line.strip()]
    prefix = "" if report.when == "call" else f"error in {report.when}: "
    return prefix + (lines[0].strip().removeprefix("Failed: ") if lines else "failed")


# --- the table -----------------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    property: str
    status: str
    counts: dict[str, int]
    reason: str | None
    max_lsb: float | None
    tests: list[TestOutcome]

    @property
    def compared(self) -> tuple[int, int] | None:
        """(examples compared, examples drawn) over the row's tests, or None if none counted."""
        counted = [t for t in self.tests if t.drawn is not None]
        if not counted:
            return None
        return sum(t.compared or 0 for t in counted), sum(t.drawn for t in counted)

    @property
    def not_compared(self) -> dict[str, int]:
        causes: dict[str, int] = {}
        for t in self.tests:
            for cause, n in t.not_compared.items():
                causes[cause] = causes.get(cause, 0) + n
        return causes

    @property
    def status_text(self) -> str:
        total = sum(self.counts.values())
        text = _LABELS.get(self.status, self.status)
        if total > 1 and self.counts.get(self.status, 0) != total:
            text += f" ({self.counts[self.status]} of {total})"
        elif total > 1:
            text += f" ({total})"
        if self.status == "not run" and self.reason:
            text = f"not run: {_short_ids(self.reason)}"
        elif self.status == "skipped" and self.reason and self.reason.startswith(SKIPPED_NOT_RUN_PREFIX):
            # skipped by choice of the installation or profile ("not run: install qref[models]"):
            # shown as its reason says, counted as skipped (not against all_hold)
            text = self.reason
        elif self.status in ("xfailed", "skipped", "failed", "not exercised") and self.reason:
            text += f": {self.reason}"
        return text

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "property": self.property,
            "status": self.status,
            "counts": self.counts,
            "max_lsb": self.max_lsb,
            "compared": None if self.compared is None else {"compared": self.compared[0], "drawn": self.compared[1]},
            "not_compared": self.not_compared,
            "reason": self.reason,
            "tests": [t.nodeid for t in self.tests],  # details in the report's top-level "tests"
        }


def _rank(seq: tuple[str, ...], value: str | None) -> int:
    return seq.index(value) if value in seq else len(seq)


def rows(outcomes: Iterable[TestOutcome]) -> list[Row]:
    """One row per family × property (parameters folded), in family then tier order."""
    grouped: dict[tuple[str, str], list[TestOutcome]] = {}
    for o in outcomes:
        grouped.setdefault((o.family, o.property), []).append(o)
    result = []
    for (family, prop), tests in grouped.items():
        counts: dict[str, int] = {}
        for t in tests:
            counts[t.status] = counts.get(t.status, 0) + 1
        status = min(counts, key=STATUSES.index)
        reason = next((t.reason for t in tests if t.status == status and t.reason), None)
        lsbs = [t.max_lsb for t in tests if t.max_lsb is not None]
        result.append(
            Row(family, prop, status, dict(sorted(counts.items(), key=lambda kv: STATUSES.index(kv[0]))),
                reason, max(lsbs) if lsbs else None, sorted(tests, key=lambda t: t.nodeid))
        )
    tier_of = {(r.family, r.property): min(_rank(TIERS, t.tier) for t in r.tests) for r in result}
    result.sort(key=lambda r: (_rank(FAMILIES, r.family), r.family, tier_of[(r.family, r.property)], r.property))
    return result


def _lsb_text(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def _compared_text(row: Row) -> str:
    """``compared/drawn`` examples, e.g. ``5/6``; empty when the row's tests are not counted."""
    return "" if row.compared is None else f"{row.compared[0]}/{row.compared[1]}"


def _short_ids(text: str) -> str:
    """``dir/test_x.py::test_name[p]`` -> ``name[p]``: the table names properties, not files."""
    return re.sub(r"\S+\.py::(?:\w+::)*(?:test_)?", "", text)


def _fit(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(table: list[Row], width: int = 100) -> list[str]:
    """The conformance table as text lines for a ``width``-column terminal.

    One line per row: long reasons are cut (the JSON report and pytest's summary have them whole).
    """
    if not table:
        return ["(no qref properties ran)"]
    fam_w = max(len("family"), *(len(r.family) for r in table))
    prop_w = max(len("property"), *(len(r.property) for r in table))
    lsb_w = len("worst LSB")
    cmp_w = max(len("compared"), *(len(_compared_text(r)) for r in table))
    status_w = max(30, width - fam_w - prop_w - lsb_w - cmp_w - 9)
    lines = [f"{'family':<{fam_w}}  {'property':<{prop_w}}  {'worst LSB':>{lsb_w}}  {'compared':>{cmp_w}}  status"]
    lines.append(f"{'-' * fam_w}  {'-' * prop_w}  {'-' * lsb_w}  {'-' * cmp_w}  {'-' * min(status_w, 30)}")
    previous_family = None
    for r in table:
        family = r.family if r.family != previous_family else ""
        previous_family = r.family
        lines.append(
            f"{family:<{fam_w}}  {r.property:<{prop_w}}  {_lsb_text(r.max_lsb):>{lsb_w}}  "
            f"{_compared_text(r):>{cmp_w}}  {_fit(r.status_text, status_w)}"
        )
    return lines


def counts(outcomes: Iterable[TestOutcome]) -> dict[str, int]:
    result = {s: 0 for s in STATUSES}
    for o in outcomes:
        result[o.status] = result.get(o.status, 0) + 1
    return result


def build_json(
    *,
    converter: dict | None,
    environment: dict,
    outcomes: list[TestOutcome],
    expectations: dict | None,
    exit_status: int,
    collection_errors: list[dict] | None = None,
    coverage: dict | None = None,
) -> dict:
    """The machine-readable report (``--qref-report``); ``schema`` versions its layout."""
    c = counts(outcomes)
    collection_errors = collection_errors or []
    return {
        "schema": f"qref-report/{SCHEMA_VERSION}",
        "converter": converter,
        "environment": environment,
        "exit_status": exit_status,
        # every property holds: something ran, nothing failed or was left unrun, and pytest agrees
        "all_hold": bool(outcomes)
        and exit_status == 0
        and c["failed"] == 0
        and c["not exercised"] == 0
        and c["not run"] == 0
        and not collection_errors,
        "counts": c,
        # test modules that could not be imported: their properties were not checked
        "collection_errors": collection_errors,
        "properties": [r.to_json() for r in rows(outcomes)],
        "tests": [o.to_json() for o in sorted(outcomes, key=lambda o: o.nodeid)],
        "expectations": expectations,
        # what the compared examples covered, and what the suite knows but this run never compared
        "coverage": coverage,
    }
