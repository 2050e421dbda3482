"""Broken pt2e QAT converters: ``qref.convert_pt2e`` with one realistic QAT bug each (see MUTANTS).

Contract of each: ``fn(model, use_reference_representation=False, fold_quantize=True)``.  Both
bugs are invisible to the QAT folding properties as they were before issue 11: one shows only
where a fake-quantizer trained with other qparams than its observer reports (torch's fused
moving-average fake-quant: the examples ``test_converted_matches_qat_model`` used to skip), the
other only where a BatchNorm's eps is not the default (which torchao 0.18's ``prepare_qat_pt2e``
writes into every graph, so ``test_conv_bn_matches_float_model`` never saw another).
"""

from __future__ import annotations

from unittest import mock

import torch

import qref
import qref.observers as _observers

from .pt2e import _with_fold

DEFAULT_BN_EPS = 1e-5


def _held_if_different(real_observer_qparams):
    def observer_qparams(module):
        computed = real_observer_qparams(module)
        held_scale, held_zp = getattr(module, "scale", None), getattr(module, "zero_point", None)
        if not (isinstance(held_scale, torch.Tensor) and isinstance(held_zp, torch.Tensor)
                and hasattr(module, "fake_quant_enabled")):
            return computed  # an observer (PTQ) or a derived / fixed fake-quant: nothing held
        scale = held_scale.detach().to(computed.scale.dtype).reshape(computed.scale.shape)
        zero_point = held_zp.detach().to(computed.zero_point.dtype).reshape(computed.zero_point.shape)
        if torch.equal(scale, computed.scale) and torch.equal(zero_point, computed.zero_point):
            return computed
        return computed._replace(scale=scale.clone(), zero_point=zero_point.clone())

    return observer_qparams


def qat_held_qparams(model, use_reference_representation=False, fold_quantize=True):
    """Where a fake-quantizer holds other qparams than its observer reports, converts with the held ones."""
    with mock.patch.object(_observers, "observer_qparams", _held_if_different(_observers.observer_qparams)):
        return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def qat_fold_default_eps(model, use_reference_representation=False, fold_quantize=True):
    """The QAT conv-bn fold uses BatchNorm's default eps 1e-5 instead of the graph's eps."""

    def change(w, b, rm, rv, eps, gamma, beta):
        return w, b, rm, rv, DEFAULT_BN_EPS, gamma, beta

    return _with_fold(change, model, use_reference_representation, fold_quantize)
