"""Reading the quantizer's annotations that prepare left on nodes.

An annotation's ``input_qspec_map`` is keyed by graph nodes.  A copy of the graph
(``copy.deepcopy`` of a prepared model, or the converter's own working copy) copies each
node's metadata shallowly, so its annotations still name the *original* graph's nodes:
read that way, no input of the copy is annotated (torchao ports no input metadata then, and
raises for a dynamically quantized input, whose choose_qparams it looks for downstream of the
original node).  :func:`rebind` gives a copy annotations that name its own nodes, and
:func:`rebind_on_deepcopy` has every deep copy of a prepared model do that.
"""

from __future__ import annotations

import dataclasses

from torch import fx

ANNOTATION_KEY = "quantization_annotation"

__all__ = ["ANNOTATION_KEY", "annotation", "rebind", "rebind_on_deepcopy"]


def annotation(node):
    """The node's quantization annotation, or None when it has none worth the name."""
    a = node.meta.get(ANNOTATION_KEY)
    if a is None or (not a.input_qspec_map and a.output_qspec is None):
        return None
    return a


def rebind(graph: fx.Graph, node_map) -> None:
    """Give each annotated node of ``graph`` (a copy) an annotation of its own whose input keys
    are ``node_map(original key)`` (a node of ``graph``; None: the key is kept as it is).  The
    original graph's annotations are not touched."""
    for node in graph.nodes:
        a = node.meta.get(ANNOTATION_KEY)
        if a is None or not getattr(a, "input_qspec_map", None):
            continue
        mapped = {}
        for key, qspec in a.input_qspec_map.items():
            new = node_map(key)
            mapped[new if new is not None else key] = qspec
        if any(k is not old for k, old in zip(mapped, a.input_qspec_map)):
            # a copied node's metadata dict is its own (fx copies it), the annotation object not
            node.meta[ANNOTATION_KEY] = dataclasses.replace(a, input_qspec_map=mapped)


def _rebind_by_name(copied: fx.GraphModule) -> None:
    """A deep copy's nodes keep their names: annotation keys that are not nodes of the copy
    become the copy's node of the same name."""
    nodes = set(copied.graph.nodes)
    by_name = {n.name: n for n in copied.graph.nodes}
    rebind(copied.graph, lambda key: None if key in nodes else by_name.get(getattr(key, "name", None)))


def rebind_on_deepcopy(gm: fx.GraphModule) -> fx.GraphModule:
    """Have every ``copy.deepcopy`` of ``gm`` (a prepared model), and of its copies, carry
    annotations that name its own nodes (``GraphModule``'s deepcopy hook); returns ``gm``."""
    hooks = getattr(gm, "_deepcopy_hooks", None)
    if hooks is not None and _rebind_by_name not in hooks:
        gm._register_deepcopy_hook(_rebind_by_name)
    return gm
