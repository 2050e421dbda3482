"""Step 1: reject arguments that cannot be converted, saying what to do instead."""

from __future__ import annotations

import torch
from torch import fx

from .. import observers
from .ops import DEQUANTIZE, QUANTIZE, is_call


class FlagTypeError(TypeError, ValueError):
    """A boolean flag got a non-bool. Also a ValueError, which is what torchao raises."""


def check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise FlagTypeError(
                f"convert_pt2e: `{name}` must be True or False, got {value!r} "
                f"({type(value).__name__}); pass a bool"
            )


def check_model(model) -> None:
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"convert_pt2e expects the torch.fx.GraphModule returned by prepare_pt2e or "
            f"prepare_qat_pt2e, got {type(model).__name__}. Export and prepare first: "
            "m = torch.export.export(model, args).module(); m = prepare_pt2e(m, quantizer); "
            "calibrate m; then convert."
        )
    if getattr(model, "_qref_converted", False) or _looks_converted(model):
        raise ValueError(
            "convert_pt2e got a model that is already converted (it has quantize/dequantize ops "
            "and no observers); convert the prepared model, not the result of a conversion"
        )
    if "_observed_graph_module_attrs" not in model.meta and not _has_observers(model):
        raise ValueError(
            "convert_pt2e got a GraphModule that was never prepared (no observers, no prepare "
            "metadata); call prepare_pt2e(model, quantizer) or prepare_qat_pt2e and calibrate first"
        )


def _has_observers(model: fx.GraphModule) -> bool:
    modules = dict(model.named_modules())
    return any(
        n.op == "call_module" and observers.is_observer(modules.get(n.target))
        for n in model.graph.nodes
    )


def _looks_converted(model: fx.GraphModule) -> bool:
    has_qdq = any(is_call(n, QUANTIZE + DEQUANTIZE) for n in model.graph.nodes)
    return has_qdq and not _has_observers(model)


def disallow_train_eval(model: fx.GraphModule) -> fx.GraphModule:
    """``.train()``/``.eval()`` would not switch exported ops (batch norm, dropout): refuse them."""

    def refuse(self, mode: bool = True):
        raise NotImplementedError(
            "train() and eval() have no effect on an exported, converted model and are disabled. "
            "Use torchao.quantization.pt2e.move_exported_model_to_eval(model) (or _to_train), or "
            "allow_exported_model_train_eval(model) if the calls cannot be removed."
        )

    model.train = refuse.__get__(model)
    model.eval = refuse.__get__(model)
    model._qref_converted = True
    return model
