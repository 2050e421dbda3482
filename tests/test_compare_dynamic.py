"""qref.compare on dynamically quantized points: qparams computed at run time, batch by batch.

A dynamic quantize (``choose_qparams`` -> ``quantize_per_tensor.tensor``) has other qparams on every
batch, so a point is judged on the integers *and* on the qparams it computed on each batch: a
candidate that keeps the first batch's qparams fails on the later batch and the message names it,
and one whose run-time scale differs where no integer does fails on that alone.
"""

from __future__ import annotations

import operator

import torch

import qref
from fixtures.prepare import inputs
from qref._quiet import import_torchao_quietly
from qref.compare import compare
from qref.pt2e.ops import CHOOSE_QPARAMS, is_call
from tests.mutants.pt2e import dynamic_qparams_frozen

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402

qd = torch.ops.quantized_decomposed


def batches():
    """In range, then ten times beyond it: the dynamic qparams differ between the two."""
    return [inputs("mlp", 0), inputs("mlp", 1, 10.0)]


def test_a_dynamic_point_is_compared_batch_by_batch_with_torchao(prepared_cache):
    reference = qref.convert_pt2e(prepared_cache.get("mlp", "qref_dynamic_linear"))
    candidate = torchao_convert(prepared_cache.get("mlp", "qref_dynamic_linear"))
    result = compare(reference, candidate, batches())
    assert result.ok, result.message()
    dynamic = [k for k, r in result.points.items() if r.node.startswith("quantize_per_tensor_tensor")]
    assert len(dynamic) == 3, "the three linears' inputs are dynamic points"
    choose = next(n for n in reference.graph.nodes if is_call(n, CHOOSE_QPARAMS) and n.args[0].op == "placeholder")
    scales = [float(choose.target(x, *choose.args[1:])[0]) for (x,) in batches()]
    assert scales[0] != scales[1], "each batch gets its own qparams"


def test_qparams_kept_from_the_first_call_fail_on_the_later_batch(prepared_cache):
    reference = qref.convert_pt2e(prepared_cache.get("mlp", "qref_dynamic_linear"))
    frozen = dynamic_qparams_frozen(prepared_cache.get("mlp", "qref_dynamic_linear"))
    result = compare(reference, frozen, batches())
    assert not result.ok
    first = result.points[result.first_divergence]
    assert first.node.startswith("quantize_per_tensor_tensor")
    assert first.mismatch.startswith("output qparams differ: on batch 1: scale"), first.mismatch
    assert first.worst is not None and first.worst.batch == 1  # batch 0 agrees: its qparams were chosen on it
    assert "on batch 1" in result.message()


def test_a_run_time_scale_off_where_no_integer_moves_still_fails(prepared_cache):
    """choose_qparams' scale times (1 + 2**-22): the integers stay (no element sits on a rounding
    boundary that close), only the qparams computed at run time differ, on every batch."""
    reference = qref.convert_pt2e(prepared_cache.get("mlp", "qref_dynamic_linear"))
    candidate = qref.convert_pt2e(prepared_cache.get("mlp", "qref_dynamic_linear"))
    graph = candidate.graph
    for getitem in [n for n in graph.nodes if is_call(n, (operator.getitem,)) and is_call(n.args[0], CHOOSE_QPARAMS)
                    and n.args[1] == 0]:
        with graph.inserting_after(getitem):
            nudged = graph.call_function(torch.ops.aten.mul.Tensor, (getitem, 1 + 2**-22))
        getitem.replace_all_uses_with(nudged, delete_user_cb=lambda user: user is not nudged)
    candidate.recompile()
    result = compare(reference, candidate, batches())
    mismatched = [r for r in result.points.values() if r.mismatch]
    assert mismatched and all("on batch 0: scale" in r.mismatch for r in mismatched)
    assert all(r.max_lsb == 0 for r in mismatched), "the integers agree: only the qparams differ"
    assert not result.ok
