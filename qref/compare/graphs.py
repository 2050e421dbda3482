"""compare(): a converted graph against qref's reference conversion, at every quantize point.

Both graphs run on the same batches; every point of the reference is judged against the
candidate's point under the same key (after :mod:`~qref.compare.pairing`), then the outputs.
With ``isolate`` every candidate point passes the reference's integers on.
"""

from __future__ import annotations

from typing import Sequence

from torch import fx

from .comparison import Comparison
from .depth import _depths
from .judge import _compare_outputs, _judge_point
from .pairing import _pairs
from .record import _Recorder, _run
from .tolerance import EXACT, Tolerance

__all__ = ["compare"]


def compare(
    reference: fx.GraphModule,
    candidate: fx.GraphModule,
    batches: Sequence,
    tolerance: Tolerance = EXACT,
    *,
    isolate: bool = False,
) -> Comparison:
    """Run both converted graphs on ``batches`` and compare every quantize point in integers.

    ``reference``: qref's conversion (the specification); ``candidate``: the converter under
    test, given the same prepared model. Neither is modified. With ``isolate`` every candidate
    point passes the reference's integers on, so each point shows only its own error (depth 1)
    instead of everything accumulated upstream.
    """
    ref = _run(reference, batches, lowered_ops=True)
    force = _forcing(ref) if isolate else None
    got = _run(candidate, batches, force=force, lowered_ops=True)
    rename = _pairs(ref.points, got.points)
    if rename:  # again under the reference's keys (isolation forces points by key)
        got = _run(candidate, batches, force=force, rename=rename, lowered_ops=True)
    depths, output_depths = _depths(ref, set(got.points) if isolate else None)
    results, missing = {}, []
    for key, point in ref.points.items():
        other = got.points.get(key)
        if other is None:
            missing.append(key)
            continue
        results[key] = _judge_point(key, point, other, depths[key], tolerance, same_lowering=True)
    extra = tuple(k for k in got.points if k not in ref.points)
    outputs = _compare_outputs(ref, got, tolerance, output_depths)
    return Comparison(tolerance=tolerance, points=results, outputs=outputs, missing=tuple(missing), extra=extra,
                      order=tuple(ref.points), isolated=isolate)


def _forcing(ref: _Recorder) -> dict:
    return dict(ref.points)
