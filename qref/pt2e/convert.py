"""``convert_pt2e``: a prepared, calibrated pt2e model -> its quantized q/dq form.

The steps, in the order the specification gives them:
validate -> observers to q/dq -> fold QAT conv-bn -> duplicate dq -> port metadata
-> (fold quantized weights) -> (reference representation) -> metadata, train/eval off.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx

from . import validate
from .duplicate_dq import duplicate_dequantize
from .fold_qat_bn import fold_qat_conv_bn
from .fold_quantize import fold_quantized_weights
from .metadata import port_metadata
from .qdq import replace_observers

log = logging.getLogger("qref")


def convert_pt2e(
    model: fx.GraphModule,
    use_reference_representation: bool = False,
    fold_quantize: bool = True,
) -> fx.GraphModule:
    """Convert a calibrated/trained pt2e model; the model passed in is left unchanged."""
    torch._C._log_api_usage_once("qref.convert_pt2e")
    log.info(
        "convert_pt2e(use_reference_representation=%r, fold_quantize=%r)",
        use_reference_representation,
        fold_quantize,
    )
    validate.check_flags(
        use_reference_representation=use_reference_representation, fold_quantize=fold_quantize
    )
    validate.check_model(model)
    original_meta = dict(model.meta)
    model = copy.deepcopy(model)

    model = replace_observers(model)
    model = fold_qat_conv_bn(model)
    model = duplicate_dequantize(model)
    model = port_metadata(model)
    if fold_quantize:
        model = fold_quantized_weights(model)
    if use_reference_representation:
        from .reference_representation import to_reference_representation

        model = to_reference_representation(model)

    model.meta.update(original_meta)
    return validate.disallow_train_eval(model)
