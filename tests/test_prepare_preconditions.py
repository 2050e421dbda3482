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


def _grouped_conv_transpose_prepared(groups_in_bias: bool):
    """A grouped ConvTranspose (4 -> 6 channels, 2 groups) under QrefQuantizer's per-channel
    weights, its bias derived from weight scales repeated per group (qref's quantizer) or taken
    as the weight observer sized them (``groups_in_bias=False``)."""
    import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    import qref.quantizers as quantizers

    torch.manual_seed(0)
    model = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).eval()
    x = torch.randn(2, 4, 5, 5)
    quantizer = quantizers.QrefQuantizer()  # per-channel symmetric int8 weights
    original = quantizers._transposed_groups
    if not groups_in_bias:
        quantizers._transposed_groups = lambda op: 1  # the bias takes the weight's scales as they are
    try:
        prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    finally:
        quantizers._transposed_groups = original
    prepared(x)
    return prepared, x


def test_per_channel_observer_on_a_grouped_conv_transpose_has_out_over_groups_scales():
    """A grouped ConvTranspose's weight is (in, out / groups, k, k): a per-channel observer on its
    output-channel axis (1) gives out / groups scales, each shared by one output channel of every
    group.  A bias derived from them as they are has the wrong size and torchao's convert fails on
    it; qref's quantizer repeats them per group, and then conversion is checked like any other."""
    import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    import qref

    prepared, x = _grouped_conv_transpose_prepared(groups_in_bias=True)
    (weight_observer,) = [m for m in prepared.modules() if type(m).__name__ == "PerChannelMinMaxObserver"]
    assert tuple(weight_observer.min_val.shape) == (3,)  # 6 output channels / 2 groups
    expected = convert_pt2e(copy.deepcopy(prepared))(x)
    assert torch.equal(qref.convert_pt2e(copy.deepcopy(prepared))(x), expected)

    naive, x = _grouped_conv_transpose_prepared(groups_in_bias=False)
    with pytest.raises(RuntimeError, match="must match the size"):
        convert_pt2e(naive)(x)


def _conv_bn_with_a_zero_gamma():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with torch.no_grad():
        model[1].weight[1] = 0.0
    return model, torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.skipif(not version("torchao").startswith("0.18."), reason="pinned on torchao 0.18")
def test_qat_prepare_of_a_zero_gamma_batch_norm_gives_nan_in_both_flows():
    """real-converter-bugs #3 (pytorch#85744): QAT conv-bn computes conv(x, w * gamma / std) and
    then divides by gamma / std, so a zero gamma gives NaN in every channel after the weight
    fake-quant.  torchao's prepare_qat_pt2e has no other path, and its convert then fails on the
    NaN observers; torch's FX QAT modules keep the division on their default path (the stable one
    is opt-in).  So the suite draws zero gammas in PTQ only."""
    import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e")
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from qref.quantizers import x86_qat

    model, x = _conv_bn_with_a_zero_gamma()
    prepared = prepare_qat_pt2e(torch.export.export(copy.deepcopy(model), (x,)).module(), x86_qat())
    assert torch.isnan(prepared(x)).all()
    with pytest.raises(AssertionError, match="nan"):
        convert_pt2e(prepared)

    def fx(stable: bool):
        prepared = prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("fbgemm"), (x,))
        (conv_bn,) = [m for m in prepared.modules() if type(m).__name__ == "ConvBn2d"]
        conv_bn._enable_slow_path_for_better_numerical_stability = stable  # the opt-in stable path
        return prepared(x)

    assert torch.isnan(fx(stable=False)).any()
    assert torch.isfinite(fx(stable=True)).all()
