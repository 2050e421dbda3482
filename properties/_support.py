"""What every property needs: example budgets per tier, and the converter under test behind a guard.

A property never calls the converter directly: ``Subject.convert`` turns a converter that raises,
hangs (``--qref-timeout``), returns the wrong type or a model that cannot run into a failure of
*that* property with a message saying so, and the suite carries on.  A converter that hung once
fails the rest of that test's examples at once, so shrinking does not wait for it again.

Each example is counted (``qref.tally``): a property calls ``subject.compared()`` (or records an
LSB error) when it has compared, ``subject.not_compared(cause)`` when the example lacks what it
checks; one that compared no example is "not exercised", not "passed".

A property is declared with one decorator, :func:`prop`: its flow, its tier (which decides its
tier marker, its example budget and the tier of the models its case draws) and what it draws.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# max_examples per tier.  Primitives are cheap; a model-level example costs an export, a
# prepare, two conversions and a comparison (~0.3-1 s here).
# Real architectures (transformers models, seconds per example) are not run at quick.
PROFILES = {
    "quick": {"primitives": 20, "ops": 6, "patterns": 5, "models": 4, "architectures": 0},
    "default": {"primitives": 100, "ops": 30, "patterns": 25, "models": 20, "architectures": 3},
    "thorough": {"primitives": 1000, "ops": 200, "patterns": 150, "models": 100, "architectures": 30},
}
_SHARE = {tier: n / PROFILES["default"]["primitives"] for tier, n in PROFILES["default"].items()}


def budget(tier: str, variants: int = 1, **overrides):
    """``@settings`` for a property of ``tier``: the loaded profile's budget scaled to the tier,
    shared by the property's ``variants`` (its parametrizations; each at least 2 examples)."""
    return settings(max_examples=max(2, round(settings().max_examples * _SHARE[tier] / variants)), **overrides)


TIERS = tuple(PROFILES["quick"])  # primitives < ops < patterns < models < architectures (qref.report.TIERS)
FLOWS = ("pt2e", "fx")


