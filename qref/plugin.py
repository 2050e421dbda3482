"""The pytest plugin for qref: check a converter against the property suite and report conformance.

Registered through the ``pytest11`` entry point, so it is loaded by every pytest session where qref
is installed.  It is therefore *inert* unless one of its ``--qref-*`` options is given: it only
declares its options, markers and fixtures, and it imports neither torch nor hypothesis when pytest
loads it (Hypothesis moved its own plugin out of its package for the same reason,
HypothesisWorks/hypothesis#3140).  All options live here, not in the suite's conftest: options in a
package conftest are unreliable (pytest#9337).

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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qref import report as _report
from qref.expectations import TOLERANCE_MARKER, ExpectationsError
from qref.expectations import load as _load_expectations

PROFILES = ("quick", "default", "thorough")
FLOWS = ("pt2e", "fx")
TIERS = _report.TIERS
FAMILIES = _report.FAMILIES
PROFILE_ENV = "QREF_PROFILE"

# option dest -> flag; any of them switches the plugin on
_OPTIONS = {
    "qref_converter": "--qref-converter",
    "qref_flow": "--qref-flow",
    "qref_profile": "--qref-profile",
    "qref_engine": "--qref-engine",
    "qref_report": "--qref-report",
    "qref_artifacts": "--qref-artifacts",
    "qref_expectations": "--qref-expectations",
    "qref_expected_as_skip": "--qref-expected-as-skip",
    "qref_seed": "--qref-seed",
    "qref_timeout": "--qref-timeout",
}
_MARKERS = (
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


def _active(config: pytest.Config) -> bool:
    return any(config.getoption(dest, None) not in (None, False, []) for dest in _OPTIONS)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@dataclass
class _State:
    """Per-session state of an active plugin (in ``config.stash``)."""

    converter: object | None = None  # qref.converters.Converter
    flow: str | None = None
    engines: list[str] = field(default_factory=list)
    expectations: list = field(default_factory=list)  # qref.expectations.Expectation
    inactive: dict[int, str] = field(default_factory=dict)  # entry index -> why it does not apply
    matched: set[int] = field(default_factory=set)  # entry indexes that matched a collected test
    expectations_file: str | None = None
    report_path: Path | None = None
    artifacts_dir: Path | None = None
    # lower-tier failures seen in this process: (tier rank, tier, flow, nodeid)
    failures: list[tuple[int, str, str | None, str]] = field(default_factory=list)
    failures_dir: str | None = None  # under xdist: where the workers share their failures
    outcomes: _report.Outcomes = field(default_factory=_report.Outcomes)
    environment: dict = field(default_factory=dict)
    collection_errors: list[dict] = field(default_factory=list)
    exit_status: int | None = None


_STATE = pytest.StashKey[_State]()
_FAILED = pytest.StashKey[bool]()  # on an item: some phase failed
_DEFAULT_CONVERTERS = pytest.StashKey[dict]()
_SAVED_ENV = pytest.StashKey[tuple]()


def _state(config: pytest.Config) -> _State | None:
    return config.stash.get(_STATE, None)


# --- start-up --------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    # The suite's conftest loads the Hypothesis profile named by $QREF_PROFILE when it is
    # imported, which for the suite directory happens right after this hook.
    profile = getattr(early_config.known_args_namespace, "qref_profile", None)
    if profile:
        early_config.stash[_SAVED_ENV] = (os.environ.get(PROFILE_ENV),)
        os.environ[PROFILE_ENV] = profile


@pytest.hookimpl(tryfirst=True)  # before Hypothesis' own pytest_configure reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    if not _active(config):
        return
    state = _State()
    try:
        _configure(config, state)
    except (ExpectationsError, _Usage) as exc:
        raise pytest.UsageError(f"qref: {exc}") from None
    config.stash[_STATE] = state
    if _is_worker(config):
        state.failures_dir = config.workerinput.get(_SHARED_FAILURES)
    else:
        config.pluginmanager.register(_Controller(config, state), "qref-controller")


class _Usage(Exception):
    pass


def _configure(config: pytest.Config, state: _State) -> None:
    from qref.converters import UsageError, resolve

    opt = config.option
    if opt.qref_seed is not None and getattr(opt, "hypothesis_seed", None) is None:
        opt.hypothesis_seed = str(opt.qref_seed)
    if opt.qref_profile:
        if _SAVED_ENV not in config.stash:
            config.stash[_SAVED_ENV] = (os.environ.get(PROFILE_ENV),)
        os.environ[PROFILE_ENV] = opt.qref_profile
        _load_profile_if_registered(config, opt.qref_profile)
    if opt.qref_timeout is not None and opt.qref_timeout <= 0:
        raise _Usage(f"--qref-timeout must be a positive number of seconds, not {opt.qref_timeout:g}")

    if opt.qref_converter:
        try:
            state.converter = resolve(opt.qref_converter, opt.qref_flow)
        except UsageError as exc:
            raise _Usage(str(exc)) from None
        state.flow = state.converter.flow
    else:
        state.flow = opt.qref_flow

    available = _engines()
    if opt.qref_engine:
        wrong = [e for e in opt.qref_engine if e not in available]
        if wrong:
            raise _Usage(
                f"quantized engine(s) {', '.join(wrong)} do not run here: use {', '.join(available)}"
            )
        state.engines = list(dict.fromkeys(opt.qref_engine))
    else:
        state.engines = available

    here = config.invocation_params.dir
    if opt.qref_report:
        state.report_path = (here / opt.qref_report).resolve()
    if opt.qref_artifacts:
        state.artifacts_dir = (here / opt.qref_artifacts).resolve()
    if opt.qref_expectations:
        path = (here / opt.qref_expectations).resolve()
        state.expectations_file = str(path)
        state.expectations = _load_expectations(path)
        torch_version = _version("torch")
        for e in state.expectations:
            why = e.inactive_because(torch_version, state.engines,
                                     state.converter.target if state.converter is not None else None,
                                     _version("torchao"))
            if why is not None:
                state.inactive[e.index] = why
    state.environment = _environment(config, state)


def _engines() -> list[str]:
    import warnings

    import qref

    with warnings.catch_warnings():  # the probe's quantized tensors warn of their deprecation
        warnings.simplefilter("ignore", UserWarning)
        return qref.engines()


def _load_profile_if_registered(config: pytest.Config, profile: str) -> None:
    # The suite's conftest registers the profiles; when it was imported before this point (it is
    # an initial conftest), load the profile now.  --hypothesis-profile wins, as documented there.
    if "hypothesis" not in sys.modules or config.getoption("hypothesis_profile", None):
        return
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    try:
        # get_profile first: load_profile of an unknown name leaves Hypothesis in a broken state
        settings.get_profile(profile)
    except InvalidArgument:  # not registered (yet): the conftest will load it from $QREF_PROFILE
        return
    settings.load_profile(profile)


def pytest_unconfigure(config: pytest.Config) -> None:
    controller = config.pluginmanager.get_plugin("qref-controller")
    if controller is not None:
        config.pluginmanager.unregister(controller)
    saved = config.stash.get(_SAVED_ENV, None)
    if saved is not None:  # leave the environment as we found it (matters for in-process runs)
        if saved[0] is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = saved[0]


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _environment(config: pytest.Config, state: _State) -> dict:
    import torch

    import qref

    return {
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "qref": qref.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "engines": list(state.engines),
        "engines_available": _engines(),
        "profile": None,  # filled in at the header, once the suite's conftest has loaded it
        "seed": config.option.qref_seed if config.option.qref_seed is not None
        else config.getoption("hypothesis_seed", None),
        "timeout": config.option.qref_timeout,
    }


def _example_database_in_use() -> bool | None:
    """Whether the loaded Hypothesis settings replay and store examples (None: not loaded)."""
    if "hypothesis" not in sys.modules:
        return None
    from hypothesis import settings

    return settings().database is not None


def _current_profile(config: pytest.Config) -> str | None:
    if "hypothesis" in sys.modules:
        from hypothesis import settings

        try:
            return settings.get_current_profile_name()
        except AttributeError:  # older Hypothesis
            return getattr(settings, "_current_profile", None)
    # Hypothesis not imported (yet): what it will load, as far as the options tell.
    return (
        config.getoption("hypothesis_profile", None)
        or config.option.qref_profile
        or os.environ.get(PROFILE_ENV)
        or "default"
    )


def _converter_json(state: _State) -> dict | None:
    c = state.converter
    if c is None:
        return {
            "target": None,
            "flow": state.flow,
            "note": "the qref_converter fixture: qref-pt2e / qref-fx unless a conftest overrides it",
        }
    return {
        "target": c.target,
        "flow": c.flow,
        "callable": f"{getattr(c.fn, '__module__', '?')}.{getattr(c.fn, '__qualname__', repr(c.fn))}",
        "accepted": sorted(c.accepted),
        "not_exercised": list(c.not_exercised),
    }


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = _state(config)
    if state is None:
        return None
    env = state.environment
    env["profile"] = _current_profile(config)
    conv = _converter_json(state)
    if state.converter is not None:
        lines = [f"qref: converter {conv['target']} -> {conv['callable']} (flow {conv['flow']})"]
        if conv["not_exercised"]:
            lines.append(
                "qref: the converter does not accept "
                + ", ".join(conv["not_exercised"])
                + ": those keyword arguments are not exercised"
            )
    else:
        lines = [f"qref: converter from the qref_converter fixture (flow {state.flow or 'pt2e and fx'})"]
    engines = ", ".join(env["engines"]) or "none"
    lines.append(
        f"qref: torch {env['torch']}, torchao {env['torchao'] or 'not installed'}, qref {env['qref']}; "
        f"quantized engines: {engines}"
    )
    seed = env["seed"] if env["seed"] is not None else "not fixed (see the failure's reproduce_failure blob)"
    env["example_database"] = _example_database_in_use()
    database = "; example database not used" if env["example_database"] is False else ""
    lines.append(f"qref: Hypothesis profile {env['profile']}, seed {seed}{database}")
    if state.expectations_file:
        n_active = len(state.expectations) - len(state.inactive)
        lines.append(
            f"qref: expectations {state.expectations_file} ({n_active} of {len(state.expectations)} entries apply)"
        )
    return lines


# --- collection: expectations, flow selection, tier order -------------------------------------------


def _marker_arg(item: pytest.Item, name: str) -> str | None:
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("name")


def _tier_rank(tier: str | None) -> int:
    # Tests without a tier run after the tiered ones and neither gate nor are gated.
    return TIERS.index(tier) if tier in TIERS else len(TIERS)


@pytest.hookimpl(tryfirst=True)  # see every collected test, before -k/-m deselect some
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    state = _state(config)
    if state is None:
        return
    _apply_expectations(config, state, items)
    if state.flow is not None:
        keep, drop = [], []
        for item in items:
            flow = _marker_arg(item, "qref_flow")
            (drop if flow is not None and flow != state.flow else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    items.sort(key=lambda item: _tier_rank(_marker_arg(item, "qref_tier")))  # stable within a tier


def _apply_expectations(config: pytest.Config, state: _State, items: list) -> None:
    if not state.expectations:
        return
    active = [e for e in state.expectations if e.index not in state.inactive]
    as_skip = config.option.qref_expected_as_skip
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        xfail_done = tolerance_done = False
        for e in active:
            if not e.matches(item.nodeid, name):
                continue
            state.matched.add(e.index)
            if e.kind == "tolerance" and not tolerance_done:
                item.add_marker(pytest.mark.qref_max_lsb(e.max_lsb, reason=e.reason))
                tolerance_done = True
            elif e.kind == "not-exercised" and _NOT_EXERCISED not in item.stash:
                accept_not_exercised(item, e)
            elif e.kind == "xfail" and not xfail_done:
                reason = f"{_report.EXPECTED_SKIP_PREFIX}{e.reason}"
                if as_skip:
                    item.add_marker(pytest.mark.skip(reason=reason))
                else:
                    expect_failure(item, e)
                xfail_done = True
            else:
                continue
            item.stash[_EXPECTATION] = e.index
    if _is_worker(config):  # the controller has no items under xdist: send what matched
        config.workeroutput["qref_matched"] = sorted(state.matched)


_EXPECTATION = pytest.StashKey[int]()
_EXPECTED_FAILURE = pytest.StashKey[object]()  # the Expectation an xfail came from
_NOT_EXERCISED = pytest.StashKey[object]()  # the Expectation that accepts "not exercised"


def expect_failure(item: pytest.Item, entry) -> None:
    """Mark ``item`` as an expected failure of ``entry``; a failure with another message than
    the entry's ``failure`` (if it has one) is then reported as a real failure."""
    item.add_marker(pytest.mark.xfail(reason=entry.reason, strict=False))
    item.stash[_EXPECTED_FAILURE] = entry


