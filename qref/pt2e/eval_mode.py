"""An exported model's train-mode ops switched to inference: what torchao's QAT flow asks of users
(``move_exported_model_to_eval``) before they run a converted QAT model.

``.eval()`` cannot do it on an exported graph: batch norm and dropout were traced with their mode.
A QAT model keeps train-mode batch norms wherever the quantizer left a conv-bn unquantized (its
fold is not done at conversion), and such a model updates its running statistics on every call,
so its outputs depend on how often it was called.  torchao rewrites these ops by matching traced
patterns, which replaces a batch norm's own eps and momentum with the pattern's defaults; here
each op keeps its arguments and only its mode changes.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["move_to_eval", "train_mode_ops"]

_aten = torch.ops.aten
# op -> index of its `training` / `train` argument
# (dropout_: nn.Dropout(inplace=True), e.g. transformers' MobileNetV1/V2 classifier)
_MODE_ARGUMENT = {_aten.batch_norm.default: 5, _aten.dropout.default: 2, _aten.dropout_.default: 2}


def train_mode_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that behave differently in training: batch norms and dropouts traced in train mode."""
    found = []
    for node in gm.graph.nodes:
        index = _MODE_ARGUMENT.get(node.target) if node.op == "call_function" else None
        if index is not None and len(node.args) > index and node.args[index] is True:
            found.append(node)
        elif node.op == "call_function" and node.target is _aten._native_batch_norm_legit.default \
                and len(node.args) > 5 and node.args[5] is True:
            found.append(node)
    return found


def move_to_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every train-mode batch norm and dropout in inference mode (in place; returned)."""
    nodes = train_mode_ops(gm)
    for node in nodes:
        if node.target is _aten._native_batch_norm_legit.default:
            # (input, weight, bias, running_mean, running_var, training, momentum, eps)
            x, weight, bias, mean, var, _, momentum, eps = node.args
            node.target = _aten._native_batch_norm_legit_no_training.default
            node.args = (x, weight, bias, mean, var, momentum, eps)
        else:
            index = _MODE_ARGUMENT[node.target]
            node.args = (*node.args[:index], False, *node.args[index + 1:])
    if nodes:
        gm.recompile()
    return gm
