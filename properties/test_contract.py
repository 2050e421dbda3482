"""Property family 5: the converter's contract beyond numerics (seed documents, design notes §5).

Each clause is its own property so the conformance table says which one a converter breaks.
Where the contract is "do what the reference does" (module kinds under a backend_config, which
modules keep ``qconfig``), the candidate is compared with qref's conversion of the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import strategies as st

import qref
from qref.compare import EXACT, compare
from qref.observers import is_observer
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call, real_users
from qref.strategies import conv_bn_specs
from qref.strategies.setups import fx_none_entries, fx_skip_mapping

from ._support import evaluation_ready, prop, subject  # noqa: F401 (subject: fixture)

pytestmark = pytest.mark.qref_family("contract")

# The contract's clauses are checked early (tier ops: a converter that breaks one is not
# compared on patterns and models) on models the size of a pattern, which exercise more of the
# graph (batch norms, residuals, fan-out) than a single op.


# --- both flows ------------------------------------------------------------------------------


def _snapshot(model):
    """Everything a converter could change on the model it was given: its graph and submodules,
    and every tensor it holds (parameters, buffers, observer statistics) as the object itself
    (a converter may write through it after detaching it from the model) with a copy of its value."""
    graph = str(model.graph) if hasattr(model, "graph") else None
    observers = {name for name, m in model.named_modules() if is_observer(m)}
    tensors = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            owner = name.rpartition(".")[0]
            statistic = any(owner == o or owner.startswith(o + ".") for o in observers)
            tensors[name] = (value, value.detach().clone(), statistic)
    modules = {name: type(m) for name, m in model.named_modules()}
    return graph, tensors, modules


def _changed_tensors(before) -> tuple[list[str], list[str]]:
    """(parameters and buffers, observer statistics) whose tensor objects now hold other values."""
    changed = ([], [])
    for name, (tensor, value, statistic) in before[1].items():
        now = tensor.detach()
        if now.shape != value.shape or not torch.equal(torch.nan_to_num(now), torch.nan_to_num(value)):
            changed[statistic].append(name)
    return changed


def _prepared_unchanged(subject, case):
    """A converter may consume the prepared model (torchao's convert_pt2e and torch's convert_fx
    rewrite its graph in place), but it must not write into the tensors the prepared model held:
    they may be shared (pytorch#104593: a fold written through the float model's own weights),
    and a model left looking prepared with other weights is a half-converted input.  The
    tensors are compared whether or not the graph was rewritten."""
    model = case.prepared()
    before = _snapshot(model)
    subject.convert(case, model)
    after = _snapshot(model)
    subject.compared()
    problems = []
    consumed = before[0] != after[0]
    if consumed:
        subject.record.note("converts in place: the prepared model's graph is rewritten")
    elif before[2] != after[2]:
        changed = sorted(set(before[2].items()) ^ set(after[2].items()))[:3]
        problems.append(f"its submodules changed: {changed}")
    weights, statistics = _changed_tensors(before)
    if weights:
        problems.append(f"parameters and buffers changed: {', '.join(weights[:8])}"
                        + (f" (+{len(weights) - 8} more)" if len(weights) > 8 else ""))
    if statistics:
        problems.append(f"observer statistics changed: {', '.join(statistics)}")
    if not consumed:
        for name in before[1]:
            if name not in after[1] or after[1][name][0] is not before[1][name][0]:
                problems.append(f"tensor {name!r} was replaced or removed")
                break
    if problems:
        subject.fail(case, "the converter mutated the prepared model it was given"
                           f"{' (its graph was rewritten in place)' if consumed else ''}: " + "; ".join(problems))


def _no_observer_left(subject, case):
    converted = subject.convert(case)
    subject.compared()
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
    subject.compared()
    for i, (a, b) in enumerate(zip(*outputs)):
        a, b = (t.dequantize() if t.is_quantized else t for t in (a, b))
        if not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            worst = (a - b).abs().max().item()
            subject.fail(case, f"two conversions of the same prepared model disagree on input #{i} "
                               f"(max |difference| {worst:g}, {torch.get_num_threads()} threads)")


@prop("pt2e", "ops", specs="patterns")
def test_prepared_model_not_silently_changed(subject, case):
    _prepared_unchanged(subject, case)


@prop("pt2e", "ops", specs="patterns", qat=True, model=conv_bn_specs(qat=True))  # a conv-bn: a pattern
def test_qat_fold_leaves_prepared_model_unchanged(subject, case):
    # The QAT conv-bn fold is where converters wrote folded weights back through tensors they
    # share with the prepared model (pytorch#104593): every example here has one to fold.
    _prepared_unchanged(subject, case)


@prop("pt2e", "ops", specs="patterns")
def test_no_observer_left(subject, case):
    _no_observer_left(subject, case)


@prop("pt2e", "ops", specs="patterns")
def test_deterministic(subject, case):
    _deterministic(subject, case, lambda: torch.no_grad())


@prop("fx", "ops", specs="patterns")
def test_fx_prepared_model_not_silently_changed(subject, case):
    with qref.use_engine(case.setup.engine):
        _prepared_unchanged(subject, case)


@prop("fx", "ops", specs="patterns")
def test_fx_no_observer_left(subject, case):
    with qref.use_engine(case.setup.engine):
        _no_observer_left(subject, case)


@prop("fx", "ops", specs="patterns")
def test_fx_deterministic(subject, case):
    # one thread: onednn's multi-threaded kernels are nondeterministic by design (ONEDNN_THREADS)
    _deterministic(subject, case, lambda: qref.use_engine(case.setup.engine, threads=1))


def _outputs_independent_of_history(subject, case):
    """A converted model computes a function of its input: running it again on the same inputs
    gives the same outputs.  One that updates state on every call (a train-mode batch norm left
    by QAT, an observer left in) makes every verdict depend on how often it was called.  Checked
    on the model made ready for inference as its flow documents (``evaluation_ready``); the model
    as returned is noted when only that step makes it stateless."""
    raw = subject.convert(case, ready=False)
    from qref.pt2e.eval_mode import train_mode_ops

    if case.setup.flow == "pt2e" and train_mode_ops(raw):
        subject.record.note("the converted model as returned keeps train-mode ops (batch norm / dropout) "
                            "that update state on every call: run it after move_exported_model_to_eval")
    converted = evaluation_ready(raw, case)
    with torch.no_grad():
        first = [converted(*batch) for batch in case.inputs]
        second = [converted(*batch) for batch in case.inputs]
    subject.compared()
    for i, (a, b) in enumerate(zip(first, second)):
        a, b = (t.dequantize() if t.is_quantized else t for t in (a, b))
        if not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            subject.fail(case, f"the converted model's output on input #{i} changed when it was run again "
                               f"on the same inputs (max |difference| {(a - b).abs().max().item():g}): it "
                               "keeps state between calls")


@prop("pt2e", "ops", specs="patterns")
def test_outputs_independent_of_call_history(subject, case):
    _outputs_independent_of_history(subject, case)


@prop("fx", "ops", specs="patterns")
def test_fx_outputs_independent_of_call_history(subject, case):
    with qref.use_engine(case.setup.engine, threads=1):  # onednn: ONEDNN_THREADS
        _outputs_independent_of_history(subject, case)


# --- pt2e ------------------------------------------------------------------------------------


@prop("pt2e", "ops")
def test_train_eval_disallowed(subject, case):
    converted = subject.convert(case, ready=False)
    subject.compared()
    for method in ("train", "eval"):
        try:
            getattr(converted, method)()
        except Exception:  # noqa: BLE001 - any clear refusal will do; torchao raises NotImplementedError
            continue
        subject.fail(case, f"converted.{method}() did not raise: a converted pt2e model must refuse "
                           "train()/eval() (use torchao's move_exported_model_to_eval/train)")


# Patterns where one quantized value feeds two ops: only there can a dequantize end up shared.
@prop("pt2e", "ops", specs="patterns", kinds=("add", "cat"))
def test_each_dequantize_has_one_user(subject, case):
    if not _has_fan_out(subject.reference(case)):
        subject.not_compared("no quantized value feeds two quantized ops in the reference")
        return
    converted = subject.convert(case)
    subject.compared()
    shared = {n.name: [u.name for u in real_users(n)]
              for n in converted.graph.nodes if is_call(n, DEQUANTIZE) and len(real_users(n)) > 1}
    if shared:
        subject.fail(case, f"dequantize nodes with more than one user (DuplicateDQ not applied): {shared}")


def _has_fan_out(gm) -> bool:
    """Some quantized value feeds more than one op: a quantize with several dequantizes (one per
    consumer, as DuplicateDQ leaves them)."""
    return any(sum(1 for u in real_users(n) if is_call(u, DEQUANTIZE)) > 1
               for n in gm.graph.nodes if is_call(n, QUANTIZE))


def _traced(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, QUANTIZE + DEQUANTIZE) and n.meta.get("stack_trace"))


@prop("pt2e", "ops", specs="patterns")
def test_qdq_nodes_carry_metadata(subject, case):
    expected = _traced(subject.reference(case, fold_quantize=False))
    if not expected:
        subject.not_compared("no q/dq node of the reference carries a stack trace")
        return
    got = _traced(subject.convert(case, fold_quantize=False))
    subject.compared()
    if got < expected:
        subject.fail(case, f"only {got} q/dq nodes carry the stack trace of the node they came from; "
                           f"the reference ports it to {expected}")


def _weight_quantizes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, QUANTIZE) and n.args[0].op == "get_attr")


@prop("pt2e", "ops")
def test_fold_quantize_honoured(subject, case):
    subject.require("fold_quantize")
    expected = _weight_quantizes(subject.reference(case, fold_quantize=False))
    if not expected:
        subject.not_compared("the reference quantizes no weight")
        return
    unfolded = _weight_quantizes(subject.convert(case, fold_quantize=False))
    folded = _weight_quantizes(subject.convert(case, fold_quantize=True))
    subject.compared()
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


@prop("pt2e", "ops", qat=False)
def test_reference_representation_honoured(subject, case):
    subject.require("use_reference_representation")
    reference = subject.reference(case, use_reference_representation=True)
    if _float_weighted_after_dequantize(reference):
        subject.not_compared("the reference keeps this op in q/dq form")
        return
    converted = subject.convert(case, use_reference_representation=True)
    subject.compared()
    left = _float_weighted_after_dequantize(converted)
    if left:
        subject.fail(case, f"use_reference_representation=True left float ops on dequantized inputs: {left}")
    result = compare(reference, converted, case.inputs, EXACT)
    if not result.outputs_ok:
        subject.fail(case, f"the integer representation differs from qref's:\n{result.outputs_message()}")


# --- fx --------------------------------------------------------------------------------------


def _module_kinds(model) -> dict[str, str]:
    return {name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules() if name}


def _is_quantized_module(module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _matched_by(prepared, mapping) -> list[str]:
    """The called modules a None entry of ``mapping`` names: by module name (or a parent's), by a
    module-name regex (``re.match``, as torch resolves it) or by their exact type."""
    import re

    from qref.strategies.setups import fx_called

    names, _ = fx_called(prepared)
    by_type = mapping.object_type_qconfigs
    matched = []
    for name in names:
        module = prepared.get_submodule(name)
        float_cls = getattr(type(module), "_FLOAT_MODULE", type(module))
        parents = [name] + [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        if (any(mapping.module_name_qconfigs.get(p, 0) is None for p in parents)
                or any(q is None and re.match(pattern, name) for pattern, q in mapping.module_name_regex_qconfigs.items())
                or by_type.get(float_cls, 0) is None):
            matched.append(name)
    return matched


@prop("fx", "ops", specs="patterns", entries=fx_none_entries())
def test_fx_qconfig_none_stays_float(subject, case, entries):
    """Convert-time None entries (module name, module-name regex, object type: drawn over the
    prepared model's called modules and ops) keep what they match float, and the rest converts
    like the reference: the same module kinds everywhere and, lowered on the case's engine, the
    same integers at every point."""
    subject.require("qconfig_mapping")
    subject.drew(entries=entries)
    mapping, calls = fx_skip_mapping(case.setup, case.prepared(), entries)
    shown = "qconfig_mapping." + ".".join(calls)
    matched = _matched_by(case.prepared(), mapping)
    with qref.use_engine(case.setup.engine, threads=1):
        converted = subject.convert(case, qconfig_mapping=mapping)
        expected = subject.reference(case, qconfig_mapping=copy.deepcopy(mapping))
        result = compare(expected, converted, case.inputs, subject.tolerance(EXACT))
    subject.compared()
    modules = dict(converted.named_modules())
    quantized = [name for name in matched if name in modules and _is_quantized_module(modules[name])]
    if quantized:
        subject.fail(case, f"{shown}: the converter quantized {quantized}, which the None entries keep float")
    got, want = _module_kinds(converted), _module_kinds(expected)
    if got != want:
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
        subject.fail(case, f"{shown}: module kinds differ from the reference (converter, reference): {diff}")
    if not result.ok:
        subject.fail(case, f"{shown}: {subject.target} vs qref.convert_fx on {case.setup.engine}:\n"
                           f"{result.message()}", comparison=result)


@prop("fx", "ops")
def test_fx_remove_qconfig_honoured(subject, case):
    subject.require("_remove_qconfig")

    def with_qconfig(model):
        return sorted(name for name, m in model.named_modules() if hasattr(m, "qconfig"))

    with qref.use_engine(case.setup.engine):
        for remove in (True, False):
            got = with_qconfig(subject.convert(case, _remove_qconfig=remove))
            want = with_qconfig(subject.reference(case, _remove_qconfig=remove))
            subject.compared()
            if got != want:
                subject.fail(case, f"_remove_qconfig={remove}: modules with a qconfig attribute {got}, "
                                   f"the reference has {want}")


# attribute values a user may hang on a model (a flag, a tensor, mutable containers)
_PRESERVABLE = {"qref_flag": lambda: 7, "qref_tensor": lambda: torch.arange(3.0),
                "qref_labels": lambda: {"cat": 0, "dog": 1}, "qref_history": lambda: [0.5, 0.25]}


@prop("fx", "ops", preserved=st.lists(st.sampled_from(sorted(_PRESERVABLE)), min_size=1, max_size=3, unique=True))
def test_fx_convert_custom_config_honoured(subject, case, preserved):
    """``convert_custom_config.set_preserved_attributes(names)``: each named attribute of the
    prepared model is on the converted model, the very object (torch keeps it, not a copy), and
    survives a deepcopy of the converted model, as torch records them in its meta for that."""
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig

    subject.require("convert_custom_config")
    subject.drew(preserved=preserved)
    model = case.prepared()
    values = {name: _PRESERVABLE[name]() for name in preserved}
    for name, value in values.items():
        setattr(model, name, value)
    config = ConvertCustomConfig().set_preserved_attributes(list(preserved))
    with qref.use_engine(case.setup.engine):
        converted = subject.convert(case, model, convert_custom_config=config)
    subject.compared()
    said = f"convert_custom_config.set_preserved_attributes({list(preserved)}) was not honoured"
    missing = [name for name in preserved if not hasattr(converted, name)]
    if missing:
        subject.fail(case, f"{said}: {missing} missing from the converted model")
    copied = [name for name in preserved if getattr(converted, name) is not values[name]]
    if copied:
        subject.fail(case, f"{said}: {copied} are other objects than the prepared model's (copied or rebuilt)")
    again = copy.deepcopy(converted)
    lost = [name for name in preserved if not hasattr(again, name)]
    if lost:
        subject.fail(case, f"{said}: a deepcopy of the converted model loses {lost} (not recorded in its "
                           "meta['_user_preserved_attributes'], which GraphModule's deepcopy restores)")


def _prepared_with_custom_module(case, index: int):
    """The case's float model with its ``index``-th (modulo) called module wrapped in a custom
    module, prepared and calibrated like the case (None: nothing to wrap, or prepare refuses it)."""
    import warnings

    from torch.ao.quantization.quantize_fx import prepare_fx

    from qref.strategies import fx_custom

    model = case.float_model()
    paths = fx_custom.leaf_modules(model)
    if not paths:
        return None, None
    path = paths[index % len(paths)]
    prepare_config, _ = fx_custom.custom_configs()
    fx_custom.with_custom_module(model, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(model, case.setup.qconfig_mapping(), case.example_inputs,
                                  prepare_custom_config=prepare_config, backend_config=case.setup.backend_config())
            with torch.no_grad():
                for batch in case.calibration:
                    prepared(*batch)
    except Exception:  # noqa: BLE001 - preparation is not under test
        return None, path
    return prepared, path


@prop("fx", "ops", qat=False, specs="patterns", index=st.integers(0, 15))
def test_fx_custom_module_converted(subject, case, index):
    """``convert_custom_config.set_observed_to_quantized_mapping``: the observed custom module
    (one module of the case's model, drawn, wrapped in a custom class at prepare) becomes the
    user's quantized class, fed the quantized tensor, and the rest converts like the reference
    (module kinds, and integers at every point on the case's engine)."""
    from qref.strategies import fx_custom

    subject.require("convert_custom_config")
    subject.drew(index=index)
    prepared, path = _prepared_with_custom_module(case, index)
    if prepared is None:
        subject.not_compared("prepare_fx refuses a custom module there")
        return
    _, config = fx_custom.custom_configs()
    with qref.use_engine(case.setup.engine, threads=1):
        converted = subject.convert(case, copy.deepcopy(prepared), convert_custom_config=copy.deepcopy(config))
        expected = subject.reference(case, copy.deepcopy(prepared), convert_custom_config=copy.deepcopy(config))
        result = compare(expected, converted, case.inputs, subject.tolerance(EXACT))
    subject.compared()
    said = f"custom module at {path!r}"
    got = type(converted.get_submodule(path)) if path in dict(converted.named_modules()) else None
    if got is not fx_custom.CustomQuantized:
        subject.fail(case, f"{said}: the converter made it {got}, not the mapped quantized class CustomQuantized")
    kinds, want = _module_kinds(converted), _module_kinds(expected)
    if kinds != want:
        diff = {k: (kinds.get(k), want.get(k)) for k in sorted(set(kinds) | set(want)) if kinds.get(k) != want.get(k)}
        subject.fail(case, f"{said}: module kinds differ from the reference (converter, reference): {diff}")
    if not result.ok:
        subject.fail(case, f"{said}: {subject.target} vs qref.convert_fx on {case.setup.engine}:\n{result.message()}",
                     comparison=result)


def _without_linear(backend):
    from torch.ao.quantization.backend_config import BackendConfig

    keep = [c for c in backend.configs if c.pattern not in (torch.nn.Linear, torch.nn.functional.linear)]
    return BackendConfig("qref_without_linear").set_backend_pattern_configs(keep)


@prop("fx", "ops", qat=False)  # QAT: torch leaves a FusedMovingAvgObsFakeQuantize
def test_fx_backend_config_honoured(subject, case):  # that cannot run when the backend drops its op
    subject.require("backend_config")
    backend = _without_linear(case.setup.backend_config())
    with qref.use_engine(case.setup.engine):
        got = _module_kinds(subject.convert(case, backend_config=backend))
        want = _module_kinds(subject.reference(case, backend_config=backend))
    subject.compared()
    if got != want:
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
        subject.fail(case, f"under a backend_config without Linear, module kinds differ from the "
                           f"reference (converter, reference): {diff}")
