"""Expected failures and tolerance overrides, each with a reason, read from a TOML file.

::

    [[expect]]
    test = "qat_prepare_keeps_bn_eps"   # which tests (see below)
    reason = "torchao 0.18 prepare_qat_pt2e resets BatchNorm eps"   # mandatory
    torch = ">=2.13"      # optional: only with these torch versions (PEP 440 specifier)
    torchao = "==0.18.*"  # optional: only with these torchao versions (not installed: inactive)
    engine = "fbgemm"     # optional: only when this quantized engine is exercised
    converter = "torchao-pt2e"   # optional: only for converters whose target matches this glob
    failure = "cannot run"       # optional: expected only when the failure message matches (regex)
    max_lsb = 2           # optional: not an expected failure but a looser tolerance (in LSB)
    not_exercised = true  # optional: not an expected failure: the property may compare no example
    anywhere = true       # optional, with failure: an example showing it is not compared; the rest are

``test`` is a glob matched against the test id (``properties/test_x.py::test_y[params]``), the id
without its parameters, the test function's name and the property name (the function name
without ``test_``); ``re:<regex>`` searches the test id instead.  An entry without ``max_lsb`` marks
the tests it matches as expected failures (xfail, not strict; or skipped with
``--qref-expected-as-skip``); one that did not fail is reported "did not occur".  An entry with
``max_lsb`` lets those tests run with that tolerance instead of their own (the properties' comparisons
take it through ``Subject.tolerance``, with the entry's reason as the relaxation's cause).  An entry
with ``not_exercised = true`` accepts that the tests it matches compared no example (reported as
"not exercised" with the reason, instead of failing).  Entries whose conditions do not hold are
inactive; active entries that match no collected test are reported.  With ``failure``, a matched test
that fails with another message is a failure, not an expected one (pin the known defect, not the
property; not checked with ``--qref-expected-as-skip``, which does not run the test).  With
``anywhere = true`` (and a ``failure``) the entry is a converter's defect on one kind of model that
many properties draw: not an expected failure of the property, but of the example: an example on
which the converter raises with that message is not compared (counted under the entry's reason)
and the property goes on with the others, so that the defect hides nothing else; the entry is
reported "did not occur" only when no example of any property showed it.

This module imports neither torch nor hypothesis.
"""

from __future__ import annotations

import fnmatch
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli distribution
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KNOWN_DEFECT_MARKER",
    "KNOWN_DEFECT_PREFIX",
    "Expectation",
    "ExpectationsError",
    "TOLERANCE_MARKER",
    "load",
    "qref_tolerance_override",
]

TOLERANCE_MARKER = "qref_max_lsb"
KNOWN_DEFECT_MARKER = "qref_known_defect"
KNOWN_DEFECT_PREFIX = "known upstream defect: "  # the cause an example it excuses is counted under
_KEYS = {"test", "reason", "torch", "torchao", "engine", "converter", "failure", "max_lsb", "not_exercised",
         "anywhere"}
DID_NOT_OCCUR = "did not occur: the upstream defect may be fixed; narrow or remove this entry"



class ExpectationsError(Exception):
    """The expectations file cannot be used; the message is one line saying what to fix."""


