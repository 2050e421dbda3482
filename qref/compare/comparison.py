"""Comparison: the outcome of comparing a candidate against the reference, point by point.

Its failures in the reference's topological order (first divergence first), the largest
difference anywhere and at the outputs, and the message that says where and by how much.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .messages import _describe_failure, _short
from .results import PointResult
from .tolerance import Tolerance

__all__ = ["Comparison"]


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing a candidate conversion against the reference, point by point."""

    tolerance: Tolerance
    points: dict  # key -> PointResult, in the reference's topological order
    outputs: dict  # "output[i]" -> PointResult
    missing: tuple  # keys quantized in the reference but not in the candidate (a dropped q/dq)
    extra: tuple  # keys quantized in the candidate only
    order: tuple  # every reference key (missing ones included) in topological order
    isolated: bool = False  # each candidate point was fed the reference's integers
    module_inputs: dict = field(default_factory=dict)  # compare_lowered: path -> (ModuleInput, ...)

    @property
    def failures(self) -> list[str]:
        """Failing keys in reference order: points, missing points, outputs, then extra points."""
        failed = [k for k in self.order if k in self.missing or not self.points[k].ok]
        failed += [k for k, r in self.outputs.items() if not r.ok]
        return failed + list(self.extra)

    @property
    def ok(self) -> bool:
        return not self.failures

    def shared(self) -> Comparison:
        """Judged on the points both graphs have, and the outputs: for two forms that may quantize
        at different places (reference representations), not at different values."""
        order = tuple(k for k in self.order if k in self.points)
        return dataclasses.replace(self, missing=(), extra=(), order=order)

    @property
    def first_divergence(self) -> str | None:
        failures = self.failures
        return failures[0] if failures else None

    def _lsb_results(self) -> list[PointResult]:
        results = list(self.points.values()) + list(self.outputs.values())
        return [r for r in results if r.max_lsb is not None]

    @property
    def max_lsb(self) -> int:
        """The largest difference observed anywhere (points and outputs), in steps."""
        return max((r.max_lsb for r in self._lsb_results()), default=0)

    @property
    def output_lsb(self) -> float | None:
        """Largest output difference in LSB of the output scale; inf if the candidate output is
        NaN/inf; None if no output is a dequantize."""
        if any(r.nonfinite for r in self.outputs.values()):
            return math.inf
        values = [r.max_lsb for r in self.outputs.values() if r.max_lsb is not None]
        return float(max(values)) if values else None

    @property
    def outputs_ok(self) -> bool:
        """Only the final outputs hold (for forms whose inner quantize nodes legitimately differ,
        such as the reference representation)."""
        return all(r.ok for r in self.outputs.values())

    def outputs_message(self) -> str:
        """:meth:`message` for a comparison judged on its final outputs only."""
        failing = [r for r in self.outputs.values() if not r.ok]
        if not failing:
            return f"final outputs match the reference within {self.tolerance}"
        lines = _describe_failure(failing[0], self.tolerance, self.isolated)
        others = [_short(self, r.key) for r in failing[1:]]
        if others:
            lines.append(f"  also failing: {', '.join(others)}")
        return "\n".join(lines)

    def message(self) -> str:
        lines = []
        lsb = self._lsb_results()
        worst = max(lsb, key=lambda r: r.max_lsb, default=None)
        summary = (
            f"max over all {len(self.points)} points and {len(self.outputs)} outputs: {self.max_lsb} LSB"
            + (f" at {worst.key!r}" if worst is not None and worst.max_lsb else "")
        )
        if self.output_lsb is not None:
            summary += f"; final outputs: {self.output_lsb:g} LSB"
        if self.ok:
            return f"candidate matches the reference within {self.tolerance}; {summary}"
        first = self.first_divergence
        if first in self.missing:
            lines.append(
                f"first divergence: quantize point {first!r} is missing in the candidate: the reference "
                "quantizes there, the candidate does not (a dropped quantize/dequantize)"
            )
        elif first in self.extra:
            lines.append(f"first divergence: the candidate quantizes at {first!r}, the reference does not")
        else:
            r = self.points.get(first) or self.outputs[first]
            lines += _describe_failure(r, self.tolerance, self.isolated)
        others = [k for k in self.failures if k != first and k not in self.missing and k not in self.extra]
        if others:
            shown = ", ".join(_short(self, k) for k in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            lines.append(f"  also failing: {shown}{more}")
        if self.missing:
            lines.append(f"  missing in the candidate (dropped q/dq): {', '.join(self.missing)}")
        if self.extra:
            lines.append(f"  extra in the candidate (quantized there only): {', '.join(self.extra)}")
        lines.append(f"  {summary}")
        return "\n".join(lines)

    __str__ = message
