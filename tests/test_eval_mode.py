"""Converted QAT models made ready for inference (qref.pt2e.eval_mode), as the pt2e flow has users do."""

from __future__ import annotations

import copy

import torch

import qref
from qref.compare import EXACT, compare
from qref.pt2e.eval_mode import move_to_eval, train_mode_ops


def _exported_train(model, x):
    return torch.export.export(model.train(), (x,)).module()


def _bn_arguments(gm):
    return [tuple(n.args[5:8]) for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]


def test_move_to_eval_keeps_each_batch_norm_s_eps_and_momentum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, eps=0.1, momentum=0.5))
    x = torch.randn(2, 1, 3, 3)
    gm = _exported_train(model, x)
    assert _bn_arguments(gm) == [(True, 0.5, 0.1)]
    model(x)  # the eager model's statistics move as the exported one's will not: reset both
    gm = _exported_train(copy.deepcopy(model), x)
    move_to_eval(gm)
    assert _bn_arguments(gm) == [(False, 0.5, 0.1)] and not train_mode_ops(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), model.eval()(x))
        assert torch.equal(gm(x), gm(x))


def test_torchao_move_exported_model_to_eval_resets_eps_and_momentum():
    """Pins torchao 0.18: its pattern rewrite replaces a batch norm's eps and momentum with the
    pattern's defaults (why qref switches the mode of each op instead)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, eps=0.1, momentum=0.5))
    gm = move_exported_model_to_eval(_exported_train(model, torch.randn(2, 1, 3, 3)))
    assert _bn_arguments(gm) == [(False, 0.1, 1e-05)]


def test_dropout_switched_to_inference():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    x = torch.randn(3, 4)
    gm = move_to_eval(_exported_train(model, x))
    assert not train_mode_ops(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), model.eval()(x))


def test_in_place_dropout_switched_to_inference():
    """nn.Dropout(inplace=True) exports as aten.dropout_ (transformers' MobileNet classifiers, p=0.999):
    left in train mode, both conversions drop random elements and compare apart (a false alarm)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.9, inplace=True))
    x = torch.randn(3, 4)
    gm = _exported_train(model, x)
    assert [n.target for n in train_mode_ops(gm)] == [torch.ops.aten.dropout_.default]
    move_to_eval(gm)
    assert not train_mode_ops(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), model.eval()(x))


def _false_alarm_case():
    """Issue 11's false alarm: X86 leaves the ConvTranspose float, so the QAT conv-bn simulation,
    with a train-mode batch norm, stays in both conversions."""
    from qref.strategies.cases import Case
    from qref.strategies.models import BatchNorm, Cat, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    spec = ModelSpec(input_shape=(2, 1, 1, 1), layers=(
        Conv(in_channels=1, out_channels=5, kernel_size=3, stride=2, padding=1, transpose=True, output_padding=1),
        BatchNorm(num_features=5), Cat(right=(Conv(in_channels=5, out_channels=1),))))
    setup = QuantSetup(flow="pt2e", qat=True, kind="x86", per_channel=False, observer="moving_average")
    x = torch.linspace(-1, 1, 2).reshape(2, 1, 1, 1)
    return Case(spec, setup, ((x,), (x * 3,)), ((x,), (x * 2,), (x * 0,)), ("a", "b", "zeros"))


def test_converted_qat_model_with_a_train_mode_batch_norm_compares_alike_once_ready():
    from qref.converters import resolve
    from qref.properties._support import evaluation_ready

    case = _false_alarm_case()
    torchao = resolve("torchao-pt2e").fn(case.prepared())
    ours = qref.convert_pt2e(case.prepared())
    assert train_mode_ops(ours) and train_mode_ops(torchao)
    buffers = [b.clone() for b in ours.buffers()]
    with torch.no_grad():
        ours(*case.inputs[0])
    assert any(not torch.equal(a, b) for a, b in zip(buffers, ours.buffers())), "as returned, a call updates it"
    ready = [evaluation_ready(m, case) for m in (torchao, qref.convert_pt2e(case.prepared()))]
    assert not any(train_mode_ops(m) for m in ready)
    result = compare(ready[1], ready[0], case.inputs, EXACT)
    assert result.ok, result.message()
    with torch.no_grad():
        assert all(torch.equal(ready[0](*b), ready[0](*b)) for b in case.inputs)
