"""Recording the points of one graph: run it, key every quantize point, keep its integers.

An activation point is a quantize of a value computed from the graph inputs (keyed by the name
of the node it quantizes, ``#k`` for further quantizes of it); a weight point is an integer
constant a dequantize turns into float (keyed ``user.argument``); a lowered point is a module or
op taking quantized tensors and returning one. Each point has a requantization depth, its grid
(:class:`~qref.compare.grid.Grid`) and per batch its integers and float input. With ``force``
every point passes the given reference integers on instead of its own (isolation).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from ..nodes import is_dequantize, is_quantize
from ..pt2e.ops import real_users
from ..qparams import QParams
from .grid import Grid, call_grid, tensor_grid

__all__ = ["quantize_points", "output_quantization"]

_INT_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32} | {
    d for d in (getattr(torch, "uint16", None), getattr(torch, "uint32", None)) if d is not None
}


def _is_float(value) -> bool:
    return isinstance(value, Tensor) and not value.is_quantized and value.is_floating_point()


def _is_int(value) -> bool:
    return isinstance(value, Tensor) and (value.is_quantized or value.dtype in _INT_DTYPES)


def _ints(value: Tensor) -> Tensor:
    return (value.int_repr() if value.is_quantized else value).detach()


def _constant_nodes(graph: fx.Graph) -> set:
    """Nodes whose value does not depend on a graph input (weights, qparams, folded tensors)."""
    varying = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in varying for a in node.all_input_nodes):
            varying.add(node)
    return {n for n in graph.nodes if n not in varying}


def _argument_name(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> str:
    """Which argument of ``user`` ``node`` fills: a schema or signature name, else its position."""
    names: list[str] = []
    schema = getattr(user.target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
    else:
        fn = gm.get_submodule(user.target).forward if user.op == "call_module" else user.target
        try:
            names = [p for p in inspect.signature(fn).parameters if p != "self"] if callable(fn) else []
        except (TypeError, ValueError):
            names = []

    def find(value, where):
        if value is node:
            return where
        if isinstance(value, (list, tuple)):
            for j, item in enumerate(value):
                if item is node:
                    return f"{where}[{j}]"
        return None

    for i, value in enumerate(user.args):
        found = find(value, names[i] if i < len(names) else str(i))
        if found:
            return found
    for name, value in user.kwargs.items():
        found = find(value, name)
        if found:
            return found
    return "?"


def _lowered_op(n: fx.Node, args, kwargs, result) -> bool:
    """A call on quantized tensors that returns one (a lowered FX module or quantized op)."""
    if not (isinstance(result, Tensor) and result.is_quantized) or is_quantize(n):
        return False
    values, _ = pytree.tree_flatten((args, kwargs))
    return any(isinstance(v, Tensor) and v.is_quantized for v in values)


@dataclass
class _Point:
    key: str
    node: str  # the graph node that produced the integers (a quantize, or the weight's dequantize)
    kind: str  # "activation" | "weight"
    depth: int
    grid: Grid | None  # the quantize's (or the weight dequantize's) qparams and style
    position: int  # in the graph, of the node the key names (pairing order; see _pairs)
    values: list = field(default_factory=list)  # integer tensor per batch
    float_inputs: list = field(default_factory=list)  # float input per batch (None for weights)
    # a dynamic quantize (its qparams computed at run time, e.g. by choose_qparams): its grid
    # on each batch; ``grid`` is the first batch's
    grids: list | None = None

    @property
    def qparams(self) -> QParams | None:
        return self.grid.qparams if self.grid is not None else None

    def qparams_of(self, batch: int) -> QParams | None:
        """The qparams the point applied on ``batch`` (a static point: the same on every batch)."""
        if self.grids is not None and batch < len(self.grids):
            grid = self.grids[batch]
            return grid.qparams if grid is not None else None
        return self.qparams


@dataclass
class _Output:
    name: str
    depth: int
    grid: Grid | None  # set when the output is a dequantize
    floats: list = field(default_factory=list)
    ints: list = field(default_factory=list)  # the dequantize's integer input, per batch
    leaf: Any = None  # the graph node returned
    grids: list = field(default_factory=list)  # the dequantize's grid per batch (dynamic qparams vary)

    @property
    def qparams(self) -> QParams | None:
        return self.grid.qparams if self.grid is not None else None


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the integer output of every quantize point (module not mutated).

    ``modules``: module path -> key; those call_module nodes are points too when their output
    is a quantized tensor (lowered FX modules). ``force``: key -> the reference's point; after
    a point is recorded, its value is replaced by the reference's integers, so that every
    later point only measures its own error (isolation; see ``compare(isolate=True)``).
    """

    def __init__(self, gm: fx.GraphModule, modules: dict | None = None, force: dict | None = None,
                 rename: dict | None = None, lowered_ops: bool = False):
        super().__init__(gm, garbage_collect_values=False)
        self.gm = gm
        self.constant = _constant_nodes(gm.graph)
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.points: dict[str, _Point] = {}
        self.key_of: dict[fx.Node, str] = {}
        self.depth: dict[fx.Node, int] = {}
        self.outputs: list[_Output] = []
        self.modules = modules or {}
        self.force = force or {}
        self.rename = rename or {}  # own key -> the reference's (see _pairs)
        self.lowered_ops = lowered_ops  # every op on quantized tensors is a point (lowered FX)
        self._own_keys: set[str] = set()
        self.dynamic_scale: dict[fx.Node, float] = {}  # dequantizes with run-time qparams: largest scale
        self.batch = 0

    # -- keys ---------------------------------------------------------------------------------
    def _new_key(self, base: str) -> str:
        key, k = base, 0
        while key in self._own_keys:
            k += 1
            key = f"{base}#{k}"
        self._own_keys.add(key)
        return self.rename.get(key, key)

    def _weight_key(self, dequantize: fx.Node) -> tuple[str, fx.Node] | None:
        """``user.argument`` of the weight's (first) user, and that user."""
        users = real_users(dequantize)
        if not users:
            return None
        user = users[0]
        return f"{user.name}.{_argument_name(self.gm, user, dequantize)}", user

    # -- running --------------------------------------------------------------------------------
    def run_batch(self, batch: tuple) -> None:
        with torch.no_grad():
            self.run(*batch)
        self.batch += 1

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
            if self.batch == 0:
                self._classify(n, args, kwargs, result)
            self._record(n, args, kwargs, result)
            key = self.key_of.get(n)
            if key in self.force and self.batch < len(self.force[key].values):
                result = self._forced(n, args, kwargs, result, self.force[key])
        return result

    def _forced(self, n: fx.Node, args, kwargs, result, reference: _Point):
        ints = reference.values[self.batch]
        if self.points[self.key_of[n]].kind == "weight":  # re-run the dequantize on the given ints
            return getattr(self, n.op)(n.target, (_like(ints, args[0]),) + tuple(args[1:]), kwargs)
        return _like(ints, result, reference.grid)

    def _classify(self, n: fx.Node, args, kwargs, result) -> None:
        """On the first batch: is ``n`` a point, under which key, at which depth."""
        inputs = n.all_input_nodes
        depth = max((self.depth.get(a, 0) for a in inputs), default=0)
        calls = n.op in ("call_function", "call_method", "call_module")
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        first_value = args[0] if args else None
        if n.op == "output":
            self._classify_outputs(n)
        elif n.op == "call_module" and n.target in self.modules:
            if isinstance(result, Tensor) and result.is_quantized:  # else: not lowered, "missing"
                self._add_point(n, self.modules[n.target], "module", depth + 1, tensor_grid(result), n)
                depth += 1
        elif self.lowered_ops and calls and _lowered_op(n, args, kwargs, result):
            # a lowered module or op (quantized in, quantized out): its own output is a point
            kind, base = ("module", n.target) if n.op == "call_module" else ("op", n.name)
            self._add_point(n, self._new_key(base), kind, depth + 1, tensor_grid(result), n)
            depth += 1
        elif calls and first is not None and _is_int(first_value) and first in self.constant and (
            is_dequantize(n) or _is_float(result)
        ):
            # An integer constant turned into float: a (folded or unfolded) quantized weight.
            weight = self._weight_key(n)
            if weight is not None:
                grid = call_grid(n, args, kwargs, result) if is_dequantize(n) else None
                self._add_point(n, self._new_key(weight[0]), "weight", 0, grid, weight[1])
        elif calls and first is not None and first not in self.constant and _is_float(first_value) and (
            is_quantize(n) or _is_int(result)
        ):
            # Quantizing a value computed from the inputs; from a graph input it is no
            # requantization, so it does not add depth.
            if first.op != "placeholder":
                depth += 1
            grid = call_grid(n, args, kwargs, result) if is_quantize(n) else None
            self._add_point(n, self._new_key(first.name), "activation", depth, grid, first)
            if grid is not None and self._runtime_qparams(n):
                self.points[self.key_of[n]].grids = []  # filled per batch by _record
        self.depth[n] = depth

    def _runtime_qparams(self, n: fx.Node) -> bool:
        """A quantize/dequantize whose qparams are computed from the inputs (dynamic quantization:
        choose_qparams on every call), not constants: they differ from batch to batch."""
        return n.target is torch.quantize_per_tensor_dynamic or any(
            a not in self.constant for a in n.all_input_nodes[1:])

    def _add_point(self, n, key, kind, depth, grid, named: fx.Node) -> None:
        self.key_of[n] = key
        node = n.target if n.op == "call_module" else n.name
        self.points[key] = _Point(key=key, node=node, kind=kind, depth=depth, grid=grid,
                                  position=self.position[named])

    def _classify_outputs(self, n: fx.Node) -> None:
        leaves, _ = pytree.tree_flatten(n.args[0])
        for i, leaf in enumerate(leaves):
            depth = self.depth.get(leaf, 0) if isinstance(leaf, fx.Node) else 0
            grid = None
            if is_dequantize(leaf):
                args, kwargs = self.fetch_args_kwargs_from_env(leaf)
                grid = call_grid(leaf, args, kwargs, None)
            self.outputs.append(_Output(name=f"output[{i}]", depth=depth, grid=grid, leaf=leaf))

    def _record(self, n: fx.Node, args, kwargs, result) -> None:
        key = self.key_of.get(n)
        if key is not None:
            point = self.points[key]
            if point.kind == "weight":
                point.values.append(_ints(args[0]))
                point.float_inputs.append(None)
            else:
                point.values.append(_ints(result))
                point.float_inputs.append(args[0].detach() if _is_float(args[0]) else None)
            if point.grids is not None:
                point.grids.append(call_grid(n, args, kwargs, result))
        if is_dequantize(n) and self._runtime_qparams(n):  # the largest step it took (float_bound)
            grid = call_grid(n, args, kwargs, result)
            if grid is not None:
                scale = float(torch.as_tensor(grid.qparams.scale, dtype=torch.float64).max())
                self.dynamic_scale[n] = max(scale, self.dynamic_scale.get(n, 0.0))
        if n.op == "output":
            leaves, _ = pytree.tree_flatten(n.args[0])
            values, _ = pytree.tree_flatten(args[0])
            for out, leaf, value in zip(self.outputs, leaves, values):
                out.floats.append(value.detach() if isinstance(value, Tensor) else value)
                if out.qparams is not None:
                    out.ints.append(_ints(self.env[leaf.args[0]]).to(torch.int64))
                    leaf_args, leaf_kwargs = self.fetch_args_kwargs_from_env(leaf)
                    out.grids.append(call_grid(leaf, leaf_args, leaf_kwargs, None))


