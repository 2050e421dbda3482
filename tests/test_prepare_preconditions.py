"""Prepare-stage defects the precondition properties report (not the converter's): pinned here on
a standalone model so that the day upstream fixes them this test fails and the default
expectations entries (qref/default_expectations.toml) come out."""

from __future__ import annotations

import copy
from importlib.metadata import version

import pytest
import torch
from torch import nn

from qref._quiet import import_torchao_quietly


class SharedConvTwoBatchNorms(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm (real-converter-bugs #5, #6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def _model_and_input():
    torch.manual_seed(0)
    model = SharedConvTwoBatchNorms().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return model, torch.randn(2, 4, 5, 5)


def _off(prepared, model, x) -> float:
    with torch.no_grad():
        return float((prepared(x) - model(x)).abs().max())


def test_unshared_control_keeps_the_float_model():
    """The same two BatchNorms after two different convs: prepare keeps the float numerics."""
    import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from qref.quantizers import x86_ptq

    model, x = _model_and_input()
    model.conv2 = copy.deepcopy(model.conv)
    model.forward = lambda x: model.bn2(model.conv2(model.bn1(model.conv(x))))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), x86_ptq())
    assert _off(prepared, model, x) < 1e-5


@pytest.mark.skipif(not version("torchao").startswith("0.18."), reason="pinned on torchao 0.18")
def test_torchao_prepare_pt2e_folds_both_batch_norms_into_a_shared_conv():
    import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from qref.quantizers import x86_ptq

    model, x = _model_and_input()
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), x86_ptq())
    assert _off(prepared, model, x) > 0.1  # O(1): the shared weight carries both folds


@pytest.mark.skipif(not torch.__version__.startswith("2.13"), reason="pinned on torch 2.13")
def test_torch_prepare_fx_fuses_a_batch_norm_into_a_conv_called_twice():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model, x = _model_and_input()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("fbgemm"), (x,))
    assert _off(prepared, model, x) > 0.1
