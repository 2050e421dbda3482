"""Property family 5: the converter's contract beyond numerics (seed documents, design notes §5).

Each clause is its own property so the conformance table says which one a converter breaks.
Where the contract is "do what the reference does" (module kinds under a backend_config, which
modules keep ``qconfig``), the candidate is compared with qref's conversion of the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import qref
from qref.compare import EXACT, compare
from qref.observers import is_observer
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call, real_users
from qref.strategies import cases, conv_bn_specs, model_specs

from ._support import budget, subject  # noqa: F401 (subject: fixture)

pytestmark = pytest.mark.qref_family("contract")

pt2e = pytest.mark.qref_flow("pt2e")
fx = pytest.mark.qref_flow("fx")
ops_tier = pytest.mark.qref_tier("ops")


# --- both flows ------------------------------------------------------------------------------


def _snapshot(model):
    """Everything a converter could change on the model it was given."""
    graph = str(model.graph) if hasattr(model, "graph") else None
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    modules = {name: type(m) for name, m in model.named_modules()}
    return graph, tensors, modules


def _assert_unchanged(subject, case, before, after):
    problems = []
    if before[0] != after[0]:
        problems.append("its graph was rewritten")
    if before[2] != after[2]:
        changed = sorted(set(before[2].items()) ^ set(after[2].items()))[:3]
        problems.append(f"its submodules changed: {changed}")
    for name, tensor in before[1].items():
        now = after[1].get(name)
        if now is None or now.shape != tensor.shape or not torch.equal(now, tensor):
            problems.append(f"tensor {name!r} was modified or removed")
            break
    if problems:
        subject.fail(case, "the converter mutated the prepared model it was given: " + "; ".join(problems))


def _prepared_unchanged(subject, case):
    """A converter may consume the prepared model (torchao's convert_pt2e and torch's convert_fx
    rewrite its graph in place), but it must not silently change a model it leaves looking
    prepared: same graph, other weights is the dangerous case (a half-converted input)."""
    model = case.prepared()
    before = _snapshot(model)
    subject.convert(case, model)
    after = _snapshot(model)
    if before[0] != after[0]:
        event("the converter consumed the prepared model (graph rewritten in place)")
        subject.record.note("converts in place: the prepared model's graph is rewritten")
        return
    _assert_unchanged(subject, case, before, after)


def _no_observer_left(subject, case):
    converted = subject.convert(case)
    left = [name for name, m in converted.named_modules() if is_observer(m)]
    if left:
        subject.fail(case, f"observers / fake-quantizers left in the converted model: {left}")


def _deterministic(subject, case, run_under):
    with run_under():
        first = subject.convert(case)
        second = subject.convert(case)
        outputs = []
        for model in (first, second):
            with torch.no_grad():
                outputs.append([model(*batch) for batch in case.inputs])
    for i, (a, b) in enumerate(zip(*outputs)):
        a, b = (t.dequantize() if t.is_quantized else t for t in (a, b))
        if not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            worst = (a - b).abs().max().item()
            subject.fail(case, f"two conversions of the same prepared model disagree on input #{i} "
                               f"(max |difference| {worst:g}, {torch.get_num_threads()} threads)")


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="patterns"))
def test_prepared_model_not_silently_changed(subject, case):
    _prepared_unchanged(subject, case)


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", qat=True, model=conv_bn_specs(qat=True)))
def test_qat_fold_leaves_prepared_model_unchanged(subject, case):
    # The QAT conv-bn fold is where converters wrote folded weights back through tensors they
    # share with the prepared model (pytorch#104593): every example here has one to fold.
    _prepared_unchanged(subject, case)


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="patterns"))
def test_no_observer_left(subject, case):
    _no_observer_left(subject, case)


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="patterns"))
def test_deterministic(subject, case):
    _deterministic(subject, case, lambda: torch.no_grad())


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="patterns"))
def test_fx_prepared_model_not_silently_changed(subject, case):
    with qref.use_engine(case.setup.engine):
        _prepared_unchanged(subject, case)


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="patterns"))
def test_fx_no_observer_left(subject, case):
    with qref.use_engine(case.setup.engine):
        _no_observer_left(subject, case)


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="patterns"))
def test_fx_deterministic(subject, case):
    # one thread: onednn's multi-threaded kernels are nondeterministic by design (ONEDNN_THREADS)
    _deterministic(subject, case, lambda: qref.use_engine(case.setup.engine, threads=1))


# --- pt2e ------------------------------------------------------------------------------------


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="ops"))
def test_train_eval_disallowed(subject, case):
    converted = subject.convert(case)
    for method in ("train", "eval"):
        try:
            getattr(converted, method)()
        except Exception:  # noqa: BLE001 - any clear refusal will do; torchao raises NotImplementedError
            continue
        subject.fail(case, f"converted.{method}() did not raise: a converted pt2e model must refuse "
                           "train()/eval() (use torchao's move_exported_model_to_eval/train)")


# Patterns where one quantized value feeds two ops: only there can a dequantize end up shared.
_FAN_OUT_CASES = st.booleans().flatmap(
    lambda qat: cases("pt2e", qat=qat, model=model_specs("pt2e", "patterns", qat, kinds=("add", "cat"))))


@pt2e
@ops_tier
@budget("ops")
@given(case=_FAN_OUT_CASES)
def test_each_dequantize_has_one_user(subject, case):
    converted = subject.convert(case)
    shared = {n.name: [u.name for u in real_users(n)]
              for n in converted.graph.nodes if is_call(n, DEQUANTIZE) and len(real_users(n)) > 1}
    if shared:
        subject.fail(case, f"dequantize nodes with more than one user (DuplicateDQ not applied): {shared}")


def _traced(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, QUANTIZE + DEQUANTIZE) and n.meta.get("stack_trace"))


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="patterns"))
def test_qdq_nodes_carry_metadata(subject, case):
    expected = _traced(qref.convert_pt2e(case.prepared(), fold_quantize=False))
    event(f"q/dq nodes with a stack trace in the reference: {'some' if expected else 'none'}")
    got = _traced(subject.convert(case, fold_quantize=False))
    if got < expected:
        subject.fail(case, f"only {got} q/dq nodes carry the stack trace of the node they came from; "
                           f"the reference ports it to {expected}")


def _weight_quantizes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, QUANTIZE) and n.args[0].op == "get_attr")


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="ops"))
def test_fold_quantize_honoured(subject, case):
    subject.require("fold_quantize")
    unfolded = _weight_quantizes(subject.convert(case, fold_quantize=False))
    folded = _weight_quantizes(subject.convert(case, fold_quantize=True))
    expected = _weight_quantizes(qref.convert_pt2e(case.prepared(), fold_quantize=False))
    if folded:
        subject.fail(case, f"fold_quantize=True left {folded} weight quantize ops in the graph")
    if unfolded != expected:
        subject.fail(case, f"fold_quantize=False: {unfolded} weight quantize ops in the graph, "
                           f"the reference keeps {expected}")


_WEIGHTED = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default,
             torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input}


def _float_weighted_after_dequantize(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _WEIGHTED
            and any(isinstance(a, torch.fx.Node) and is_call(a, DEQUANTIZE) for a in n.args[:2])]


@pt2e
@ops_tier
@budget("ops")
@given(case=cases("pt2e", tier="ops", qat=False))
def test_reference_representation_honoured(subject, case):
    subject.require("use_reference_representation")
    reference = qref.convert_pt2e(case.prepared(), use_reference_representation=True)
    if _float_weighted_after_dequantize(reference):
        event("the reference keeps this op in q/dq form")
        return
    converted = subject.convert(case, use_reference_representation=True)
    left = _float_weighted_after_dequantize(converted)
    if left:
        subject.fail(case, f"use_reference_representation=True left float ops on dequantized inputs: {left}")
    result = compare(reference, converted, case.inputs, EXACT)
    if not result.outputs_ok:
        subject.fail(case, f"the integer representation differs from qref's:\n{result.outputs_message()}")


# --- fx --------------------------------------------------------------------------------------


def _module_kinds(model) -> dict[str, str]:
    return {name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules() if name}


def _quantized_module_names(prepared) -> list[str]:
    """Weighted modules the prepared graph calls (fused ones included, e.g. ConvReLU2d)."""
    def weighted(m):
        return hasattr(m, "weight") or (isinstance(m, torch.nn.Sequential) and len(m) and hasattr(m[0], "weight"))

    return [str(n.target) for n in prepared.graph.nodes
            if n.op == "call_module" and weighted(prepared.get_submodule(str(n.target)))]


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="patterns"))
def test_fx_qconfig_none_stays_float(subject, case):
    subject.require("qconfig_mapping")
    names = _quantized_module_names(case.prepared())
    if not names:
        event("no weighted module to skip")
        return
    name = names[0]
    mapping = case.setup.qconfig_mapping().set_module_name(name, None)
    with qref.use_engine(case.setup.engine):
        converted = subject.convert(case, qconfig_mapping=mapping)
        expected = qref.convert_fx(case.prepared(), qconfig_mapping=copy.deepcopy(mapping))
    got, want = _module_kinds(converted).get(name), _module_kinds(expected).get(name)
    if got != want:
        subject.fail(case, f"qconfig_mapping sets module {name!r} to None (keep it float): the converter "
                           f"made it {got}, the reference keeps {want}")


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="ops"))
def test_fx_remove_qconfig_honoured(subject, case):
    subject.require("_remove_qconfig")

    def with_qconfig(model):
        return sorted(name for name, m in model.named_modules() if hasattr(m, "qconfig"))

    with qref.use_engine(case.setup.engine):
        for remove in (True, False):
            got = with_qconfig(subject.convert(case, _remove_qconfig=remove))
            want = with_qconfig(qref.convert_fx(case.prepared(), _remove_qconfig=remove))
            if got != want:
                subject.fail(case, f"_remove_qconfig={remove}: modules with a qconfig attribute {got}, "
                                   f"the reference has {want}")


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="ops"))
def test_fx_convert_custom_config_honoured(subject, case):
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig

    subject.require("convert_custom_config")
    model = case.prepared()
    model.qref_preserved = 7
    config = ConvertCustomConfig().set_preserved_attributes(["qref_preserved"])
    with qref.use_engine(case.setup.engine):
        converted = subject.convert(case, model, convert_custom_config=config)
    if getattr(converted, "qref_preserved", None) != 7:
        subject.fail(case, "convert_custom_config.set_preserved_attributes(['qref_preserved']) was not "
                           "honoured: the attribute is missing from the converted model")


def _without_linear(backend):
    from torch.ao.quantization.backend_config import BackendConfig

    keep = [c for c in backend.configs if c.pattern not in (torch.nn.Linear, torch.nn.functional.linear)]
    return BackendConfig("qref_without_linear").set_backend_pattern_configs(keep)


@fx
@ops_tier
@budget("ops")
@given(case=cases("fx", tier="ops", qat=False))  # QAT: torch leaves a FusedMovingAvgObsFakeQuantize
def test_fx_backend_config_honoured(subject, case):  # that cannot run when the backend drops its op
    subject.require("backend_config")
    backend = _without_linear(case.setup.backend_config())
    with qref.use_engine(case.setup.engine):
        got = _module_kinds(subject.convert(case, backend_config=backend))
        want = _module_kinds(qref.convert_fx(case.prepared(), backend_config=backend))
    if got != want:
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
        subject.fail(case, f"under a backend_config without Linear, module kinds differ from the "
                           f"reference (converter, reference): {diff}")
