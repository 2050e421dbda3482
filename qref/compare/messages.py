"""Messages: what a failing point or output is, where it is, and by how much it is off.

A failure names the point (quantize point, quantized weight, lowered module or op, final
output), its node and requantization depth, what differs besides the integers (dtype, qparams),
the worst element with its float input and the qparams there, and what the tolerance allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..qparams import QParams
from .results import PointResult
from .tolerance import Tolerance

if TYPE_CHECKING:
    from .comparison import Comparison


def qparams_at(qparams: QParams, index: tuple) -> str:
    """``scale=... zero_point=...`` of the element at ``index`` (its channel, if per channel)."""
    scale, zp = qparams.scale, qparams.zero_point
    if qparams.axis is not None and index:
        scale, zp = scale[index[qparams.axis]], zp[index[qparams.axis]]
    return f"scale={float(scale):.6g} zero_point={int(zp)}"


def _short(c: Comparison, key: str) -> str:
    if key in c.missing:
        return f"{key} (missing)"
    if key in c.extra:
        return f"{key} (extra)"
    r = c.points.get(key) or c.outputs[key]
    if r.mismatch:
        return f"{key} ({r.max_lsb} LSB; {r.mismatch})"
    if r.max_lsb is not None:
        return f"{key} ({r.max_lsb} LSB)"
    if r.max_abs is not None:
        return f"{key} (float output, max |diff| {r.max_abs:.3g})"
    return f"{key} ({r.note})"


def _describe_failure(r: PointResult, tolerance: Tolerance, isolated: bool = False) -> list[str]:
    what = {"activation": "quantize point", "weight": "quantized weight", "module": "lowered module",
            "op": "lowered op", "output": "final output"}[r.kind]  # fmt: skip
    where = f"node {r.node}, " if r.node != r.key else ""
    lines = [f"first divergence: {what} {r.key!r} ({where}requantization depth {r.depth})"]
    if r.mismatch:  # never "diverges" with nothing to show: say what differs, and by how much
        lines.append(f"  {r.mismatch}")
        if r.max_lsb == 0:
            lines.append(f"  the integers agree (0 LSB over {r.elements} elements): only the above differs")
    if r.max_lsb is None:
        if r.max_abs is not None:
            bound = f"; allowed {r.bound:.6g}" if r.bound is not None else ""
            lines.append(f"  float values differ: |candidate - reference| up to {r.max_abs:.6g} "
                         f"({r.differing} of {r.elements} elements){bound}")
        lines.append(f"  {r.note}")
        lines.append(f"  allowed: {tolerance}")
        return lines
    if r.mismatch and r.max_lsb == 0:
        lines.append(f"  allowed: {tolerance}")
        return lines + ([f"  note: {r.note}"] if r.note else [])
    if r.worst is not None:
        w = r.worst
        line = f"  worst element: batch {w.batch}, index {w.index}: expected {w.expected}, got {w.got}"
        if w.float_input is not None:
            line += f"; float input there {w.float_input:.6g}"
            if w.got_float_input is not None and w.got_float_input != w.float_input:
                line += f" (candidate's {w.got_float_input:.6g})"
        elif r.kind == "weight":
            line += " (folded constant: no float input)"
        lines.append(line)
        expected_qp = qparams_at(r.expected_qparams, w.index) if r.expected_qparams is not None else None
        got_qp = qparams_at(r.got_qparams, w.index) if r.got_qparams is not None else None
        if expected_qp and got_qp and got_qp != expected_qp:
            lines.append(f"  qparams there: reference {expected_qp}; candidate {got_qp}")
        elif expected_qp:
            lines.append(f"  qparams there: {expected_qp}" + (" (the same in the candidate)" if got_qp else ""))
    lines.append(
        f"  |candidate - reference| up to {r.max_lsb} LSB; {r.differing} of {r.elements} elements differ, "
        f"{r.beyond} beyond the allowed {r.allowed} LSB"
    )
    lines.append(f"  allowed: {r.allowed} LSB at depth {r.depth}: {tolerance}")
    if isolated:
        lines.append("  (isolated: every candidate point was fed the reference's integers)")
    if r.note:
        lines.append(f"  note: {r.note}")
    return lines
