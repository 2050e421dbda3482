"""qref.convert_pt2e's contract beyond numerics: errors, metadata, DuplicateDQ, train/eval, flags."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import qref
from fixtures.prepare import export_model, inputs
from qref._quiet import import_torchao_quietly
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call, real_users

import_torchao_quietly()
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402


@pytest.fixture
def prepared(prepared_cache):
    return prepared_cache.get("residual_add", "x86_ptq_pc")


# --- step 1: arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["use_reference_representation", "fold_quantize"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_non_bool_flag_is_a_clear_error(prepared, flag, value):
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        qref.convert_pt2e(prepared, **{flag: value})
    # torchao raises ValueError for the same mistake; code written against it keeps working.
    with pytest.raises(ValueError):
        qref.convert_pt2e(prepared, **{flag: value})


def test_not_a_graph_module():
    with pytest.raises(TypeError, match="prepare_pt2e"):
        qref.convert_pt2e(torch.nn.Linear(2, 2))


def test_never_prepared_model():
    exported = export_model("linear", train=False)
    with pytest.raises(ValueError, match="never prepared.*prepare_pt2e"):
        qref.convert_pt2e(exported)


def test_already_converted_model(prepared):
    converted = qref.convert_pt2e(prepared)
    with pytest.raises(ValueError, match="already converted"):
        qref.convert_pt2e(converted)
    with pytest.raises(ValueError, match="already converted"):
        qref.convert_pt2e(torchao_convert(copy.deepcopy(prepared)))


def test_call_is_logged(prepared, caplog):
    with caplog.at_level(logging.INFO, logger="qref"):
        qref.convert_pt2e(prepared, fold_quantize=False)
    assert "convert_pt2e(use_reference_representation=False, fold_quantize=False)" in caplog.text


# --- steps 4 and 7: graph form and metadata ----------------------------------------------------


def _annotated(node) -> bool:
    return "quantization_annotation" in node.meta


def test_each_dequantize_feeds_one_annotated_consumer(prepared):
    converted = qref.convert_pt2e(prepared)
    shared = [
        n for n in converted.graph.nodes
        if is_call(n, DEQUANTIZE) and sum(map(_annotated, real_users(n))) > 1
    ]
    assert not shared, f"dequantize nodes shared by annotated ops: {shared}"
    # residual_add reuses one activation in a conv and in the add: duplication really happened.
    sources = [n.args[0] for n in converted.graph.nodes if is_call(n, DEQUANTIZE)]
    assert len(sources) > len(set(sources))


def test_qdq_metadata_matches_torchao(prepared_cache):
    # sigmoid_tanh under qref's quantizer annotates outputs, so q nodes inherit stack traces.
    p = prepared_cache.get("sigmoid_tanh", "qref_int8_sym")
    got = qref.convert_pt2e(p)
    expected = torchao_convert(copy.deepcopy(p))

    def ported(gm):
        return {
            n.name: (n.meta.get("stack_trace"), n.meta.get("quantization_tag"))
            for n in gm.graph.nodes
            if is_call(n, QUANTIZE + DEQUANTIZE) or n.name.startswith("quantize_per")
        }

    mine, theirs = ported(got), ported(expected)
    assert mine == theirs
    assert any(trace for trace, _ in mine.values()), "no q/dq node carries a stack trace"


def test_train_and_eval_are_refused_and_meta_kept(prepared):
    prepared.meta["user_note"] = "kept"
    converted = qref.convert_pt2e(prepared)
    for call in (converted.train, converted.eval):
        with pytest.raises(NotImplementedError, match="move_exported_model_to_eval"):
            call()
    assert converted.meta["user_note"] == "kept"


def test_no_observer_survives_and_result_owns_its_tensors(prepared):
    converted = qref.convert_pt2e(prepared)
    names = [type(m).__name__ for m in converted.modules()]
    assert not [n for n in names if "Observer" in n or "FakeQuant" in n]
    before = {id(t) for t in prepared.state_dict(keep_vars=True).values()}
    assert not before & {id(t) for t in converted.state_dict(keep_vars=True).values()}


# --- step 5: fold_quantize ---------------------------------------------------------------------


def test_fold_quantize_stores_integer_weights(prepared):
    folded = qref.convert_pt2e(prepared, fold_quantize=True)
    unfolded = qref.convert_pt2e(prepared, fold_quantize=False)
    weight_quantizes = [
        n for n in unfolded.graph.nodes
        if is_call(n, QUANTIZE) and n.args[0].op == "get_attr"
    ]
    assert weight_quantizes, "the unfolded graph quantizes no weight"
    frozen = [t for name, t in folded.named_buffers() if name.startswith("_frozen_param")]
    assert len(frozen) == len(weight_quantizes)
    assert all(t.dtype == torch.int8 for t in frozen)
    assert not any(
        is_call(n, QUANTIZE) and n.args[0].op == "get_attr" for n in folded.graph.nodes
    )


# --- step 6: reference representation on the zoo ----------------------------------------------


@pytest.mark.parametrize("model_name", ["conv_bn_relu", "residual_add", "mlp", "max_pool"])
def test_reference_representation_matches_torchao(prepared_cache, model_name):
    p = prepared_cache.get(model_name, "qref_int8_sym")
    got = qref.convert_pt2e(p, use_reference_representation=True)
    expected = torchao_convert(copy.deepcopy(p), use_reference_representation=True)
    assert not any(is_call(n, QUANTIZE + DEQUANTIZE) for n in got.graph.nodes)
    for scale in (1.0, 20.0):
        args = inputs(model_name, 0, scale)
        with torch.no_grad():
            assert torch.equal(got(*args), expected(*args))


def test_observer_shared_under_two_names_is_removed():
    """Found by the property suite: a cat's inputs share one observer (SharedQuantizationSpec),
    registered under two names; GraphModule.delete_all_unused_submodules sees it once and left
    the second name behind."""
    from qref.observers import is_observer
    from qref.strategies.cases import prepare_case
    from qref.strategies.models import Cat, Conv, ModelSpec
    from qref.strategies.setups import QuantSetup

    spec = ModelSpec(input_shape=(2, 1, 1), layers=(Cat(left=(Conv(1, 1, dim=1),), right=(Conv(1, 1, dim=1),)),))
    setup = QuantSetup("pt2e", kind="qref", per_channel=False, act_dtype="int8", observer="minmax")
    prepared = prepare_case(spec, setup, [(torch.linspace(-1, 1, 2).reshape(2, 1, 1),)])
    aliases = [name for name, m in prepared._modules.items() if is_observer(m)]
    assert len(aliases) > len({id(prepared._modules[n]) for n in aliases}), "no shared observer: test is vacuous"
    converted = qref.convert_pt2e(prepared)
    assert not [name for name, m in converted._modules.items() if is_observer(m)]
