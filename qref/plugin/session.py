"""An active plugin's session: the converter resolved at start-up, the engines, the expectations
file, the environment for the header and the report."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qref import report as _report
from qref.expectations import ExpectationsError
from qref.expectations import load as _load_expectations

from .options import PROFILE_ENV, MARKERS, active, is_worker


@dataclass
class State:
    """Per-session state of an active plugin (in ``config.stash``)."""

    converter: object | None = None  # qref.converters.Converter
    flow: str | None = None
    engines: list[str] = field(default_factory=list)
    expectations: list = field(default_factory=list)  # qref.expectations.Expectation
    inactive: dict[int, str] = field(default_factory=dict)  # entry index -> why it does not apply
    matched: set[int] = field(default_factory=set)  # entry indexes that matched a collected test
    expectations_file: str | None = None
    report_path: Path | None = None
    html_path: Path | None = None
    artifacts_dir: Path | None = None
    # lower-tier failures seen in this process: (tier rank, tier, flow, nodeid)
    failures: list[tuple[int, str, str | None, str]] = field(default_factory=list)
    failures_dir: str | None = None  # under xdist: where the workers share their failures
    outcomes: _report.Outcomes = field(default_factory=_report.Outcomes)
    environment: dict = field(default_factory=dict)
    collection_errors: list[dict] = field(default_factory=list)
    exit_status: int | None = None
    coverage_required: list[str] = field(default_factory=list)  # --qref-coverage-at-least
    coverage_missing: list[str] = field(default_factory=list)  # of those, never compared in this run


STATE = pytest.StashKey[State]()
FAILED = pytest.StashKey[bool]()  # on an item: some phase failed
DEFAULT_CONVERTERS = pytest.StashKey[dict]()
SAVED_ENV = pytest.StashKey[tuple]()


SHARED_FAILURES = "qref_tier_failures"  # workerinput key: the directory of shared failures


def state_of(config: pytest.Config) -> State | None:
    return config.stash.get(STATE, None)


# --- start-up --------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    # The suite's conftest loads the Hypothesis profile named by $QREF_PROFILE when it is
    # imported, which for the suite directory happens right after this hook.
    profile = getattr(early_config.known_args_namespace, "qref_profile", None)
    if profile:
        early_config.stash[SAVED_ENV] = (os.environ.get(PROFILE_ENV),)
        os.environ[PROFILE_ENV] = profile


@pytest.hookimpl(tryfirst=True)  # before Hypothesis' own pytest_configure reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    if not active(config):
        return
    state = State()
    try:
        _configure(config, state)
    except (ExpectationsError, Usage) as exc:
        raise pytest.UsageError(f"qref: {exc}") from None
    config.stash[STATE] = state
    if is_worker(config):
        state.failures_dir = config.workerinput.get(SHARED_FAILURES)
    else:
        from .reporting import Controller

        config.pluginmanager.register(Controller(config, state), "qref-controller")


class Usage(Exception):
    pass


def _configure(config: pytest.Config, state: State) -> None:
    from qref.converters import UsageError, resolve

    opt = config.option
    if opt.qref_seed is not None and getattr(opt, "hypothesis_seed", None) is None:
        opt.hypothesis_seed = str(opt.qref_seed)
    if opt.qref_profile:
        if SAVED_ENV not in config.stash:
            config.stash[SAVED_ENV] = (os.environ.get(PROFILE_ENV),)
        os.environ[PROFILE_ENV] = opt.qref_profile
        _load_profile_if_registered(config, opt.qref_profile)
    if opt.qref_timeout is not None and opt.qref_timeout <= 0:
        raise Usage(f"--qref-timeout must be a positive number of seconds, not {opt.qref_timeout:g}")

    if opt.qref_converter:
        try:
            state.converter = resolve(opt.qref_converter, opt.qref_flow)
        except UsageError as exc:
            raise Usage(str(exc)) from None
        state.flow = state.converter.flow
    else:
        state.flow = opt.qref_flow

    for name in opt.qref_backend or ():  # a typo in --backend costs a second, not a suite
        from qref.backends import BackendError
        from qref.backends import resolve as resolve_backend

        if state.flow == "fx":
            raise Usage(f"--backend {name}: backends lower pt2e models; the fx flow runs on its engines (--engine)")
        try:
            resolve_backend(name)
        except BackendError as exc:
            raise Usage(str(exc)) from None

    available = engines_here()
    if opt.qref_engine:
        wrong = [e for e in opt.qref_engine if e not in available]
        if wrong:
            raise Usage(
                f"quantized engine(s) {', '.join(wrong)} do not run here: use {', '.join(available)}"
            )
        state.engines = list(dict.fromkeys(opt.qref_engine))
    else:
        state.engines = available

    if opt.qref_coverage_at_least:
        from qref import coverage

        known = coverage.all_values()
        unknown = [v for v in opt.qref_coverage_at_least if v not in known]
        if unknown:
            raise Usage(f"--qref-coverage-at-least: unknown value(s) {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(sorted(known))}")
        state.coverage_required = list(dict.fromkeys(opt.qref_coverage_at_least))

    here = config.invocation_params.dir
    if opt.qref_report:
        state.report_path = (here / opt.qref_report).resolve()
    if opt.qref_html:
        state.html_path = (here / opt.qref_html).resolve()
    if opt.qref_artifacts:
        state.artifacts_dir = (here / opt.qref_artifacts).resolve()
    if opt.qref_expectations:
        path = (here / opt.qref_expectations).resolve()
        state.expectations_file = str(path)
        state.expectations = _load_expectations(path)
        torch_version = version("torch")
        for e in state.expectations:
            why = e.inactive_because(torch_version, state.engines,
                                     state.converter.target if state.converter is not None else None,
                                     version("torchao"))
            if why is not None:
                state.inactive[e.index] = why
    state.environment = environment(config, state)


def engines_here() -> list[str]:
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
    saved = config.stash.get(SAVED_ENV, None)
    if saved is not None:  # leave the environment as we found it (matters for in-process runs)
        if saved[0] is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = saved[0]


def version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(config: pytest.Config, state: State) -> dict:
    import torch

    import qref

    return {
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "qref": qref.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "engines": list(state.engines),
        "engines_available": engines_here(),
        "profile": None,  # filled in at the header, once the suite's conftest has loaded it
        "seed": config.option.qref_seed if config.option.qref_seed is not None
        else config.getoption("hypothesis_seed", None),
        "timeout": config.option.qref_timeout,
    }


def example_database_in_use() -> bool | None:
    """Whether the loaded Hypothesis settings replay and store examples (None: not loaded)."""
    if "hypothesis" not in sys.modules:
        return None
    from hypothesis import settings

    return settings().database is not None


def current_profile(config: pytest.Config) -> str | None:
    if "hypothesis" in sys.modules:
        from hypothesis import settings

        try:
            return settings.get_current_profile_name()
        except AttributeError:  # older Hypothesis
            return getattr(settings, "current_profile", None)
    # Hypothesis not imported (yet): what it will load, as far as the options tell.
    return (
        config.getoption("hypothesis_profile", None)
        or config.option.qref_profile
        or os.environ.get(PROFILE_ENV)
        or "default"
    )


def converter_json(state: State) -> dict | None:
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
    state = state_of(config)
    if state is None:
        return None
    env = state.environment
    env["profile"] = current_profile(config)
    conv = converter_json(state)
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
    env["example_database"] = example_database_in_use()
    database = "; example database not used" if env["example_database"] is False else ""
    lines.append(f"qref: Hypothesis profile {env['profile']}, seed {seed}{database}")
    if state.expectations_file:
        n_active = len(state.expectations) - len(state.inactive)
        lines.append(
            f"qref: expectations {state.expectations_file} ({n_active} of {len(state.expectations)} entries apply)"
        )
    return lines
