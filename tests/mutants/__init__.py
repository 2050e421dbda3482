"""Deliberately broken converters: each plants ONE realistic bug, to show the suite catches it.

Every mutant is a plain function with exactly the contract of the converter it replaces
(``qref.convert_pt2e`` or ``qref.convert_fx``), built on that converter, so that running the
property suite against it (``--qref-converter tests.mutants.pt2e:round_half_away``) must fail
somewhere and nowhere else would a difference come from.  ``witness`` names a zoo model and
setup on which the bug is known to show (``tests/test_mutants_sanity.py`` checks it does).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Mutant:
    name: str
    flow: str  # "pt2e" | "fx"
    target: str  # "module:attribute", importable from the repo root
    bug_class: str
    description: str
    # (zoo model, setup name, qat): pt2e setups are qref.quantizers.SETUPS (qat is implied and
    # repeated here), fx setups are fixtures.fx_setups.SETUPS.
    witness: tuple[str, str, bool]
    # the properties meant to catch this bug class, as a pytest -k expression: the proof runs only
    # them, so a kill by a property that trips over a side effect of how the mutant is built
    # (e.g. a retargeted quantize no longer looks like one) does not count
    caught_by: str

    def load(self) -> Callable:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


# caught_by expressions: the property files (families) meant for numeric bug classes
EQUIVALENCE = "test_equivalence.py"
FOLDING = "test_equivalence.py or test_folding.py"


def _pt2e(fn: str, bug_class: str, description: str, witness, caught_by: str = EQUIVALENCE) -> Mutant:
    return Mutant(fn, "pt2e", f"tests.mutants.pt2e:{fn}", bug_class, description, witness, caught_by)


def _fx(fn: str, bug_class: str, description: str, witness, caught_by: str) -> Mutant:
    return Mutant(fn, "fx", f"tests.mutants.fx:{fn}", bug_class, description, witness, caught_by)



_ALL = [
    # --- pt2e: numerics of quantize / dequantize --------------------------------------------
    _pt2e("round_half_away", "rounding",
          "activation quantize rounds ties away from zero instead of to even "
          "(torch-xpu-ops std::round vs rint, real-converter-bugs #16)",
          ("linear", "qref_int8_sym", False)),
    _pt2e("saturation_wraps", "saturation",
          "activation quantize casts to the integer dtype without clamping: out-of-range "
          "values wrap around (pytorch#111471 style overflow)",
          ("linear", "qref_int8_sym", False)),
    _pt2e("zero_point_off_by_one", "zero-point",
          "activation dequantize uses zero_point + 1 (zero point recomputed with another "
          "rounding than the quantize's)",
          ("linear", "qref_uint8_hist", False)),
    _pt2e("large_tensor_tail", "large-tensor",
          "activation quantize of tensors with more than 4096 elements truncates instead of "
          "rounding every element past the 4096th (a second kernel chunk on another code path)",
          ("mobilenet_v2_like", "qref_int8_sym", False)),
    _pt2e("uint8_stored_signed", "activation-dtype",
          "uint8 activations are stored as int8 with zero point - 128: the same real values in another "
          "integer type than the quantizer annotated (caught only by the dtype check at each point)",
          ("linear", "qref_uint8_hist", False)),
    _pt2e("int16_as_int8", "int16",
          "int16 activations are quantized with int8's range [-128, 127] (a converter written for "
          "8-bit activations only); shows only on int16 setups",
          ("linear", "qref_int16", False)),
    _pt2e("rank3_linear_input_float", "rank-3 linear",
          "a Linear on a 3-D/4-D input reads its float input (the q/dq matcher knows 2-D linears "
          "only); shows only on transformer-shaped inputs",
          ("attention", "qref_int8_sym", False)),
    _pt2e("conv3d_input_float", "conv3d",
          "a conv3d reads its float input (the q/dq matcher knows conv1d and conv2d only); shows "
          "only on volumes",
          ("conv3d_relu", "qref_int8_sym", False)),
    _pt2e("nondeterministic_scale", "nondeterminism",
          "every second call nudges one activation scale by 2**-6 (qparams picked by "
          "set-iteration order / unstable tie-breaking)",
          ("linear", "qref_int8_sym", False), "test_deterministic"),
    _pt2e("keeps_state_between_calls", "stateful-model",
          "the converted model grows a buffer in place on every call and scales an activation by "
          "it: its outputs depend on how often it was called",
          ("linear", "qref_int8_sym", False), "outputs_independent_of_call_history"),
    _pt2e("fixed_qparams_recomputed", "fixed-qparams",
          "sigmoid/tanh outputs quantized with a min/max observer's scale for their range "
          "(range / 255) instead of the quantizer's fixed qparams (range / 256)",
          ("sigmoid_tanh", "qref_int8_sym", False)),
    _pt2e("second_input_reads_first_qparams", "multi-input-qparams",
          "a two-input op (add, matmul) dequantizes its second input with its first input's "
          "scale and zero point (a lowering that reads one input's qparams for both)",
          ("residual_add", "qref_int8_sym", False)),
    _pt2e("every_graph_input_gets_first_qparams", "multi-graph-input-qparams",
          "every graph input is quantized (and dequantized) with the first graph input's scale and "
          "zero point (a converter written for models of one input); shows only on a second input",
          ("two_inputs", "qref_int8_sym", False), "test_two_input_graph_matches_reference"),
    _pt2e("later_outputs_left_float", "multi-output",
          "only the first graph output keeps its quantize/dequantize; later outputs return the float "
          "value (an output pass that reads output.args[0][0] only); shows only on a second output",
          ("two_outputs", "qref_int8_sym", False), "test_two_output_graph_matches_reference"),
    _pt2e("embedding_zero_points_rounded", "embedding-float-zero-points",
          "an embedding table's per-row float zero points (per_channel_affine_float_qparams) are "
          "rounded to integers, as an affine weight's; shows only on an embedding weight",
          ("embedding", "qref_int8_sym", False), "test_embedding_matches_reference"),
    # --- pt2e: weights and biases -------------------------------------------------------------
    _pt2e("per_channel_scales_reversed", "per-channel-axis",
          "per-channel weight scales applied in reversed channel order (scales indexed "
          "from the wrong end / along the wrong axis)",
          ("conv_bn_relu", "qref_int8_sym", False)),
    _pt2e("per_channel_collapsed", "per-channel-collapsed",
          "per-channel weight scales collapsed to one per-tensor scale (their max)",
          ("conv_bn_relu", "qref_int8_sym", False)),
    _pt2e("grouped_conv_scales_misindexed", "grouped-conv",
          "per-channel scales of a grouped conv (groups > 1) indexed group-major instead of "
          "channel-major (real-converter-bugs #4, pytorch#180995 family)",
          ("grouped_conv", "qref_int8_sym", False)),
    _pt2e("bias_scale_input_only", "bias-scale",
          "int32 bias quantized with the input scale only instead of input_scale * "
          "weight_scale (P-BIAS)",
          ("conv_bn_relu", "qref_int8_sym", False)),
    # --- pt2e: QAT conv-bn folding ------------------------------------------------------------
    _pt2e("bn_running_mean_ignored", "bn-running-mean",
          "QAT conv-bn fold ignores the BN running mean (folds as if it were 0)",
          ("conv_bn_relu", "qref_int8_sym_qat", True), FOLDING),
    _pt2e("shared_weight_quantized_once", "shared-weight",
          "a weight used by two ops (a module called twice) is quantized for its first user only; "
          "the second reads it float (shows only on shared weights; the zoo has none: its witness "
          "check builds one)",
          ("conv_bn_relu", "qref_int8_sym", False)),
    _pt2e("bn_beta_dropped", "bn-beta",
          "QAT conv-bn fold leaves out the BN's beta (shows only where beta is non-zero)",
          ("conv_bn_relu", "qref_int8_sym_qat", True), FOLDING),
    _pt2e("conv_bias_added_twice", "bn-conv-bias-twice",
          "QAT conv-bn fold adds the conv bias twice (pytorch#48514)",
          ("conv_bn_relu", "qref_int8_sym_qat", True), FOLDING),
    _pt2e("folded_weights_written_back", "input-mutated",
          "folded QAT weights are written into the prepared model's own parameters "
          "(in-place fold through shared tensors; pytorch#104593, ao PR #2795)",
          ("conv_bn_relu", "qref_int8_sym_qat", True),
          "prepared_model_not_silently_changed or qat_fold_leaves_prepared_model_unchanged"),
    _pt2e("consumes_and_writes_back", "input-mutated-in-place-conversion",
          "converts in place like torchao (the prepared graph is rewritten) and the QAT fold "
          "writes through the prepared model's parameters (a rewritten graph once hid this)",
          ("conv_bn_relu", "qref_int8_sym_qat", True),
          "prepared_model_not_silently_changed or qat_fold_leaves_prepared_model_unchanged"),
    # --- pt2e: graph structure and contract ----------------------------------------------------
    _pt2e("dropped_qdq", "dropped-qdq",
          "the q/dq pair on one intermediate activation is dropped (a pattern not matched, "
          "cf. pytorch#99524)",
          ("conv_bn_relu", "qref_int8_sym", False)),
    _pt2e("observer_left", "observer-left",
          "one activation observer is left in the converted graph instead of becoming q/dq",
          ("linear", "qref_int8_sym", False), "test_no_observer_left"),
    _pt2e("shared_dequantize", "duplicate-dq-skipped",
          "a dequantize used by several quantized ops stays shared (DuplicateDQ undone by a "
          "CSE; pytorch PR #103759)",
          ("residual_add", "x86_ptq_pc", False), "test_each_dequantize_has_one_user"),
    _pt2e("metadata_lost", "metadata",
          "q/dq nodes do not inherit stack_trace / quantization_tag from the ops they quantize",
          ("linear", "qref_int8_sym", False), "test_qdq_nodes_carry_metadata"),
    _pt2e("fold_quantize_ignored", "flag-fold-quantize-ignored",
          "fold_quantize=False is ignored: weights are always folded to integer constants",
          ("linear", "qref_int8_sym", False), "test_fold_quantize_honoured"),
    _pt2e("reference_representation_ignored", "flag-reference-representation-ignored",
          "use_reference_representation=True is ignored: the q/dq form is always returned",
          ("linear", "qref_int8_sym", False), "test_reference_representation_honoured"),
    # --- fx ------------------------------------------------------------------------------------
    _fx("output_scale_off", "kernel-output-scale",
        "lowered quantized modules get output scale * (1 + 2**-10)",
        ("mlp", "fbgemm", False), "test_equivalence.py or test_kernels.py"),
    _fx("weight_scales_collapsed", "fx-weight-packing",
        "per-channel weights of lowered convs and linears are packed with one scale (their largest "
        "channel's) instead of each channel's own: the FX weight quantization and packing",
        ("conv_bn_relu", "fbgemm", False), "test_equivalence.py or test_kernels.py"),
    _fx("weighted_output_keeps_input_qparams", "fx-weighted-output-qparams",
        "lowered convs and linears output on their input's scale and zero point instead of their own (qparams "
        "propagated as through an op without weights, which may keep its input's grid): the kernel family's "
        "check of each lowered module on its own output qparams",
        ("mlp", "fbgemm", False), "test_kernels.py"),
    _fx("none_qconfig_ignored", "qconfig-mapping-none",
        "None entries of convert_fx's qconfig_mapping are ignored: skipped modules are "
        "quantized anyway",
        ("conv_bn_relu", "fbgemm_skip", False), "test_fx_qconfig_none_stays_float"),
    _fx("qconfig_kept", "remove-qconfig-ignored",
        "_remove_qconfig is ignored: converted modules keep the qconfig of the modules they "
        "replace",
        ("conv_bn_relu", "fbgemm", False), "test_fx_remove_qconfig_honoured"),
    _fx("preserved_attributes_dropped", "preserved-attributes",
        "convert_custom_config's preserved_attributes are dropped",
        ("linear", "fbgemm", False), "test_fx_convert_custom_config_honoured"),
    _fx("backend_config_ignored", "backend-config-ignored",
        "backend_config is ignored: the native backend config is always used",
        ("linear", "fbgemm", False), "test_fx_backend_config_honoured"),
    _fx("bn_eps_default", "bn-eps",
        "QAT conv-bn fold uses BatchNorm's default eps 1e-5 instead of the module's eps",
        ("conv_bn_relu", "fbgemm", True), FOLDING),
    _fx("fixed_qparams_requantized", "fx-fixed-qparams",
        "lowered sigmoid/tanh outputs requantized to a min/max observer's scale for their range "
        "(range / 255) instead of their fixed qparams (range / 256)",
        ("sigmoid_tanh", "fbgemm", False), EQUIVALENCE),
    _fx("dynamic_activation_qparams_frozen", "fx-dynamic-activation-qparams",
        "dynamic int8 Linear inputs quantized with the qparams of the first call instead of each call's "
        "own (a dynamic Linear lowered as if its activation qparams were static); shows only on dynamic setups",
        ("mlp", "dynamic_linear", False), "fx_dynamic_linear_matches_reference"),
    _fx("float16_weights_truncated", "fx-float16-weight-rounding",
        "float16 dynamic Linear weights cast toward zero (mantissa bits cut) instead of rounded to nearest; "
        "shows only on float16 setups",
        ("mlp", "float16_linear", False), "fx_float16_linear_matches_reference"),
    _fx("regex_none_entries_ignored", "qconfig-mapping-none-regex",
        "module_name_regex None entries of convert_fx's qconfig_mapping are ignored (module-name and "
        "object-type entries are honoured): the modules they match are quantized anyway",
        ("conv_bn_relu", "fbgemm_skip_regex", False), "test_fx_qconfig_none_stays_float"),
    _fx("preserved_attributes_not_recorded", "preserved-attributes-deepcopy",
        "preserved attributes are set on the converted model but not recorded in its "
        "meta['_user_preserved_attributes'], so a deepcopy of the converted model loses them",
        ("linear", "fbgemm", False), "test_fx_convert_custom_config_honoured"),
    _fx("conv3d_not_lowered", "fx-module-not-lowered",
        "Conv3d and ConvReLU3d stay reference modules (float conv3d between a dequantize and a quantize): "
        "a lowering table that knows 1-D and 2-D convs only; shows only on volumes",
        ("conv3d_relu", "fbgemm", False), EQUIVALENCE),
    Mutant("fx_every_graph_input_gets_first_qparams", "fx", "tests.mutants.fx:every_graph_input_gets_first_qparams",
           "fx-multi-graph-input-qparams",
           "every graph input of the lowered model is quantized with the first graph input's scale and zero "
           "point (a converter written for models of one input); shows only on a second input",
           ("two_inputs", "fbgemm", False), "test_fx_two_input_graph_matches_reference"),
    # --- compared where it was promised (tests/mutants/verdicts.py) ---------------------------
    Mutant("inner_scale_hidden", "fx", "tests.mutants.verdicts:inner_scale_hidden", "fx-inner-module-qparams",
           "inner lowered modules' output scale * (1 + 2**-20) (qparams recomputed with another float "
           "rounding): no integer and no final output changes, only that module's qparams",
           ("mlp", "fbgemm", False), "fx_pattern_matches_reference or fx_model_matches_reference"),
    Mutant("same_scale_error_on_every_engine", "fx", "tests.mutants.verdicts:same_scale_error_on_every_engine",
           "engine-independent-kernel-scale",
           "every lowered module's output scale * 1.01 on every engine, so engines agree with each other",
           ("mlp", "fbgemm", False), "test_engines_agree"),
    Mutant("representation_rounds_half_up", "pt2e", "tests.mutants.verdicts:representation_rounds_half_up",
           "reference-representation-bias",
           "the reference representation's quantizes round ties up (floor(x + 0.5)) instead of to even: "
           "1 LSB at a quantize, at ties only",
           ("linear", "qref_int8_sym", False), "test_reference_representation_matches_reference"),
    Mutant("float_output_dequantize_rescaled", "pt2e", "tests.mutants.verdicts:float_output_dequantize_rescaled",
           "float-output", "the dequantizes after which the graph computes a float output (an op the quantizer "
           "left float, e.g. X86InductorQuantizer's last linear) use scale * (1 + 2**-8): no quantize point "
           "changes, only the float output (judged bit for bit at the exact tolerance)",
           ("linear", "x86_ptq_pt", False), EQUIVALENCE),
    Mutant("float_op_input_requantized", "pt2e", "tests.mutants.verdicts:float_op_input_requantized",
           "extra-quantize-point", "the input of each op whose float output the graph returns is quantized and "
           "dequantized again on its own grid (a redundant q/dq pair): no value changes, but the candidate has "
           "a quantize point the reference does not (an extra point)",
           ("linear", "x86_ptq_pt", False), EQUIVALENCE),
    Mutant("qat_held_qparams", "pt2e", "tests.mutants.qat:qat_held_qparams", "qat-held-qparams",
           "where a fake-quantizer holds other qparams than its observer reports (torch's fused "
           "moving-average fake-quant: no eps, affine qparams for a same-signed channel of a symmetric "
           "weight), the conversion uses the held ones instead of the observer's",
           ("conv_bn_relu", "x86_qat_pc", True), "converted_matches_qat_model"),
    Mutant("qat_fold_default_eps", "pt2e", "tests.mutants.qat:qat_fold_default_eps", "pt2e-bn-eps",
           "QAT conv-bn fold uses BatchNorm's default eps 1e-5 instead of the graph's eps (torchao 0.18's "
           "_fold_conv_bn_qat takes it from its replacement pattern's literal)",
           ("conv_bn_relu", "qref_int8_sym_qat", True), "test_qat_fold_uses_the_graphs_bn_eps"),
    # --- pt2e: quantization ranges, weight axes, dynamic and mixed-dtype graphs ----------------
    _pt2e("clamps_to_dtype_range", "quant-range-clamp",
          "activation quantizes clamp to the dtype's full range instead of the spec's quant_min/"
          "quant_max (a kernel that reads only the dtype); shows on narrow and reduced ranges",
          ("linear", "qref_int8_narrow", False)),
    _pt2e("weight_axis_assumed_zero", "per-channel-weight-axis",
          "per-channel weights whose axis is not 0 (input channels; a ConvTranspose's output "
          "channels) are quantized per channel of axis 0, scales recomputed there (the spec's ch_axis "
          "ignored, cf. torchao's prepare dropping ch_axis for non-PerChannel class names)",
          ("conv_bn_relu", "qref_weight_input_axis", False)),
    _pt2e("one_activation_dtype", "mixed-activation-dtypes",
          "every activation is quantized with the first quantize's dtype and range, so int16 "
          "layers among int8 ones lose their dtype and the requantization at each boundary",
          ("mlp", "qref_mixed_int16", False)),
    _pt2e("dynamic_qparams_frozen", "dynamic-qparams-frozen",
          "dynamically quantized activations keep the qparams choose_qparams gave on the first call "
          "(folded as if constant) instead of choosing them on every call",
          ("mlp", "qref_dynamic_linear", False)),
]

MUTANTS: dict[str, Mutant] = {m.name: m for m in _ALL}

__all__ = ["MUTANTS", "Mutant"]
