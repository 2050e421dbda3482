"""qref.convert_pt2e against torchao's convert_pt2e: bit for bit, on the whole zoo.

For every zoo model x quantizer setup the two converters receive the same
prepared model. Their outputs must be identical (torch.equal, not allclose) on
inputs inside and far outside the calibration range, and the converted graphs
must hold the same multiset of quantize/dequantize ops.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import qref
from fixtures.prepare import all_pairs, inputs, supported
from qref._quiet import import_torchao_quietly

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402

# The 560-node MobileNetV2-like model costs ~10x a small model per case, so the default run
# converts it under two setups (PTQ with histograms, QAT); --run-slow covers the rest.
_MOBILENET_DEFAULT = {("mobilenet_v2_like", "x86_ptq_pc"), ("mobilenet_v2_like", "x86_qat_pc")}
PAIRS = [
    pytest.param(m, s, id=f"{m}-{s}", marks=[pytest.mark.slow] if m == "mobilenet_v2_like"
                 and (m, s) not in _MOBILENET_DEFAULT else [])
    for m, s in all_pairs()
    if supported(m, s)
]
INPUT_SCALES = (1.0, 10.0, 100.0, 0.0)  # in range, far outside it (saturation), all zeros


def qdq_ops(gm) -> Counter:
    return Counter(
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and "quantized_decomposed" in str(n.target)
    )


def outputs(gm, args):
    with torch.no_grad():
        out = gm(*args)
    return out if isinstance(out, (tuple, list)) else (out,)


def assert_bit_equal(expected_gm, got_gm, model_name):
    for scale in INPUT_SCALES:
        args = inputs(model_name, 0, scale)
        for i, (e, g) in enumerate(zip(outputs(expected_gm, args), outputs(got_gm, args))):
            assert torch.equal(e, g), (
                f"output {i} differs (input scale {scale}): "
                f"max |diff| {(e - g).abs().max().item():.3g}"
            )


def state(gm):
    return gm.graph.python_code("self").src, {k: v.clone() for k, v in gm.state_dict().items()}


@pytest.mark.parametrize("fold_quantize", [True, False], ids=["fold", "nofold"])
@pytest.mark.parametrize("model_name,setup_name", PAIRS)
def test_bit_exact_with_torchao(prepared_cache, model_name, setup_name, fold_quantize):
    prepared = prepared_cache.get(model_name, setup_name)
    before_code, before_state = state(prepared)

    got = qref.convert_pt2e(prepared, fold_quantize=fold_quantize)
    expected = torchao_convert(copy.deepcopy(prepared), fold_quantize=fold_quantize)

    after_code, after_state = state(prepared)
    assert after_code == before_code, "qref.convert_pt2e changed the prepared model's graph"
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)

    assert qdq_ops(got) == qdq_ops(expected)
    assert_bit_equal(expected, got, model_name)
