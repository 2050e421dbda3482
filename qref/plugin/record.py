"""What a property observed: the examples it compared (``qref.tally``), its worst error in LSB,
notes, a reproducer and where it diverged, carried to the report on the test's user_properties."""

from __future__ import annotations

import pytest

TALLY = pytest.StashKey[object]()  # on a property: its qref.tally.Tally


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Count a property's examples (each run of its body) and those it really compared."""
    if item.get_closest_marker("qref_family") is None or not hasattr(item, "obj"):
        yield
        return
    from qref.tally import Tally

    from .console import progress_writer

    tally = item.stash[TALLY] = Tally(progress_writer(item.nodeid))
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
