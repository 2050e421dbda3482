"""Requantization depth: how many requantizations a point's error may have accumulated.

End to end it counts from the graph inputs (the input quantize and weights: 0); under isolation
it restarts after every point the candidate passes the reference's integers on from, and a point
fused away in the candidate still counts as a requantization on the way.
"""

from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree

from .record import _Recorder


def _depths(ref: _Recorder, kept: set | None) -> tuple[dict, list]:
    """Requantizations each reference point's (and output's) error may have accumulated.

    ``kept=None``: end to end, counted from the graph inputs. Otherwise the points in ``kept``
    pass the reference's integers on (isolation), so counting restarts after each of them;
    a point fused away in the candidate (not kept) still counts as a requantization on the way.
    """
    if kept is None:
        return {k: p.depth for k, p in ref.points.items()}, [o.depth for o in ref.outputs]
    depth, points, outputs = {}, {}, []
    for n in ref.gm.graph.nodes:
        d = max((depth.get(a, 0) for a in n.all_input_nodes), default=0)
        key = ref.key_of.get(n)
        if key is not None and ref.points[key].kind != "weight":
            from_input = ref.points[key].kind == "activation" and n.args[0].op == "placeholder"
            d += 0 if from_input else 1
            points[key] = d
            if key in kept:
                d = 0
        elif key is not None:
            points[key] = 0
        if n.op == "output":
            leaves, _ = pytree.tree_flatten(n.args[0])
            outputs = [depth.get(leaf, 0) if isinstance(leaf, fx.Node) else 0 for leaf in leaves]
        depth[n] = d
    return points, outputs