def prop(flow: str | None, tier: str, *strategies, specs: str | None = None, qat: bool | None = None,
         engine: str | None = None, kinds=None, model=None, where=None, settings: dict | None = None,
         variants: int = 1, **given):
    """Declare a property: ``@prop("pt2e", "ops", fold_quantize=st.booleans())``.

    One tier decides the property's ``qref_tier`` marker (the order it runs in and what its
    failure gates), its example budget (``budget(tier)``, ``settings``: other ``@settings``
    arguments, e.g. ``phases``) and the models its case draws.  ``flow`` (``"pt2e"``, ``"fx"``,
    or None for a flow-independent property) gives the ``qref_flow`` marker and the case's flow.

    A property with a ``case`` parameter draws it here, as
    ``cases(flow, tier=specs or tier, qat=qat, engine=engine)``:

    * ``specs``: the tier of the model specs drawn, when it is not the property's own: a clause
      of the converter's contract checked early (tier ``ops``, gating the higher tiers) may be
      drawn on richer models (``specs="patterns"``); never a lower tier than the property's (a
      property checked on single ops belongs to the ``ops`` tier);
    * ``kinds``: only these pattern kinds (``model_specs(..., kinds=)``; with ``qat=None`` the
      QAT choice is drawn first, so the specs suit it);
    * ``model``: the model specs themselves: a spec strategy that is the property's premise
      (``conv_bn_specs(qat=True)``: its size is that strategy's; say it with ``specs`` when it is
      above the tier), or a function of the tier's spec strategy (to filter or enlarge it);
    * ``where``: keep only the cases it accepts (``Case -> bool``).

    There is no ``case=`` argument: the case's models come from the tier.  A property that draws
    its case in its body (its draw depends on a fixture, e.g. a parametrized engine) takes
    ``data=st.data()`` and draws ``subject.cases(engine=engine)``.  Everything else the property
    draws is passed on to ``@given``: keyword strategies (``fold_quantize=st.booleans()``) or,
    for a property without a case, positional ones.  ``variants``: how many parametrizations
    (``pytest.mark.parametrize``, applied above it) share the tier's budget.  Other markers (expectations, xfail,
    filterwarnings) and ``@example`` stack with it as with ``@given``.
    """
    import inspect

    from hypothesis import given as _given

    if flow is not None and flow not in FLOWS:
        raise ValueError(f"flow must be one of {FLOWS} or None, not {flow!r}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, not {tier!r}")
    if specs is not None and (specs not in TIERS[1:] or TIERS.index(specs) < TIERS.index(tier)):
        raise ValueError(f"specs={specs!r}: the tier of the models a case draws is one of {TIERS[1:]}, "
                         f"not below the property's tier {tier!r}")
    if "case" in given:
        raise TypeError("prop(): no case=; the case follows the tier (specs=, qat=, engine=, kinds=, "
                        "model=, where= shape it)")
    if strategies and given:
        raise TypeError("prop(): positional or keyword strategies, not both (as @given)")
    options = {"specs": specs, "qat": qat, "engine": engine, "kinds": kinds, "model": model, "where": where}
    overrides = dict(settings or {})

    def decorate(test):
        parameters = inspect.signature(test).parameters
        draws_case = "case" in parameters and not strategies
        in_body = not draws_case and "data" in given and flow is not None  # subject.cases(...)
        if draws_case and flow is None:
            raise TypeError(f"{test.__name__}: a property that draws a case needs a flow")
        if not draws_case and not in_body and any(v is not None for v in options.values()):
            raise TypeError(f"{test.__name__}: case options given but the property draws no case")
        declared = Declared(flow, tier, specs or tier, options, variants) if draws_case or in_body else \
            Declared(flow, tier, None, {}, variants)
        drawn = {"case": declared.cases(), **given} if draws_case else given  # case first: its draws come first
        wrapped = _given(*strategies, **drawn)(test)
        wrapped = budget(tier, variants, **overrides)(wrapped)
        wrapped = pytest.mark.qref_tier(tier)(wrapped)
        if flow is not None:
            wrapped = pytest.mark.qref_flow(flow)(wrapped)
        wrapped.qref_property = declared
        return wrapped

    return decorate


class Declared:
    """What :func:`prop` declared: flow, tier, the tier of the models its case draws (None: it
    draws no case) and the case options; ``cases()`` is the property's case strategy."""

    def __init__(self, flow, tier, specs, options, variants=1):
        self.flow, self.tier, self.specs, self.options = flow, tier, specs, dict(options)
        self.variants = variants

    def __repr__(self) -> str:
        return f"Declared(flow={self.flow!r}, tier={self.tier!r}, specs={self.specs!r})"

    def cases(self, **changes):
        """The case strategy (with ``changes`` to the options, e.g. ``engine=``)."""
        from hypothesis import strategies as st
        from hypothesis.strategies import SearchStrategy

        from qref.strategies import cases, model_specs

        if self.specs is None:
            raise TypeError(f"{self!r} draws no case")
        unknown = set(changes) - {"qat", "engine", "kinds", "where"}
        if unknown:
            raise TypeError(f"a property's case may change only qat, engine, kinds, where; not {sorted(unknown)}")
        o = {**self.options, **changes}
        flow, qat, engine, model, kinds = self.flow, o["qat"], o["engine"], o["model"], o["kinds"]
        if self.specs == "architectures":  # transformers models, not model specs; kinds: families
            from qref.strategies.architectures import architecture_cases

            strategy = architecture_cases(flow, qat=qat, engine=engine, families=kinds)
        elif isinstance(model, SearchStrategy):  # a premise: the model specs themselves
            strategy = cases(flow, qat=qat, engine=engine, model=model)
        elif model is None and kinds is None:
            strategy = cases(flow, tier=self.specs, qat=qat, engine=engine)
        else:  # the tier's specs, narrowed to kinds or derived by model: they depend on qat
            def of(q):
                specs = model_specs(flow, self.specs, q, kinds=kinds)
                return cases(flow, qat=q, engine=engine, model=specs if model is None else model(specs))

            strategy = st.booleans().flatmap(of) if qat is None else of(qat)
        return strategy if o["where"] is None else strategy.filter(o["where"])