def accept_not_exercised(item: pytest.Item, entry) -> None:
    """``item`` may compare no example, for the reason ``entry`` gives (reported, not failed)."""
    item.stash[_NOT_EXERCISED] = entry


# --- running: tier gating, per-test data on the reports, artifacts ----------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = _state(item.config)
    if state is None:
        return
    rank = _tier_rank(_marker_arg(item, "qref_tier"))
    flow = _marker_arg(item, "qref_flow")
    for failed_rank, failed_tier, failed_flow, nodeid in sorted(_tier_failures(state)):
        if failed_rank < rank and (failed_flow is None or flow is None or failed_flow == flow):
            _skip_at_item(f"{_report.NOT_RUN_PREFIX}{nodeid} failed (tier {failed_tier})")


_SHARED_FAILURES = "qref_tier_failures"  # workerinput key: the directory of shared failures


def _add_tier_failure(state: _State, failure: tuple) -> None:
    state.failures.append(failure)
    if state.failures_dir is not None:  # tell the other xdist workers (written whole, then renamed)
        path = Path(state.failures_dir, f"{os.getpid()}-{len(state.failures)}.json")
        path.with_suffix(".tmp").write_text(json.dumps(failure))
        os.replace(path.with_suffix(".tmp"), path)


def _tier_failures(state: _State) -> list[tuple]:
    """This process's lower-tier failures and, under xdist, those the other workers reported so far."""
    if state.failures_dir is None:
        return state.failures
    shared = [tuple(json.loads(p.read_text())) for p in Path(state.failures_dir).glob("*.json")]
    return state.failures + [f for f in shared if f not in state.failures]


