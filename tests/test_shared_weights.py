"""A module called twice (shared weights) through qref's pt2e conversion: the weight's dequantize
has two users, which DuplicateDQ gives one copy each (it once read the weight's scale as a
dynamic quantize's choose_qparams getitem and raised); the result equals torchao's."""

from __future__ import annotations

import torch

import qref
from qref.compare import compare
from qref.pt2e.eval_mode import move_to_eval
from qref.strategies.cases import Case
from qref.strategies.models import Conv, ModelSpec, Pool, Shared
from qref.strategies.setups import QuantSetup


def _case(qat: bool) -> Case:
    spec = ModelSpec((2, 4, 8), (Conv(4, 4, 3, padding=1, dim=1), Pool("avg", 2, 1, 1),
                                 Shared(Conv(4, 4, 2, padding=1, dilation=2, groups=2, bias=False, dim=1))), seed=3)
    setup = QuantSetup("pt2e", qat, "qref", True, act_dtype="uint8", symmetric=True, observer="minmax")
    g = torch.Generator().manual_seed(0)
    batches = tuple((torch.randn(spec.input_shape, generator=g),) for _ in range(2))
    return Case(spec, setup, batches, batches[:1], ("calibration",))


def test_a_shared_weight_converts_like_torchao():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    for qat in (False, True):
        case = _case(qat)
        ours = qref.convert_pt2e(case.prepared())
        dequantizes = [n for n in ours.graph.nodes if n.op == "call_function"
                       and n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default]
        assert all(len(n.users) == 1 for n in dequantizes)
        theirs = convert_pt2e(case.prepared())
        if qat:  # train-mode batch norms the quantizer left float: both to eval alike
            ours, theirs = move_to_eval(ours), move_to_eval(theirs)
        result = compare(ours, theirs, case.inputs)
        assert result.ok, result.message()
