"""Judging points: a candidate's integers against the reference's, in steps of the point's scale.

A point fails where its integers differ beyond what the tolerance allows at its depth (up to an
allowed fraction of elements one step more), and also where its dtype or qparams differ from the
reference's even if every integer agrees, unless the reference graph allows the candidate's grid
(``keeps``: then the values are compared on the reference's grid). Final outputs are compared in
steps of the output scale when the reference output is a dequantize, else as floats (bit for
bit, or within :func:`~qref.compare.float_bound._float_bound`); NaN/inf is a failure of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..qparams import QParams
from .float_bound import _float_bound
from .record import _Output, _Point, _Recorder
from .results import PointResult, Worst
from .tolerance import Tolerance

__all__ = ["qparams_difference"]


def _judge(
    key: str,
    kind: str,
    node: str,
    depth: int,
    tolerance: Tolerance,
    expected: list[Tensor],
    got: list[Tensor],
    float_inputs: list,
    got_float_inputs: list,
    expected_qparams: QParams | None = None,
    got_qparams: QParams | None = None,
    note: str = "",
    keeps: tuple = (),
    per_batch: list | None = None,
    got_kind: str | None = None,
) -> PointResult:
    """``keeps``: other qparams the reference graph shows the point may legitimately carry (see
    _other_grids); values on them are compared on the reference's grid.  ``per_batch``: (the
    reference's, the candidate's) qparams on each batch, for a point whose qparams are computed
    at run time (dynamic quantization): they must agree on every batch."""
    allowed = tolerance.allowed(depth)
    common = dict(key=key, kind=kind, node=node, depth=depth, allowed=allowed,
                  expected_qparams=expected_qparams, got_qparams=got_qparams)  # fmt: skip
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            return PointResult(max_lsb=None, differing=e.numel(), elements=e.numel(), beyond=e.numel(),
                               ok=False, note=f"shape {tuple(e.shape)} in the reference, "
                               f"{tuple(g.shape)} in the candidate", **common)  # fmt: skip
    if len(expected) != len(got):
        return PointResult(max_lsb=None, differing=0, elements=0, beyond=0, ok=False,
                           note=f"ran {len(got)} times in the candidate, {len(expected)} in the reference",
                           **common)  # fmt: skip
    notes, mismatch = ([note] if note else []), []
    if kind in ("module", "op") and got_kind == "activation":
        # the same integers from a float op between a dequantize and a quantize: a reference
        # module or op the candidate did not lower (real-converter-bugs #11)
        mismatch.append(f"not lowered: the reference runs a quantized {kind} here, the candidate a float one "
                        f"between a dequantize and a quantize")
    if expected and expected[0].dtype != got[0].dtype:
        mismatch.append(f"dtype {got[0].dtype} in the candidate, {expected[0].dtype} in the reference")
    differ = qparams_difference(expected_qparams, got_qparams)
    for b, (e_qparams, g_qparams) in enumerate(per_batch or ()):  # run-time qparams: each batch's
        differ = qparams_difference(e_qparams, g_qparams)
        if differ:
            differ = f"on batch {b}: {differ}"
            break
    if differ and any(qparams_difference(k, got_qparams) is None for k in keeps):
        # a lowered op that keeps its input's qparams (e.g. hardtanh, whose output the next op
        # requantizes), as the reference graph allows: its values are compared on the reference's grid
        if float(got_qparams.scale) > float(expected_qparams.scale):
            # a coarser grid (a tanh's fixed 1/128 where the reference's observer saw a tiny range):
            # the candidate cannot be nearer than its own step, so both are compared on it
            expected = [_on_grid(e, expected_qparams, got_qparams) for e in expected]
            got = [g.to(torch.int64) for g in got]
            notes.append("the lowered op carries qparams the reference graph allows it (its input's, or its "
                         "fixed ones), coarser than the reference's: compared on the candidate's grid")
        else:
            got = [_on_grid(g, got_qparams, expected_qparams) for g in got]
            notes.append("the lowered op carries qparams the reference graph allows it (its input's, or its "
                         "fixed ones): compared on the reference's grid")
    elif differ:
        mismatch.append(f"output qparams differ: {differ}")
    worst_value, worst_at, differing, elements, beyond, one_more = -1, None, 0, 0, 0, 0
    for b, (e, g) in enumerate(zip(expected, got)):
        diff = (g.to(torch.int64) - e.to(torch.int64)).abs()
        elements += diff.numel()
        if diff.numel() == 0:
            continue
        differing += int((diff > 0).sum())
        beyond += int((diff > allowed).sum())
        one_more += int((diff == allowed + 1).sum())
        flat = int(diff.argmax())
        if int(diff.reshape(-1)[flat]) > worst_value:
            worst_value = int(diff.reshape(-1)[flat])
            worst_at = (b, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)))
    max_lsb = max(worst_value, 0)
    ok = not mismatch and (max_lsb <= allowed or (
        tolerance.off_by_one_fraction is not None
        and beyond == one_more
        and one_more <= tolerance.off_by_one_fraction * elements
    ))
    worst = None
    if worst_at is not None and worst_value > 0:
        b, index = worst_at
        worst = Worst(
            batch=b,
            index=index,
            expected=int(expected[b][index]),
            got=int(got[b][index]),
            float_input=_at(float_inputs, b, index),
            got_float_input=_at(got_float_inputs, b, index),
        )
    if per_batch and worst is not None and worst.batch < len(per_batch):  # the qparams there
        common.update(expected_qparams=per_batch[worst.batch][0], got_qparams=per_batch[worst.batch][1])
    return PointResult(max_lsb=max_lsb, differing=differing, elements=elements, beyond=beyond, ok=ok,
                       worst=worst, note="; ".join(notes), mismatch="; ".join(mismatch), **common)  # fmt: skip


def qparams_difference(expected: QParams | None, got: QParams | None) -> str | None:
    """What differs between two points' qparams, and by how much (None: the same, or unknown)."""
    if expected is None or got is None:
        return None
    if expected.axis != got.axis:
        return f"axis {got.axis} in the candidate, {expected.axis} in the reference (None: per tensor)"
    scales = [torch.as_tensor(q.scale, dtype=torch.float64).reshape(-1) for q in (expected, got)]
    zero_points = [torch.as_tensor(q.zero_point).to(torch.int64).reshape(-1) for q in (expected, got)]
    if scales[0].shape != scales[1].shape:
        return f"{scales[1].numel()} scales in the candidate, {scales[0].numel()} in the reference"
    parts = []
    channel = (lambda i: f" (channel {i})") if expected.axis is not None else (lambda i: "")
    if not torch.equal(*scales):
        i = int((scales[1] / scales[0] - 1).abs().argmax())
        parts.append(f"scale {float(scales[1][i]):.9g} in the candidate, {float(scales[0][i]):.9g} in the "
                     f"reference{channel(i)}: x{float(scales[1][i] / scales[0][i]):.9g}")
    if zero_points[0].shape != zero_points[1].shape or not torch.equal(*zero_points):
        i = int((zero_points[1] - zero_points[0]).abs().argmax()) if zero_points[0].shape == zero_points[1].shape else 0
        parts.append(f"zero_point {int(zero_points[1][i])} in the candidate, {int(zero_points[0][i])} in the "
                     f"reference{channel(i)}")
    if (expected.quant_min, expected.quant_max) != (got.quant_min, got.quant_max):
        parts.append(f"range {got.quant_min}..{got.quant_max} in the candidate, "
                     f"{expected.quant_min}..{expected.quant_max} in the reference")
    return "; ".join(parts) or None


