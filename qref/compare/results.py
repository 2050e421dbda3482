"""What judging a point gives: a PointResult per point or output, its worst element (Worst)."""

from __future__ import annotations

from dataclasses import dataclass

from ..qparams import QParams

__all__ = ["Worst", "PointResult"]


@dataclass(frozen=True)
class Worst:
    """The element with the largest difference at a point."""

    batch: int
    index: tuple
    expected: int
    got: int
    float_input: float | None  # the reference's float input there (None for folded weights)
    got_float_input: float | None  # the candidate's


@dataclass(frozen=True)
class PointResult:
    key: str
    kind: str  # "activation", "weight", "module", "output"
    node: str  # the reference node (module path for lowered modules)
    depth: int
    allowed: int
    max_lsb: int | None  # largest |candidate - reference| in steps; None if not comparable
    differing: int  # elements that differ at all
    elements: int
    beyond: int  # elements beyond ``allowed`` (all exactly one step beyond, if ok)
    ok: bool
    worst: Worst | None = None
    expected_qparams: QParams | None = None
    got_qparams: QParams | None = None
    note: str = ""  # why not comparable, NaN in the candidate, float outputs, ...
    max_abs: float | None = None  # float outputs only: largest |difference|
    nonfinite: int = 0  # outputs only: NaN/inf elements the candidate has beyond the reference's
    mismatch: str = ""  # what differs besides the integers (dtype, qparams): a failure of its own
    bound: float | None = None  # float outputs only: the largest |difference| allowed
