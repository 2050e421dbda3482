"""The QAT mutants (tests/mutants/qat.py) plant their bug on their witness, and only where meant.

``check_*`` have the signature of ``tests/test_mutants_sanity.PLANTED``'s entries (they take a
``Pt2eWitness``) so that the registry check there can list them; this module does not import
that one at import time (no import cycle).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fixtures.prepare import inputs
from properties.test_folding import _set_bn_settings, _trained_with_other_qparams
from tests.mutants import MUTANTS


def _run(gm, batches):
    with torch.no_grad():
        return [gm(*batch) for batch in batches]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_qat_held_qparams(w):
    # the witness's fused fake-quantizers trained with other qparams than their observers report
    assert _trained_with_other_qparams(w.prepared())
    assert w.outputs_differ()
    # qref's QAT quantizer (plain FakeQuantize): held == observer's, so nothing changes
    assert not _trained_with_other_qparams(w.cache.get(w.model_name, "qref_int8_sym_qat"))
    assert w.same_elsewhere(w.model_name, "qref_int8_sym_qat")


def check_qat_fold_default_eps(w):
    # on a graph as torchao 0.18 prepares it, every BN eps is the default: nothing to see
    assert not w.outputs_differ()
    # with the model's own eps restored in the graph, the fold with 1e-5 is another model
    import qref

    restored = w.prepared()
    _set_bn_settings(restored, 0.1, 0.1)
    batches = [inputs(w.model_name, s) for s in range(3)]
    ours = qref.convert_pt2e(copy.deepcopy(restored))
    theirs = w.mutant.load()(restored)
    assert not _same(_run(ours, batches), _run(theirs, batches))


CHECKS = {"qat_held_qparams": check_qat_held_qparams, "qat_fold_default_eps": check_qat_fold_default_eps}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_qat_mutant_plants_its_bug_on_its_witness(name, prepared_cache):
    from tests.test_mutants_sanity import Pt2eWitness

    CHECKS[name](Pt2eWitness(MUTANTS[name], prepared_cache))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_qat_mutant_has_the_pt2e_contract_and_runs_beyond_its_witness(name, prepared_cache):
    import inspect

    import qref

    fn = MUTANTS[name].load()
    assert [(p.name, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]] == \
        [(p.name, p.default) for p in list(inspect.signature(qref.convert_pt2e).parameters.values())[1:]]
    for model in ("sigmoid_tanh", "attention"):
        _run(fn(prepared_cache.get(model, "qref_int8_sym")), [inputs(model, 0)])
    model, setup, _ = MUTANTS[name].witness
    for ref in (False, True):
        for fold in (False, True):
            out = fn(prepared_cache.get(model, setup), ref, fold)
            assert isinstance(out, torch.fx.GraphModule)
            _run(out, [inputs(model, 0)])
