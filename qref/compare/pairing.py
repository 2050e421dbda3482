"""Pairing points that two converters key differently only by fx's node-name numbering.

Node names are no part of a converter's contract: points whose keys differ only in the numeric
suffix (torchao's QAT fold calls a conv ``conv1d`` where qref keeps ``conv1d_1``) pair in graph
order when each such group has as many unpaired points on both sides; whatever stays unpaired
is missing or extra.
"""

from __future__ import annotations

import re

import torch

_NUMBERED = re.compile(r"_\d+$")


def _name_group(key: str, kind: str) -> tuple:
    """``conv1d_1.weight#2`` -> ("conv1d", "weight", "2", kind): the key without fx's numbering."""
    key, _, repeat = key.partition("#")
    node, _, argument = key.partition(".")
    return _NUMBERED.sub("", node), argument, repeat, kind


def _pairs(ref_points: dict, got_points: dict) -> dict:
    """Candidate key -> reference key, for points keyed differently only by fx's name numbering.

    Another converter numbers its nodes its own way, even swapping numbers (torchao's QAT fold
    names the first of two folded convs ``conv2d_2`` where qref has ``conv2d_3``), so within a
    group of such points, equally many on both sides pair in graph order (of the nodes the
    keys name: a weight's consumer, not its dequantize, which qref places first).  When the counts
    differ (a point was dropped or added), equal keys pair, then the leftovers if equally many;
    anything else would be a guess and stays unpaired.
    """
    ref_groups, got_groups = _groups(ref_points), _groups(got_points)
    pairs = {}
    for group, got_keys in got_groups.items():
        ref_keys = ref_groups.get(group, [])
        if len(ref_keys) != len(got_keys):
            ref_keys = [k for k in ref_keys if k not in got_points]
            got_keys = [k for k in got_keys if k not in ref_points]
        if len(ref_keys) == len(got_keys):
            matched = _by_values(ref_keys, got_keys, ref_points, got_points)
            pairs.update((got, ref) for got, ref in matched if got != ref)
    return pairs


def _by_values(ref_keys: list, got_keys: list, ref_points: dict, got_points: dict) -> list:
    """(candidate key, reference key) pairs of one group: a candidate point whose integers equal an
    unpaired reference point's exactly pairs with the first such; the rest pair in graph order.
    Graph order alone is not enough: a rewrite may place a folded conv elsewhere (torchao's QAT fold
    puts a ResNet block's shortcut conv before its main-path conv, which qref keeps first), and
    swapped pairs would compare a 1x1 weight with a 3x3 one.  A point with other integers than every
    reference point still pairs (in order) and fails as it should."""
    free, pairs, unmatched = list(ref_keys), [], []
    for got in got_keys:
        same = next((ref for ref in free if _same_integers(ref_points[ref], got_points[got])), None)
        if same is None:
            unmatched.append(got)
        else:
            free.remove(same)
            pairs.append((got, same))
    return pairs + list(zip(unmatched, free))


def _same_integers(a, b) -> bool:
    return bool(a.values) and len(a.values) == len(b.values) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.values, b.values))


def _groups(points: dict) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for key, point in sorted(points.items(), key=lambda item: item[1].position):
        groups.setdefault(_name_group(key, point.kind), []).append(key)
    return groups