def _skip_at_item(reason: str) -> None:
    # Like a skip marker, report the test's location rather than this plugin's line.
    try:
        raise pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without _use_item_location
        pytest.skip(reason)


_TALLY = pytest.StashKey[object]()  # on a property: its qref.tally.Tally


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Count a property's examples (each run of its body) and those it really compared."""
    if item.get_closest_marker("qref_family") is None or not hasattr(item, "obj"):
        yield
        return
    from qref.tally import Tally

    tally = item.stash[_TALLY] = Tally()
    given = getattr(item.obj, "hypothesis", None)
    if given is not None:  # Hypothesis reads inner_test at each call: wrap the body it runs
        body, given.inner_test = given.inner_test, tally.counting(given.inner_test)
        try:
            yield
        finally:
            given.inner_test = body
    else:  # a plain test is one example
        original = item.obj
        item.obj = tally.counting(original)
        try:
            yield
        finally:
            item.obj = original


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest's own xfail handling
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    _unexpected_failure_fails(item, call, report)
    _not_exercised_fails(item, call, report)
    # Tensors cannot travel to the xdist controller (nor into junitxml): reports carry metadata only.
    report.user_properties = [_portable(k, v) for k, v in report.user_properties]
    state = _state(item.config)
    if state is None:
        return
    tier = _marker_arg(item, "qref_tier")
    flow = _marker_arg(item, "qref_flow")
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    info = {
        "family": _marker_arg(item, "qref_family"),
        "tier": tier,
        "flow": flow,
        "property": name.removeprefix("test_"),
        "expectation": item.stash.get(_EXPECTATION, None),
    }
    tally = item.stash.get(_TALLY, None)
    if tally is not None and report.when == "call":
        info["tally"] = tally.to_json()
    if report.failed:
        item.stash[_FAILED] = True
        if tier in TIERS and not any(f[3] == item.nodeid for f in state.failures):
            _add_tier_failure(state, (_tier_rank(tier), tier, flow, item.nodeid))
    if report.when == "teardown" and item.stash.get(_FAILED, False) and state.artifacts_dir is not None:
        artifact = _write_artifact(state.artifacts_dir, item)
        if artifact is not None:
            info["artifact"] = str(artifact)
    # A plain attribute: xdist serialises the report's __dict__ to the controller.
    report.qref = info