def _on_grid(ints: Tensor, source: QParams, target: QParams) -> Tensor:
    """Integers of ``source``'s grid, dequantized and quantized onto ``target``'s (int64).

    Saturated to ``target``'s range, as its quantize would store them: a lowered hardtanh that
    keeps its input's wider range (seen: -1 where the reference's zero point is 0) carries
    values the reference saturates, and the next op's requantization saturates them alike."""
    values = (ints.to(torch.float64) - int(source.zero_point)) * float(source.scale)
    on_grid = torch.round(values / float(target.scale)).to(torch.int64) + int(target.zero_point)
    return on_grid.clamp(target.quant_min, target.quant_max)


def _at(tensors: list, batch: int, index: tuple) -> float | None:
    if batch >= len(tensors):
        return None
    t = tensors[batch]
    if not isinstance(t, Tensor) or t.dim() != len(index) or any(i >= s for i, s in zip(index, t.shape)):
        return None
    return float(t[index])


def _judge_output(ref: _Output, got, depth: int, tolerance: Tolerance, bound: float | None = None) -> PointResult:
    """One final output: in LSB of the reference's output scale if it is a dequantize; a float
    output bit for bit, or within ``bound`` (see _float_bound) under a relaxed tolerance."""
    name = ref.name
    for b, (e, g) in enumerate(zip(ref.floats, got)):
        if not isinstance(e, Tensor) or not isinstance(g, Tensor) or e.shape != g.shape:
            return PointResult(key=name, kind="output", node=name, depth=depth, allowed=tolerance.allowed(depth),
                               max_lsb=None, differing=0, elements=0, beyond=0, ok=False,
                               note=f"output is {_describe(g)} in the candidate, {_describe(e)} in the "
                               "reference")  # fmt: skip
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in got if g.is_floating_point())
    ref_nonfinite = sum(int((~torch.isfinite(e)).sum()) for e in ref.floats if e.is_floating_point())
    if nonfinite > ref_nonfinite:
        nan = sum(int(torch.isnan(g).sum()) for g in got if g.is_floating_point())
        elements = sum(g.numel() for g in got)
        what = f"{nan} NaN and {nonfinite - nan} inf" if nan and nonfinite > nan else (
            f"{nan} NaN" if nan else f"{nonfinite} inf")  # fmt: skip
        return PointResult(key=name, kind="output", node=name, depth=depth, allowed=tolerance.allowed(depth),
                           max_lsb=None, differing=nonfinite, elements=elements, beyond=nonfinite, ok=False,
                           nonfinite=nonfinite - ref_nonfinite,
                           note=f"{what} in the candidate's output ({ref_nonfinite} in the reference)")
    if ref.grid is not None:
        grids = ref.grids if len(ref.grids) == len(got) else [ref.grid] * len(got)  # run-time qparams vary
        got_ints = [grid.quantize(g) if grid is not None else ref.grid.quantize(g) for grid, g in zip(grids, got)]
        return _judge(name, "output", name, depth, tolerance, ref.ints, got_ints, ref.floats, got,
                      expected_qparams=ref.qparams, got_qparams=ref.qparams,
                      note="candidate output put on the reference output's grid")  # fmt: skip
    # A float output (no dequantize at the end): there is no output scale, so exact unless the
    # tolerance is relaxed and the steps it allows at the quantizes feeding it bound it.
    max_abs = max((float((g.double() - e.double()).abs().max()) for e, g in zip(ref.floats, got)
                   if e.numel()), default=0.0)  # fmt: skip
    differing = sum(int((g != e).sum()) for e, g in zip(ref.floats, got))
    if bound is not None:
        # plus float32 rounding of the float ops after the last dequantize (a few ulp)
        top = max((float(e.abs().max()) for e in ref.floats if e.numel()), default=0.0)
        bound += 8 * torch.finfo(torch.float32).eps * top
        note = ("float output (no dequantize at the end): within the allowed steps times the scale of "
                "each quantize feeding it, through non-expanding float ops")
        ok = max_abs <= bound
    else:
        note = "float output (no dequantize at the end): compared bit for bit" + (
            "" if tolerance.is_exact else " (a float op between it and its quantizes that may "
            "amplify their steps: no bound)")
        ok = all(torch.equal(e, g) for e, g in zip(ref.floats, got))
    beyond = differing if not ok else 0
    return PointResult(key=name, kind="output", node=name, depth=depth, allowed=tolerance.allowed(depth),
                       max_lsb=None, differing=differing, elements=sum(e.numel() for e in ref.floats),
                       beyond=beyond, ok=ok, note=note, max_abs=max_abs, bound=bound)  # fmt: skip


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor"
    return type(value).__name__


