"""Broken backends: inductor's lowering with one planted bug each, for ``qref check ... --backend
tests.mutants.backends:NAME``.  The bug is planted in the graph handed to inductor, where a
backend's own requantization would get it wrong; the converter under test is a correct one."""

from __future__ import annotations

import copy
import dataclasses

import torch

from qref.backends import resolve
from qref.backends.inductor import lower
from qref.pt2e.ops import DEQUANTIZE, QUANTIZE, is_call

def _requantizes(q) -> bool:
    """A quantize of a value the graph computed (not a graph input's, not a weight's)."""
    source = q.args[0]
    return isinstance(source, torch.fx.Node) and source.op == "call_function" and not is_call(source, DEQUANTIZE)


def _wrong_multiplier_lowering(converted, example_args):
    """Every requantization uses an output scale 1/16 too large: its quantize divides by the wrong
    scale while the dequantize after it reads the right one (a backend's requantization multiplier
    computed from a wrong scale)."""
    graph_module = copy.deepcopy(converted)
    for q in graph_module.graph.nodes:
        if is_call(q, QUANTIZE) and _requantizes(q) and isinstance(q.args[1], float):
            q.args = (q.args[0], q.args[1] * (1 + 2**-4), *q.args[2:])
    graph_module.recompile()
    return lower(graph_module, example_args)


def _per_channel_scale_dropped_lowering(converted, example_args):
    """Per-channel weights are dequantized with their first channel's scale for every channel."""
    graph_module = copy.deepcopy(converted)
    for dq in graph_module.graph.nodes:
        if is_call(dq, DEQUANTIZE) and "per_channel" in str(dq.target) and dq.args[1].op == "get_attr":
            scales = getattr(graph_module, dq.args[1].target)
            setattr(graph_module, dq.args[1].target, torch.full_like(scales, float(scales.reshape(-1)[0])))
    graph_module.recompile()
    return lower(graph_module, example_args)


wrong_multiplier = dataclasses.replace(resolve("inductor"), name="inductor, wrong requantization multiplier",
                                       lower=_wrong_multiplier_lowering)
per_channel_scale_dropped = dataclasses.replace(resolve("inductor"), name="inductor, per-channel scale dropped",
                                                lower=_per_channel_scale_dropped_lowering)
BACKEND_MUTANTS = {"wrong_multiplier": wrong_multiplier, "per_channel_scale_dropped": per_channel_scale_dropped}