def declared(test) -> Declared | None:
    """The :func:`prop` declaration of a property (None: not declared through it)."""
    return getattr(test, "qref_property", None)


@pytest.fixture
def subject(request, qref_converter, qref_timeout, qref_record):
    """The converter under test behind the suite's guard.  Test modules import this fixture, so
    ``from qref.properties.test_x import *`` brings it along when a project embeds the suite."""
    marker = request.node.get_closest_marker("qref_max_lsb")  # from an expectations entry
    override = None if marker is None else (marker.args[0], marker.kwargs.get("reason", "an expectations entry"))
    known = tuple((m.args[0], m.kwargs.get("reason", "an expectations entry"))
                  for m in request.node.iter_markers("qref_known_defect"))  # expectations' anywhere entries
    return Subject(qref_converter, qref_timeout, qref_record, request.function, override, known)


class Subject:
    """The converter under test, as the properties see it."""

    def __init__(self, converter, timeout, record, prop=None, tolerance_override=None, known_defects=()):
        self.converter = converter
        self.known_defects = known_defects  # (failure regex, reason): examples showing one are not compared
        self.timeout = timeout
        self.record = record
        self.prop = prop  # the property (test function), for its reproducer
        self.arguments: dict = {}  # its other drawn arguments (see drew)
        self._hung = None
        self._override = tolerance_override  # (max_lsb, reason) of an expectations entry

    def compared(self) -> None:
        """This example was compared: its verdict counts (``qref.tally``)."""
        from qref import tally

        tally.compared()

    def not_compared(self, cause: str) -> None:
        """This example is not compared because of ``cause`` (counted, and a Hypothesis event);
        the property then returns or rejects it."""
        from hypothesis import event

        from qref import tally

        tally.not_compared(cause)
        event(cause)

    def tolerance(self, default):
        """``default`` (a ``qref.compare.Tolerance``), or the ``max_lsb`` of an expectations
        entry matching this property, with the entry's reason as its cause."""
        if self._override is None:
            return default
        from qref.compare import Tolerance

        lsb, reason = self._override
        return Tolerance.within(lsb, cause=f"expectations entry: {reason}")

    def cases(self, **changes):
        """The case strategy this property declared (``@prop``), with ``changes`` (e.g. the
        ``engine`` a fixture chose), for a property that draws its case from ``data``."""
        found = declared(self.prop)
        if found is None:
            raise TypeError(f"{getattr(self.prop, '__name__', self.prop)!r} is not declared with @prop")
        return found.cases(**changes)

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

    def reference(self, case, model=None, **kwargs):
        """qref's reference conversion of ``model`` (default: a fresh copy of the case's prepared
        model), made ready for evaluation exactly as :meth:`convert` makes the candidate."""
        import qref

        from qref import tally

        model = case.prepared() if model is None else model
        convert = qref.convert_pt2e if case.setup.flow == "pt2e" else qref.convert_fx
        reference = evaluation_ready(convert(model, **kwargs), case)
        tally.compared_graph(case, reference)
        return reference

    def convert(self, case, model=None, ready=True, **kwargs):
        """Convert ``model`` (default: a fresh copy of the case's prepared model) under the guard,
        and (``ready``) make the result ready for inference as its flow documents."""
        from qref.converters import ConverterMisbehaved, call_guarded

        if self._hung:  # shrinking must not wait for it again, nor see it behave the next time
            self.fail(case, f"{self._hung} earlier in this test; not called again")
        kwargs = {k: v for k, v in kwargs.items() if self.accepts(k)}
        model = case.prepared() if model is None else model
        try:
            converted = call_guarded(self.converter, model, timeout=self.timeout, **kwargs)
        except ConverterMisbehaved as error:
            message = f"the converter {error.kind}: {error}"
            if error.kind in ("timeout", "exited"):
                self._hung = message
            self._excuse_known_defect(message)
            self.fail(case, message)
        if ready:
            converted = evaluation_ready(converted, case)
        try:
            import torch

            # a trial run, which must change nothing: the reference it is compared with has not
            # been run, and a converter that converted in place shares its tensors with the
            # prepared model (a model may update buffers, or plain tensor attributes, when called)
            state = _tensor_state(converted)
            with torch.no_grad():
                converted(*case.inputs[0])
                for tensor, saved in state:
                    tensor.copy_(saved)
        except Exception as error:  # noqa: BLE001 - any failure to run is the converter's
            self.fail(case, cannot_run_message(error))
        return converted

    def _excuse_known_defect(self, message: str) -> None:
        """An example on which the converter fails with a known defect's message (an expectations
        entry with ``anywhere = true``) is not compared, under the entry's reason; the property
        goes on with the other examples."""
        import re

        from hypothesis import reject

        from qref.expectations import KNOWN_DEFECT_PREFIX

        for failure, reason in self.known_defects:
            if re.search(failure, message):
                self.not_compared(KNOWN_DEFECT_PREFIX + reason)
                reject()

    def fail(self, case, message: str, comparison=None):
        """Fail the property with ``message``, the case that shows it and a reproducer: one that
        runs the property again, or, if it draws more than :meth:`drew` names, one that shows the
        plain conversion's comparison with qref's reference.  ``comparison`` (a
        ``qref.compare.Comparison``): its points go to the report (first divergence, worst LSB
        at each quantize point)."""
        replay = _replay_of(self.prop, self.arguments) if self.prop is not None else None
        self.record.reproducer(case.to_python(self.target, replay), case.tensors())
        if comparison is not None:
            self.record.divergence(divergence(comparison))
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
    from qref.plugin.record import QrefRecord

    from hypothesis import Phase, Verbosity, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Flaky, Unsatisfiable

    prop = getattr(importlib.import_module(module), name)
    test = prop.hypothesis.inner_test
    subject = Subject(resolve(target, case.setup.flow), None, QrefRecord(), prop)
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