def _judge_point(key: str, ref: _Point, got: _Point, depth: int, tolerance: Tolerance, kind=None, keeps=(),
                 same_lowering: bool = False):
    """``same_lowering``: both graphs are lowered conversions, so a module or op the reference
    runs quantized must run quantized in the candidate too."""
    per_batch = None
    if ref.grids is not None or got.grids is not None:  # a dynamic quantize: qparams per batch
        per_batch = [(ref.qparams_of(b), got.qparams_of(b)) for b in range(min(len(ref.values), len(got.values)))]
    return _judge(key, kind or ref.kind, ref.node, depth, tolerance, ref.values, got.values,
                  ref.float_inputs, got.float_inputs, expected_qparams=ref.qparams, got_qparams=got.qparams,
                  keeps=keeps, per_batch=per_batch, got_kind=got.kind if same_lowering else None)  # fmt: skip


def _compare_outputs(ref: _Recorder, got: _Recorder, tolerance: Tolerance, depths: list) -> dict:
    if len(got.outputs) != len(ref.outputs):
        r = PointResult(key="output", kind="output", node="output", depth=0, allowed=0, max_lsb=None,
                        differing=0, elements=0, beyond=0, ok=False,
                        note=f"{len(got.outputs)} outputs in the candidate, {len(ref.outputs)} in the reference",
                        )  # fmt: skip
        return {"output": r}
    return {
        out.name: _judge_output(out, other.floats, depth, tolerance,
                                None if tolerance.is_exact else _float_bound(ref, out.leaf, tolerance))
        for out, other, depth in zip(ref.outputs, got.outputs, depths)
    }