def _like(ints: Tensor, template, grid: Grid | None = None):
    """``ints`` in the form of ``template``: same dtype, or a quantized tensor on ``grid`` (the
    reference's, so that a wrong candidate scale does not travel on) if it is a torch one, else
    on the grid of ``template``."""
    if not isinstance(template, Tensor) or ints.shape != template.shape:
        return template  # not substitutable: the point fails on its own anyway
    if not template.is_quantized:
        return ints.to(template.dtype)
    if grid is not None and grid.style == "torch":
        qparams = grid.qparams
        ints = ints.to(qparams.dtype)
        if qparams.axis is not None:
            return torch._make_per_channel_quantized_tensor(
                ints, qparams.scale, qparams.zero_point, qparams.axis
            )
        return torch._make_per_tensor_quantized_tensor(ints, float(qparams.scale), int(qparams.zero_point))
    ints = ints.to(template.int_repr().dtype)
    if template.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return torch._make_per_channel_quantized_tensor(
            ints, template.q_per_channel_scales(), template.q_per_channel_zero_points(),
            template.q_per_channel_axis(),
        )
    return torch._make_per_tensor_quantized_tensor(ints, template.q_scale(), template.q_zero_point())


def _batches(batches) -> list[tuple]:
    return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches]


def _run(gm: fx.GraphModule, batches, modules: dict | None = None, force: dict | None = None,
         rename: dict | None = None, lowered_ops: bool = False) -> _Recorder:
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a torch.fx.GraphModule, got {type(gm).__name__}")
    recorder = _Recorder(gm, modules=modules, force=force, rename=rename, lowered_ops=lowered_ops)
    for batch in _batches(batches):
        recorder.run_batch(batch)
    return recorder


def quantize_points(gm: fx.GraphModule, batches: Sequence) -> dict[str, list[Tensor]]:
    """The integer output of every quantize point of ``gm``, per batch, in topological order.

    ``batches``: a sequence of input tuples (or single tensors). ``gm`` is only interpreted,
    never modified. Keys are described in the docstrings of this module and :mod:`qref.compare`.
    """
    return {key: point.values for key, point in _run(gm, batches).points.items()}


def output_quantization(gm: fx.GraphModule, batch) -> list[tuple[QParams | None, int]]:
    """Per output of ``gm``: its qparams if it is a dequantize (else ``None``), and how many
    requantizations the longest path to it has (what a depth budget counts)."""
    return [(out.qparams, out.depth) for out in _run(gm, [batch]).outputs]
