"""Found by a default-profile run (sequence_pattern_matches_reference, `qref check torchao-pt2e
--profile default --seed 0`): on a pre-LN attention block whose linears' inputs are quantized
dynamically (narrow-range static activations elsewhere), torchao 0.18's convert_pt2e raises in
its metadata pass (port_metadata_pass.py: "Expecting single user for quantize_per_tensor_tensor")
on the plain prepared model; qref converts it.  Pinned on the found case (its tensors in
tests/data): the day torchao converts it, this test fails and the finding comes out of
docs/findings.md and its default expectation (``anywhere``: any pt2e property may draw such a
block).  Not reduced further yet: two linears on one dynamic input convert."""

from __future__ import annotations

from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import pytest
import torch

import qref
from qref.expectations import load
from qref.strategies.cases import Case
from qref.strategies.models import Act, Attention, LayerNorm, Linear, ModelSpec, Residual
from qref.strategies.setups import QuantSetup


def _case() -> Case:
    tensors = torch.load(Path(__file__).parent / "data" / "dynamic_attention_block.pt", weights_only=True)
    spec = ModelSpec(input_shape=(2, 3, 9), layers=(
        Residual(body=(Attention(embed=9),)),
        Residual(body=(LayerNorm(features=9), Linear(9, 13), Act(kind="gelu"), Linear(13, 9)))), seed=432)
    setup = QuantSetup("pt2e", kind="qref", per_channel=False, act_dtype="uint8", symmetric=True, observer="histogram",
                       narrow_range=True, weight_qrange=(-128, 127), dynamic=True)
    return Case(spec, setup, tuple((tensors[f"calibration_{i}_0"],) for i in range(2)),
                tuple((tensors[f"input_{i}_0"],) for i in range(4)),
                ("in calibration range", "calibration range x4", "zeros", "rounding ties of the input scale"))


@pytest.mark.skipif(not version("torchao").startswith("0.18."), reason="pinned on torchao 0.18")
def test_torchao_cannot_convert_this_dynamically_quantized_attention_block():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    case = _case()
    with pytest.raises(Exception, match="PortNodeMetaForQDQ") as raised:
        convert_pt2e(case.prepared(), fold_quantize=False)
    inner = raised.value
    while inner.__cause__ is not None:
        inner = inner.__cause__
    assert "Expecting single user" in str(inner)
    from qref.converters import ConverterMisbehaved, call_guarded, resolve

    with pytest.raises(ConverterMisbehaved) as reported:
        call_guarded(resolve("torchao-pt2e"), case.prepared(), fold_quantize=False)
    (entry,) = [e for e in load(files("qref") / "default_expectations.toml") if e.anywhere]
    assert entry.expects(reported.value.message) and entry.converter == "torchao-pt2e", reported.value.message
    converted = qref.convert_pt2e(case.prepared(), fold_quantize=False)
    assert all(torch.isfinite(converted(*args)).all() for args in case.inputs)
