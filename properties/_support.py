"""What every property needs: example budgets per tier, and the converter under test behind a guard.

A property never calls the converter directly: ``Subject.convert`` turns a converter that raises,
hangs (``--qref-timeout``), returns the wrong type or a model that cannot run into a failure of
*that* property with a message saying so, and the suite carries on.  A converter that hung once
fails the rest of that test's examples at once, so shrinking does not wait for it again.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# max_examples per tier.  Primitives are cheap; a model-level example costs an export, a
# prepare, two conversions and a comparison (~0.3-1 s here).
PROFILES = {
    "quick": {"primitives": 20, "ops": 6, "patterns": 5, "models": 4},
    "default": {"primitives": 100, "ops": 30, "patterns": 25, "models": 20},
    "thorough": {"primitives": 1000, "ops": 200, "patterns": 150, "models": 100},
}
_SHARE = {tier: n / PROFILES["quick"]["primitives"] for tier, n in PROFILES["quick"].items()}


def budget(tier: str, **overrides):
    """``@settings`` for a property of ``tier``: the loaded profile's budget scaled to the tier."""
    return settings(max_examples=max(2, round(settings().max_examples * _SHARE[tier])), **overrides)


@pytest.fixture
def subject(request, qref_converter, qref_timeout, qref_record):
    """The converter under test behind the suite's guard.  Test modules import this fixture, so
    ``from qref.properties.test_x import *`` brings it along when a project embeds the suite."""
    return Subject(qref_converter, qref_timeout, qref_record, request.function)


class Subject:
    """The converter under test, as the properties see it."""

    def __init__(self, converter, timeout, record, prop=None):
        self.converter = converter
        self.timeout = timeout
        self.record = record
        self.prop = prop  # the property (test function), for its reproducer
        self.arguments: dict = {}  # its other drawn arguments (see drew)
        self._hung = None

    def drew(self, **arguments) -> None:
        """Note the property's drawn arguments besides ``case`` (e.g. ``fold_quantize``), so that
        its reproducer can run it again; a property that draws nothing else needs no call."""
        self.arguments = arguments

    @property
    def target(self) -> str:
        return self.converter.target

    def accepts(self, keyword: str) -> bool:
        return keyword in self.converter.accepted

    def require(self, keyword: str) -> None:
        """Skip a property that exercises ``keyword`` when the converter does not accept it."""
        if not self.accepts(keyword):
            pytest.skip(f"not exercised: {self.target} does not accept {keyword}=")

    def convert(self, case, model=None, **kwargs):
        """Convert ``model`` (default: a fresh copy of the case's prepared model) under the guard."""
        from qref.converters import ConverterMisbehaved, call_guarded

        if self._hung:
            self.fail(case, f"the converter hung earlier in this test ({self._hung}); not called again")
        kwargs = {k: v for k, v in kwargs.items() if self.accepts(k)}
        model = case.prepared() if model is None else model
        try:
            converted = call_guarded(self.converter, model, timeout=self.timeout, **kwargs)
        except ConverterMisbehaved as error:
            if error.kind == "timeout":
                self._hung = str(error)
            self.fail(case, f"the converter {error.kind}: {error}")
        try:
            import torch

            with torch.no_grad():
                converted(*case.inputs[0])
        except Exception as error:  # noqa: BLE001 - any failure to run is the converter's
            self.fail(case, cannot_run_message(error))
        return converted

    def fail(self, case, message: str):
        """Fail the property with ``message``, the case that shows it and a reproducer: one that
        runs the property again, or, if it draws more than :meth:`drew` names, one that shows the
        plain conversion's comparison with qref's reference."""
        replay = _replay_of(self.prop, self.arguments) if self.prop is not None else None
        self.record.reproducer(case.to_python(self.target, replay), case.tensors())
        pytest.fail(f"{message}\n\n{describe(case)}", pytrace=False)


def _replay_of(prop, arguments: dict) -> tuple | None:
    """(module, name, arguments) to run the property again on one case; None if it draws more
    than ``case`` (or ``st.data()`` whose one draw is the case) and ``arguments``."""
    import inspect

    test = getattr(getattr(prop, "hypothesis", None), "inner_test", None)
    if test is None or set(inspect.signature(test).parameters) - {"case", "data"} != {"subject", *arguments}:
        return None
    module = prop.__module__
    if module.startswith("properties."):  # collected from a checkout: the installed name
        module = "qref." + module
    return module, prop.__name__, arguments


def replay(module: str, name: str, target: str, case, arguments: dict) -> int:
    """Run property ``module.name`` on ``case`` against converter ``target`` and print the
    verdict; the exit status of a reproducer (1: the property fails)."""
    import importlib
    import inspect

    from qref.converters import resolve
    from qref.plugin import QrefRecord

    from hypothesis import Phase, Verbosity, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Flaky, Unsatisfiable

    test = getattr(importlib.import_module(module), name).hypothesis.inner_test
    subject = Subject(resolve(target, case.setup.flow), None, QrefRecord())
    drawn = {"data": _CaseDraw(case)} if "data" in inspect.signature(test).parameters else {"case": case}

    # one run inside Hypothesis, which the property's event()/assume() calls need
    @settings(database=None, deadline=None, max_examples=1, phases=[Phase.generate], verbosity=Verbosity.quiet)
    @given(st.just(None))
    def once(_):
        test(subject=subject, **drawn, **arguments)

    try:
        once()
    except Unsatisfiable:
        print(f"{name} not run: the case does not meet the property's assumptions")
        return 0
    except Flaky as flaky:  # Hypothesis runs a failing example twice; the second run passed
        # pytest's Failed is a BaseException: Hypothesis wraps it, the original is the cause
        first = [str(e.__cause__ or e) for e in getattr(flaky, "exceptions", ())]
        print(f"{name} fails for {target} only sometimes on this case:\n" + ("\n".join(first) or str(flaky)))
        return 1
    except pytest.fail.Exception as failure:
        print(f"{name} fails for {target}:\n{failure.msg}")
        return 1
    except pytest.skip.Exception as skipped:
        print(f"{name} not run: {skipped.msg}")
        return 0
    print(f"{name} holds for {target} on this case")
    return 0


class _CaseDraw:
    """``st.data()`` in a replay, for a property whose one draw from it is the case."""

    def __init__(self, case):
        self.case = case

    def draw(self, strategy, label=None):
        return self.case


def cannot_run_message(error: Exception) -> str:
    """How a property reports a converted model that raises when run (expectations match this)."""
    return f"the converted model cannot run: {type(error).__name__}: {error}"[:2000]


def describe(case) -> str:
    return f"model: {case.spec!r}\nsetup: {case.setup!r}"
