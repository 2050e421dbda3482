"""A prepared model's annotations name its graph's nodes; a copy's must name the copy's.

``copy.deepcopy`` of a prepared pt2e model copies each node's metadata shallowly: the copy's
annotations still key the original graph's nodes. torchao 0.18's ``convert_pt2e`` then ports no
input metadata and raises on a dynamically quantized input (it looks for the choose_qparams
downstream of the *original* node). qref mirrors that, and its own working copy of the graph now
rebinds the annotations (before, qref ported no input metadata at all and converted no dynamic
model). ``rebind_on_deepcopy`` makes every deep copy of a prepared model carry its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qref
from fixtures.prepare import inputs, prepare
from qref._quiet import import_torchao_quietly
from qref.pt2e.annotations import ANNOTATION_KEY
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402


def _plain_copy(gm):
    """A deep copy without the rebinding hook: what users get from copy.deepcopy."""
    hooks = gm._deepcopy_hooks
    gm._deepcopy_hooks = []
    try:
        return copy.deepcopy(gm)
    finally:
        gm._deepcopy_hooks = hooks


def _keys_in_own_graph(gm) -> bool:
    nodes = set(gm.graph.nodes)
    return all(k in nodes for n in gm.graph.nodes if n.meta.get(ANNOTATION_KEY)
               for k in n.meta[ANNOTATION_KEY].input_qspec_map)


def _ported(gm) -> dict:
    return {n.name: n.meta.get("stack_trace") for n in gm.graph.nodes if is_call(n, QUANTIZE + DEQUANTIZE)}


def test_torchao_cannot_convert_a_plain_deep_copy_of_a_dynamically_prepared_model():
    prepared = prepare("mlp", "qref_dynamic_linear")
    stale = _plain_copy(prepared)
    assert not _keys_in_own_graph(stale)
    with pytest.raises(Exception, match="PortNodeMetaForQDQ") as raised:
        torchao_convert(stale)
    assert "No chose qparams node found" in str(raised.value.__cause__)  # torchao 0.18's spelling
    with pytest.raises(ValueError, match="no choose_qparams node"):  # qref reads annotations alike
        qref.convert_pt2e(_plain_copy(prepared))


def test_copies_of_prepared_models_convert_like_the_model_itself():
    prepared = prepare("mlp", "qref_dynamic_linear")
    copied = copy.deepcopy(prepared)  # fixtures.prepare registered the rebinding hook
    assert _keys_in_own_graph(copied) and _keys_in_own_graph(copy.deepcopy(copied))
    assert _keys_in_own_graph(prepared), "the original's annotations are left as they were"
    ours, theirs = qref.convert_pt2e(copy.deepcopy(prepared)), torchao_convert(copied)
    with torch.no_grad():
        for scale in (1.0, 10.0):
            x = inputs("mlp", 0, scale)
            assert torch.equal(ours(*x), theirs(*x))


def test_input_metadata_is_ported_as_torchao_ports_it():
    """qref's working copy of the graph rebinds the annotations: dequantizes feeding annotated ops
    carry their stack traces, as torchao's in-place conversion gives them."""
    prepared = prepare("sigmoid_tanh", "qref_int8_sym")
    ours = qref.convert_pt2e(prepared)
    theirs = torchao_convert(prepared)  # in place: last
    assert _ported(ours) == _ported(theirs)
    dequantizes = [n for n in ours.graph.nodes if is_call(n, DEQUANTIZE)]
    assert any("stack_trace" in n.meta for n in dequantizes), "input metadata (dequantizes) ported"