def _tensor_state(model) -> list:
    """(tensor, copy) for every tensor a module holds: parameters, buffers, plain attributes."""
    import torch

    seen, state = set(), []
    for module in model.modules():
        for value in [*module.parameters(recurse=False), *module.buffers(recurse=False), *vars(module).values()]:
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                state.append((value, value.detach().clone()))
    return state


def divergence(comparison) -> dict:
    """A comparison's points as plain data for the report: each point in graph order with its
    worst error in LSB and its allowance, the first divergence, missing and extra points."""
    def point(key, r):
        if r is None:  # quantized in the reference only: in graph order, not comparable
            return {"point": key, "kind": None, "node": None, "lsb": None, "allowed": None, "ok": False}
        return {"point": key, "kind": r.kind, "node": r.node, "lsb": r.max_lsb, "allowed": r.allowed, "ok": r.ok}

    points = [point(k, comparison.points.get(k)) for k in comparison.order]
    points += [point(k, r) for k, r in comparison.outputs.items()]
    return {"first": comparison.first_divergence, "points": points,
            "missing": list(comparison.missing), "extra": list(comparison.extra)}


def cannot_run_message(error: Exception) -> str:
    """How a property reports a converted model that raises when run (expectations match this)."""
    return f"the converted model cannot run: {type(error).__name__}: {error}"[:2000]


def describe(case) -> str:
    return f"model: {case.spec!r}\nsetup: {case.setup!r}"


def evaluation_ready(converted, case):
    """``converted`` made ready for inference as its flow documents, the same for the candidate and
    the reference: a pt2e model's train-mode batch norms and dropouts (left by QAT where the
    quantizer did not fold them) switched to inference, as torchao's QAT flow has users do."""
    import torch

    if case.setup.flow == "pt2e" and isinstance(converted, torch.fx.GraphModule):
        from qref.pt2e.eval_mode import move_to_eval

        move_to_eval(converted)
    return converted
