"""How far a float output (no dequantize at the end) may be off under a relaxed tolerance.

The allowed steps of each quantize feeding it times that quantize's scale, carried through the
float ops after its dequantize that do not expand an error (``_NON_EXPANDING``; add/sub add
their inputs' bounds); with any other op in between there is no bound.
"""

from __future__ import annotations

import torch
from torch import fx

from ..nodes import is_dequantize
from .grid import call_grid
from .record import _Recorder
from .tolerance import Tolerance


# Float ops through which an error of the values they read does not grow (elementwise
# |f(a) - f(b)| <= |a - b|: max/avg pooling and means average or select, clamps and sigmoid/tanh
# are 1-Lipschitz, views only move values); add/sub add their inputs' errors.
_NON_EXPANDING = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_min", "clamp_max", "sigmoid",
    "tanh", "hardsigmoid", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "mean",
    "flatten", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "contiguous", "clone", "dropout", "getitem", "cat", "concat", "expand", "slice", "select", "alias",
    "detach", "identity",
}
_ADDING = {"add", "sub"}


def _op_name(node: fx.Node) -> str:
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))


def _float_bound(ref: _Recorder, leaf, tolerance: Tolerance) -> float | None:
    """How far a float output (no dequantize at the end) may be off, in its own units: the
    allowed steps of each quantize feeding it times that quantize's scale, carried through the
    float ops after its dequantize (see _NON_EXPANDING; None if another op comes between)."""
    memo: dict = {}

    def bound(node):
        if not isinstance(node, fx.Node) or node in ref.constant:
            return 0.0
        if node not in memo:
            memo[node] = _node_bound(node)
        return memo[node]

    def _node_bound(node):
        if is_dequantize(node):
            args, kwargs = ref.fetch_args_kwargs_from_env(node)
            grid = call_grid(node, args, kwargs, None)
            if grid is None:
                return None
            scale = float(torch.as_tensor(grid.qparams.scale, dtype=torch.float64).max())
            scale = max(scale, ref.dynamic_scale.get(node, 0.0))  # run-time qparams: every batch's
            return tolerance.allowed(ref.depth.get(node, 0)) * scale
        if node.op == "placeholder":
            return 0.0  # the same input in both
        name = _op_name(node) if node.op in ("call_function", "call_method") else None
        if name not in _NON_EXPANDING and name not in _ADDING:
            return None
        inputs = [bound(a) for a in node.all_input_nodes]
        if any(b is None for b in inputs):
            return None
        return sum(inputs) if name in _ADDING else max(inputs, default=0.0)

    return bound(leaf) if isinstance(leaf, fx.Node) else None
