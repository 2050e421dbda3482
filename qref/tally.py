"""How many examples a property really compared, and why the others were not compared.

A property that checked nothing must not say "passed".  So each property says what it did with
each example:

* :func:`compared` once it has compared the converter's result with what it expects (recording
  an error with ``qref_record.lsb`` counts too);
* :func:`not_compared` with the cause when an example lacks what the property needs (a float
  output, an op the quantizer left float, ...), before it returns or rejects the example.

The plugin counts the examples (each run of the test's body) in a :class:`Tally` per test and
reports ``compared/drawn`` with the causes; a property whose examples were all left uncompared is
reported "not exercised" and fails unless an expectations entry names why.  A compared example
also adds what it covered (``qref.coverage``, read from its drawn arguments) to the tally.  Outside
a counted test (a reproducer, a plain call) these functions do nothing.  Imports neither torch nor
hypothesis.
"""

from __future__ import annotations

import functools
from collections import Counter

__all__ = ["Tally", "compared", "not_compared", "compared_graph"]

_current: Tally | None = None


def compared() -> None:
    """The current example was compared (its verdict counts)."""
    if _current is not None:
        _current._compared_now = True


def compared_graph(case, graph_module) -> None:
    """The current example compares ``graph_module``, the reference conversion of ``case``: its
    coverage names only the case's ops that graph quantized (``qref.coverage.compared_ops``)."""
    if _current is not None and hasattr(graph_module, "graph") and hasattr(case, "spec"):
        from qref.coverage import compared_ops

        ops = compared_ops(case.spec.ops, graph_module)
        _current._ops_now = ops if _current._ops_now is None else _current._ops_now | ops
        _current._case_now = case


def not_compared(cause: str) -> None:
    """The current example is not compared, because of ``cause`` (one short phrase, reported
    with its count)."""
    if _current is not None:
        _current._cause_now = cause


class Tally:
    """The examples of one test: how many ran (``drawn``), how many were compared, and the causes
    of the others with their counts."""

    REJECTED = "rejected (assume/reject without a cause)"
    SILENT = "returned without comparing (no cause given)"

    def __init__(self, on_example=None) -> None:
        self.drawn = 0
        self.compared = 0
        self.causes: Counter[str] = Counter()
        self.coverage: Counter = Counter()  # qref.coverage.Combination -> compared examples
        self._compared_now = False
        self._cause_now: str | None = None
        self._ops_now: frozenset | None = None
        self._case_now = None  # the case compared_graph saw (a property that drew it from st.data())
        self._on_example = on_example  # called with this tally after each example (live progress)

    def counting(self, body):
        """``body`` (a test function or a Hypothesis test's inner test), counting each call as one
        example of this tally."""

        @functools.wraps(body)
        def example(*args, **kwargs):
            global _current
            outer, _current = _current, self
            self._compared_now, self._cause_now, self._ops_now, self._case_now = False, None, None, None
            try:
                result = body(*args, **kwargs)
            except BaseException as exc:
                self._end(kwargs, rejected=_is_rejection(exc), raised=not _is_rejection(exc))
                raise
            finally:
                _current = outer
            self._end(kwargs)
            return result

        return example

    def _end(self, arguments: dict, rejected: bool = False, raised: bool = False) -> None:
        from qref.coverage import of_example

        self.drawn += 1
        if self._compared_now or (raised and self._cause_now is None):
            # a failure is a verdict: the example was compared (or the property could not be)
            self.compared += 1
            self.coverage.update(of_example(arguments, self._ops_now, self._case_now))
        else:
            self.causes[self._cause_now or (self.REJECTED if rejected else self.SILENT)] += 1
        if self._on_example is not None:
            self._on_example(self)

    @property
    def exercised(self) -> bool:
        return self.drawn == 0 or self.compared > 0

    def summary(self) -> str:
        """``"0 of 6 examples compared (float output: 4; ...)"``."""
        text = f"{self.compared} of {self.drawn} example{'s' if self.drawn != 1 else ''} compared"
        if self.causes:
            text += " (" + "; ".join(f"{c}: {n}" for c, n in self.causes.most_common()) + ")"
        return text

    def to_json(self) -> dict:
        return {"drawn": self.drawn, "compared": self.compared, "not_compared": dict(self.causes),
                "coverage": [[*combination, n] for combination, n in sorted(self.coverage.items())]}


def _is_rejection(exc: BaseException) -> bool:
    # Hypothesis' assume(False)/reject() raise UnsatisfiedAssumption; matched by name so that this
    # module needs no hypothesis import
    return type(exc).__name__ == "UnsatisfiedAssumption"