def _unexpected_failure_fails(item: pytest.Item, call, report) -> None:
    """An expected failure whose message is not the entry's ``failure`` is a real failure."""
    entry = item.stash.get(_EXPECTED_FAILURE, None)
    if entry is None or getattr(report, "wasxfail", None) is None or call.excinfo is None:
        return
    if entry.expects(str(call.excinfo.value)):
        return
    report.outcome = "failed"
    del report.wasxfail
    report.sections.append(("qref expectation", f"expected to fail with {entry.failure!r} ({entry.reason}), "
                                                f"but it failed otherwise: not an expected failure"))


def _not_exercised_fails(item: pytest.Item, call, report) -> None:
    """A property that passed without comparing any example did not pass: it is "not exercised",
    a failure unless an expectations entry (``not_exercised = true``) names why."""
    tally = item.stash.get(_TALLY, None)
    if report.when != "call" or tally is None or tally.exercised:
        return
    # every example rejected: Hypothesis fails with Unsatisfiable, which says less than the causes
    unsatisfiable = report.failed and call.excinfo is not None and call.excinfo.typename == "Unsatisfiable"
    if not (report.passed or unsatisfiable):
        return
    message = f"{_report.NOT_EXERCISED_PREFIX}{tally.summary()}"
    entry = item.stash.get(_NOT_EXERCISED, None)
    if entry is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], f"{message}; expected: {entry.reason}")
        return
    report.outcome = "failed"
    report.longrepr = (f"{message}\n(every example lacked what the property checks; an expectations "
                       f"entry with not_exercised = true and a reason accepts this)")