@dataclass(frozen=True)
class Expectation:
    index: int  # position in the file, 0-based
    test: str
    reason: str
    torch: str | None = None
    engine: str | None = None
    max_lsb: float | None = None
    converter: str | None = None  # glob on the converter's target, e.g. "torchao-pt2e"
    failure: str | None = None  # regex the failure message must contain
    torchao: str | None = None  # PEP 440 specifier on torchao's version
    not_exercised: bool = False
    anywhere: bool = False  # the defect may show in any matched property (see the module's doc)

    def expects(self, message: str) -> bool:
        """Whether a failure with ``message`` is the one this entry expects."""
        return self.failure is None or re.search(self.failure, message) is not None

    @property
    def kind(self) -> str:
        """``"xfail"`` (expected failure), ``"tolerance"`` (runs with ``max_lsb``),
        ``"not-exercised"`` (may compare no example) or ``"known-defect"`` (``anywhere``: an
        example on which the converter fails so is not compared)."""
        if self.not_exercised:
            return "not-exercised"
        if self.anywhere:
            return "known-defect"
        return "xfail" if self.max_lsb is None else "tolerance"

    def matches(self, nodeid: str, function_name: str | None = None) -> bool:
        if self.test.startswith("re:"):
            return re.search(self.test[3:], nodeid) is not None
        name = function_name or nodeid.split("::")[-1].split("[")[0]
        candidates = (nodeid, nodeid.split("[")[0], name, name.removeprefix("test_"))
        return any(fnmatch.fnmatchcase(c, self.test) for c in candidates)

    def inactive_because(
        self, torch_version: str | None, engines: list[str] | None, converter: str | None = None,
        torchao_version: str | None = None,
    ) -> str | None:
        """Why the conditions do not hold here, or ``None`` when the entry applies.

        ``converter``: the target under test (``None``: the ``qref_converter`` fixture's)."""
        for dist, spec, version in (("torch", self.torch, torch_version), ("torchao", self.torchao, torchao_version)):
            if spec is None:
                continue
            from packaging.specifiers import SpecifierSet
            from packaging.version import Version

            if version is None:
                return f"{dist} is not installed"
            if not SpecifierSet(spec).contains(Version(version), prereleases=True):
                return f"{dist} {version} is not {spec}"
        if self.engine is not None and self.engine not in (engines or []):
            return f"engine {self.engine} is not exercised"
        if self.converter is not None and not (converter and fnmatch.fnmatchcase(converter, self.converter)):
            return f"the converter under test ({converter or 'the qref_converter fixture'}) is not {self.converter}"
        return None

    def to_json(self) -> dict:
        d = {"test": self.test, "reason": self.reason, "kind": self.kind}
        for key in ("torch", "torchao", "engine", "converter", "failure", "max_lsb"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.anywhere:
            d["anywhere"] = True
        return d


def load(path: str | Path) -> list[Expectation]:
    """The entries of the file at ``path``; raises :class:`ExpectationsError` when it is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExpectationsError(f"expectations file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpectationsError(f"cannot read expectations file {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExpectationsError(f"{path}: not valid TOML: {exc}") from None
    unknown_tables = set(data) - {"expect"}
    if unknown_tables:
        raise ExpectationsError(
            f"{path}: unknown top-level key(s) {sorted(unknown_tables)}; entries are [[expect]] tables"
        )
    entries = data.get("expect", [])
    if not isinstance(entries, list):
        raise ExpectationsError(f"{path}: 'expect' must be an array of tables: write [[expect]]")
    return [_entry(path, i, e) for i, e in enumerate(entries)]


def _entry(path: Path, index: int, entry: dict) -> Expectation:
    where = f"{path}: [[expect]] #{index + 1}"
    unknown = set(entry) - _KEYS
    if unknown:
        raise ExpectationsError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    test = entry.get("test")
    if not isinstance(test, str) or not test.strip():
        raise ExpectationsError(f"{where}: 'test' (a glob or re:<regex> on the test id) is missing")
    reason = entry.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ExpectationsError(f"{where} ({test!r}): 'reason' is mandatory: say why it is expected")
    if test.startswith("re:"):
        try:
            re.compile(test[3:])
        except re.error as exc:
            raise ExpectationsError(f"{where}: 'test' is not a valid regex: {exc}") from None
    for dist in ("torch", "torchao"):
        spec = entry.get(dist)
        if spec is None:
            continue
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(str(spec))
        except InvalidSpecifier:
            raise ExpectationsError(
                f"{where}: {dist!r} = {spec!r} is not a version specifier like '>=2.13'"
            ) from None
    torch_spec, torchao_spec = entry.get("torch"), entry.get("torchao")
    not_exercised = entry.get("not_exercised", False)
    if not isinstance(not_exercised, bool):
        raise ExpectationsError(f"{where}: 'not_exercised' must be true or false")
    if not_exercised and (entry.get("max_lsb") is not None or entry.get("failure") is not None):
        raise ExpectationsError(f"{where}: 'not_exercised' cannot be combined with 'max_lsb' or 'failure'")
    engine = entry.get("engine")
    if engine is not None and not isinstance(engine, str):
        raise ExpectationsError(f"{where}: 'engine' must be a string such as 'fbgemm'")
    converter = entry.get("converter")
    if converter is not None and not (isinstance(converter, str) and converter.strip()):
        raise ExpectationsError(f"{where}: 'converter' must be a converter name or glob such as 'torchao-pt2e'")
    failure = entry.get("failure")
    if failure is not None:
        if not isinstance(failure, str) or not failure.strip():
            raise ExpectationsError(f"{where}: 'failure' must be a regex the failure message contains")
        try:
            re.compile(failure)
        except re.error as exc:
            raise ExpectationsError(f"{where}: 'failure' is not a valid regex: {exc}") from None
        if entry.get("max_lsb") is not None:
            raise ExpectationsError(f"{where}: 'failure' belongs to expected failures, not to a 'max_lsb' entry")
    anywhere = entry.get("anywhere", False)
    if not isinstance(anywhere, bool):
        raise ExpectationsError(f"{where}: 'anywhere' must be true or false")
    if anywhere and failure is None:
        raise ExpectationsError(f"{where}: 'anywhere' needs a 'failure': the message that names the defect "
                                "wherever it shows")
    max_lsb = entry.get("max_lsb")
    if max_lsb is not None and (
        isinstance(max_lsb, bool) or not isinstance(max_lsb, (int, float)) or max_lsb < 0
    ):
        raise ExpectationsError(f"{where}: 'max_lsb' must be a non-negative number")
    return Expectation(
        index, test.strip(), reason.strip(), None if torch_spec is None else str(torch_spec), engine, max_lsb,
        None if converter is None else converter.strip(), failure,
        None if torchao_spec is None else str(torchao_spec), not_exercised, anywhere,
    )


def qref_tolerance_override(request) -> int | float | None:
    """The ``max_lsb`` an expectations entry sets for this test, or ``None`` (use the default)."""
    marker = request.node.get_closest_marker(TOLERANCE_MARKER)
    return None if marker is None else marker.args[0]