def _portable(key: str, value):
    if key != "qref_reproducer" or not isinstance(value, dict):
        return (key, value)
    tensors = value.get("tensors") or {}
    return (
        key,
        {
            "script": value.get("script"),
            "tensors": {name: _describe(t) for name, t in tensors.items()},
        },
    )


def _describe(t) -> dict | str:
    shape, dtype = getattr(t, "shape", None), getattr(t, "dtype", None)
    if shape is None:
        return type(t).__name__
    return {"shape": list(shape), "dtype": str(dtype)}


def _safe_name(nodeid: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_.")
    if len(name) > 120:  # keep paths short; the hash keeps truncated names apart
        name = name[:110] + "_" + hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return name or "test"


def _write_artifact(root: Path, item: pytest.Item) -> Path | None:
    found = [v for k, v in item.user_properties if k == "qref_reproducer" and isinstance(v, dict)]
    if not found:
        return None
    reproducer = found[-1]  # the last recorded: Hypothesis replays the shrunk example last
    import torch

    directory = root / _safe_name(item.nodeid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "repro.py").write_text(reproducer.get("script") or "", encoding="utf-8")
    torch.save(dict(reproducer.get("tensors") or {}), directory / "inputs.pt")
    return directory


class _Controller:
    """Session-level hooks of an active plugin in the controlling process (no xdist worker).

    Under xdist every worker's TestReports reach this process through pytest_runtest_logreport,
    with the per-test data they carry (``report.qref``, ``report.user_properties``).
    """

    def __init__(self, config: pytest.Config, state: _State) -> None:
        self.config = config
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.state.outcomes.add(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            error = _report.collection_error(report)
            if error not in self.state.collection_errors:  # each xdist worker reports it
                self.state.collection_errors.append(error)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        # pytest-xdist: a worker starts; give it the directory where workers share tier failures.
        if self.state.failures_dir is None:
            self.state.failures_dir = tempfile.mkdtemp(prefix="qref-tier-failures-")
        node.workerinput[_SHARED_FAILURES] = self.state.failures_dir

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        # pytest-xdist: a worker finished; merge which expectations entries matched there.
        self.state.matched.update(getattr(node, "workeroutput", {}).get("qref_matched", ()))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        state = self.state
        state.exit_status = int(exitstatus)
        if state.failures_dir is not None:
            shutil.rmtree(state.failures_dir, ignore_errors=True)
        if state.environment.get("profile") is None:
            state.environment["profile"] = _current_profile(self.config)
        if state.environment.get("example_database") is None:
            state.environment["example_database"] = _example_database_in_use()
        if state.report_path is not None:
            document = _report.build_json(
                converter=_converter_json(state),
                environment=state.environment,
                outcomes=state.outcomes.outcomes(),
                expectations=self._expectations_json(),
                exit_status=int(exitstatus),
                collection_errors=state.collection_errors,
            )
            state.report_path.parent.mkdir(parents=True, exist_ok=True)
            state.report_path.write_text(
                json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8"
            )

    def pytest_terminal_summary(self, terminalreporter) -> None:
        state, tr = self.state, terminalreporter
        target = state.converter.target if state.converter is not None else "qref_converter fixture"
        tr.section(f"qref conformance: {target} ({state.flow or 'pt2e and fx'})")
        table = _report.rows(state.outcomes.outcomes())
        for line in _report.format_table(table, width=tr._tw.fullwidth):
            tr.write_line(line)
        for error in state.collection_errors:
            tr.write_line(f"not checked, could not collect {error['nodeid']}: {error['error']}", red=True)
        if state.converter is not None and state.converter.not_exercised:
            tr.write_line(
                "not exercised (the converter does not accept them): "
                + ", ".join(state.converter.not_exercised)
            )
        for e in self._unmatched():
            tr.write_line(f"qref expectation matched no test: test = {e.test!r} ({e.reason})", yellow=True)
        if state.report_path is not None:
            tr.write_line(f"qref report: {state.report_path}")
        if state.artifacts_dir is not None and state.artifacts_dir.exists():
            tr.write_line(f"qref reproducers: {state.artifacts_dir}")

    def _unmatched(self) -> list:
        s = self.state
        return [e for e in s.expectations if e.index not in s.inactive and e.index not in s.matched]

    def _expectations_json(self) -> dict | None:
        state = self.state
        if not state.expectations_file:
            return None
        entries = []
        for e in state.expectations:
            d = e.to_json()
            if e.index in state.inactive:
                d["applies"], d["inactive_because"] = False, state.inactive[e.index]
            else:
                d["applies"], d["matched"] = True, e.index in state.matched
            entries.append(d)
        return {
            "file": state.expectations_file,
            "as_skip": bool(self.config.option.qref_expected_as_skip),
            "entries": entries,
            "unmatched": [e.to_json() for e in self._unmatched()],
        }


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def qref_converter(request: pytest.FixtureRequest):
    """The converter under test (a :class:`qref.converters.Converter`).

    ``--qref-converter`` when given; else the default for the test's ``qref_flow`` marker
    (qref-pt2e / qref-fx).  A conftest may override this fixture to embed the suite.
    """
    state = _state(request.config)
    if state is not None and state.converter is not None:
        return state.converter
    flow = _marker_arg(request.node, "qref_flow") or (state.flow if state is not None else None)
    if flow not in FLOWS:
        pytest.fail(
            f"{request.node.nodeid} uses qref_converter without a qref_flow marker: "
            "mark it @pytest.mark.qref_flow('pt2e') or ('fx')",
            pytrace=False,
        )
    from qref.converters import DEFAULT_FOR_FLOW, resolve

    cache = request.config.stash.setdefault(_DEFAULT_CONVERTERS, {})
    if flow not in cache:
        cache[flow] = resolve(DEFAULT_FOR_FLOW[flow], flow)
    return cache[flow]


class QrefRecord:
    """What a property observed, for the report (see the ``qref_record`` fixture)."""

    def __init__(self) -> None:
        self.max_lsb: float | None = None
        self.max_lsb_where: str | None = None
        self.notes: list[str] = []
        self.reproducer_data: dict | None = None
        self.divergence_data: dict | None = None

    def lsb(self, value: float, where: str | None = None) -> None:
        """An observed error in LSB (so this example was compared); the report keeps the worst."""
        from qref import tally

        tally.compared()
        value = float(value)
        if self.max_lsb is None or value > self.max_lsb or value != value:  # NaN is the worst
            self.max_lsb, self.max_lsb_where = value, where

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def reproducer(self, source: str, tensors: dict) -> None:
        """A standalone script and the tensors it loads from inputs.pt next to it (last call wins)."""
        self.reproducer_data = {"script": source, "tensors": dict(tensors)}

    def divergence(self, points: dict) -> None:
        """Where the failing example diverged: ``{"first", "points", "missing", "extra"}`` (last
        call wins: Hypothesis replays the shrunk example last)."""
        self.divergence_data = points

    def properties(self) -> list[tuple[str, object]]:
        props: list[tuple[str, object]] = []
        if self.max_lsb is not None:
            props.append(("qref_max_lsb", self.max_lsb))
            if self.max_lsb_where is not None:
                props.append(("qref_max_lsb_where", self.max_lsb_where))
        if self.notes:
            props.append(("qref_notes", list(self.notes)))
        if self.reproducer_data is not None:
            props.append(("qref_reproducer", self.reproducer_data))
        if self.divergence_data is not None:
            props.append(("qref_divergence", self.divergence_data))
        return props


@pytest.fixture
def qref_record(request: pytest.FixtureRequest):
    """Record LSB errors, notes and a reproducer; stored in the test's user_properties at teardown."""
    record = QrefRecord()
    yield record
    request.node.user_properties.extend(record.properties())


@pytest.fixture(scope="session")
def qref_engines(request: pytest.FixtureRequest) -> list[str]:
    """The quantized engines to exercise: ``--qref-engine`` values, else every engine that runs here."""
    state = _state(request.config)
    return list(state.engines) if state is not None else _engines()


@pytest.fixture(scope="session")
def qref_timeout(request: pytest.FixtureRequest) -> float | None:
    """Seconds one converter call may take (``--qref-timeout``), or ``None`` for no limit."""
    return request.config.getoption("qref_timeout", None)


@pytest.fixture
def qref_tolerance_override(request: pytest.FixtureRequest):
    """The ``max_lsb`` an expectations entry sets for this test, or ``None``."""
    from qref.expectations import qref_tolerance_override as override

    return override(request)
