"""A converted model against qref's reference conversion, in integers, at every quantize node.

Float rtol/atol are the wrong unit for converter checks (design notes, section 2). Here both
graphs run on the same batches and the *integer* output of every quantize node is compared,
so a failure names the first node that diverges, in the reference's topological order, and
every difference is an exact count of quantization steps (LSB) of that node's scale.

Points, and how they are keyed so that two converters' graphs line up:

* activation point: a quantize op (``quantized_decomposed.quantize_per_tensor``/``.tensor``/
  ``quantize_per_channel``; ``torch.quantize_per_tensor``/``_per_channel`` in FX graphs, read
  through ``int_repr``) whose input depends on a graph input. Key: the name of the float node
  it quantizes, plus ``#k`` for the k-th further quantize of the same node. A converter that
  replaced the quantize op by its own callable is still seen: any call whose first argument
  is a float tensor and whose result is an integer tensor is a quantize.
* weight point: an integer constant that a dequantize turns into float, whether folded into a
  ``get_attr`` (``fold_quantize=True``) or still a quantize of a constant. Key: the
  dequantize's user and the argument it fills, ``"conv2d.weight"``, ``"linear.bias"``.
  Folded and unfolded weights so get the same key.
* node names are no part of a converter's contract: points the two graphs key differently
  (torchao's QAT fold calls a conv ``conv1d`` where qref keeps ``conv1d_1``) are paired in
  order when their names differ only in the numeric suffix and each such group has as many
  unpaired points on both sides; whatever stays unpaired is missing or extra.
* lowered point (``compare`` of lowered FX models): every module or op that takes quantized
  tensors and returns one, keyed by module path (or node name for an op), compared with its
  output qparams.
* outputs ``"output[i]"``: compared in LSB of the output scale when the reference output is a
  dequantize; NaN/inf in the candidate is a failure of its own. A float output is compared bit
  for bit, or under a relaxed tolerance within the allowed steps times the scale of each quantize
  feeding it through non-expanding float ops (``_float_bound``).

Integers are not all a point promises: a point whose dtype or qparams differ from the
reference's fails even where every integer agrees (and the message says what differs, by how
much); a lowered op may carry other qparams only where the reference graph allows them
(``_other_grids``: the input's grid of an op without weights, a sigmoid's fixed qparams).

A point's *depth* is the number of requantizations between the graph inputs and it, itself
included (the input quantize and weights: 0); a depth budget allows more steps further in.
With ``isolate=True`` every candidate point passes the reference's integers on, so each
point only shows its own error (its depth counts back to the last point both graphs share).
``compare_lowered`` does that for FX models lowered to quantized modules, keyed by module path.

Exact by default. Each relaxation is a :class:`Tolerance` with a named cause, and the observed
maximum is reported whether or not the check passes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from .pt2e.ops import DEQUANTIZE as _PT2E_DEQUANTIZE
from .pt2e.ops import QUANTIZE as _PT2E_QUANTIZE
from .pt2e.ops import real_users

__all__ = [
    "Tolerance",
    "EXACT",
    "QParams",
    "Worst",
    "PointResult",
    "Comparison",
    "quantize_points",
    "output_quantization",
    "compare",
    "compare_lowered",
    "ModuleInput",
    "qparams_difference",
]

_INT_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32} | {
    d for d in (getattr(torch, "uint16", None), getattr(torch, "uint32", None)) if d is not None
}
_TORCH_QUANTIZE = (torch.quantize_per_tensor, torch.quantize_per_channel)
_QUANTIZE = tuple(_PT2E_QUANTIZE) + _TORCH_QUANTIZE
_DEQUANTIZE = tuple(_PT2E_DEQUANTIZE) + (torch.dequantize,)


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate's integers may be from the reference's, and why.

    At a point ``depth`` requantizations away from the graph inputs the allowed difference is
    ``lsb + per_depth * depth`` steps; with ``off_by_one_fraction`` set, up to that fraction of
    a point's elements may exceed it by exactly one more step. Any relaxation needs a cause.
    """

    lsb: int = 0
    off_by_one_fraction: float | None = None
    per_depth: int = 0
    cause: str = ""

    def __post_init__(self):
        if self.lsb < 0 or self.per_depth < 0:
            raise ValueError(f"tolerance steps must be >= 0, got lsb={self.lsb}, per_depth={self.per_depth}")
        if self.off_by_one_fraction is not None and not 0 <= self.off_by_one_fraction <= 1:
            raise ValueError(f"off_by_one_fraction must be in [0, 1], got {self.off_by_one_fraction}")
        if not self.is_exact and not self.cause:
            raise ValueError("a relaxed tolerance needs a cause (why the converter may differ)")

    @property
    def is_exact(self) -> bool:
        return self.lsb == 0 and self.per_depth == 0 and not self.off_by_one_fraction

    def allowed(self, depth: int) -> int:
        """Steps allowed at a point ``depth`` requantizations from the graph inputs."""
        return self.lsb + self.per_depth * depth

    # Constructors: each says what it relaxes; the cause says why.
    @classmethod
    def within(cls, lsb: int, cause: str) -> Tolerance:
        return cls(lsb=lsb, cause=cause)

    @classmethod
    def depth_budget(cls, per_depth: int, cause: str, lsb: int = 0) -> Tolerance:
        return cls(lsb=lsb, per_depth=per_depth, cause=cause)

    @classmethod
    def off_by_one(cls, fraction: float, cause: str, lsb: int = 0) -> Tolerance:
        return cls(lsb=lsb, off_by_one_fraction=fraction, cause=cause)

    @classmethod
    def kernel(cls, engine: str, compounding: bool = False) -> Tolerance:
        """The contract of a lowered model on ``engine`` (qref.engines.KERNEL_CONTRACTS).

        The contract is per kernel, given the reference's quantized input (``compare_lowered``
        isolates points by default). ``compounding=True``: the same steps per requantization
        on the way, for end-to-end comparisons (ExecuTorch widened back-to-back convs the same way).
        """
        from .engines import KERNEL_CONTRACTS

        contract = KERNEL_CONTRACTS.get(engine)
        if contract is None:
            known = ", ".join(KERNEL_CONTRACTS)
            raise ValueError(f"no kernel contract for engine {engine!r}; known: {known}")
        cause = (
            f"{engine} kernel contract: a lowered kernel is within {contract.max_lsb} LSB of the "
            "reference given the same quantized input (it requantizes in integer arithmetic, the "
            f"reference rounds a float){'; compounding once per requantization' if compounding else ''}; "
            f"caveat: {contract.note}"
        )
        if compounding:
            return cls(per_depth=contract.max_lsb, cause=cause)
        return cls(lsb=contract.max_lsb, cause=cause)

    def __str__(self) -> str:
        if self.is_exact:
            return "exact" + (f" ({self.cause})" if self.cause else "")
        parts = [f"<= {self.lsb} LSB"] if self.lsb or not self.per_depth else ["<="]
        if self.per_depth:
            parts.append(("+ " if self.lsb else "") + f"{self.per_depth} LSB per requantization depth")
        if self.off_by_one_fraction:
            parts.append(f"and up to {self.off_by_one_fraction:.3g} of elements one step more")
        return " ".join(parts) + f" ({self.cause})"


EXACT = Tolerance(cause="the reference conversion is the specification")


# ---------------------------------------------------------------------------------------------
# Quantization parameters (for the message, and to put float outputs on the reference grid)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QParams:
    scale: Any  # float, or a 1-d tensor per channel
    zero_point: Any
    axis: int | None
    quant_min: int
    quant_max: int
    dtype: torch.dtype  # the integer dtype (uint8, int8, ...), never a quantized one
    style: str  # "decomposed" (quantized_decomposed ops) or "torch" (torch.quantize_per_*)

    def at(self, index: tuple) -> str:
        """``scale=... zero_point=...`` of the element at ``index`` (its channel, if per channel)."""
        scale, zp = self.scale, self.zero_point
        if self.axis is not None and index:
            scale, zp = scale[index[self.axis]], zp[index[self.axis]]
        return f"scale={float(scale):.6g} zero_point={int(zp)}"

    def quantize(self, x: Tensor) -> Tensor:
        """``x`` on this grid, the way this style of graph quantizes, as int64."""
        x = x.detach().float()
        if self.style == "torch":
            qdtype = _QDTYPE_OF[self.dtype]
            if self.axis is None:
                q = torch.quantize_per_tensor(x, float(self.scale), int(self.zero_point), qdtype)
            else:
                q = torch.quantize_per_channel(x, self.scale, self.zero_point, self.axis, qdtype)
            return q.int_repr().to(torch.int64)
        qd = torch.ops.quantized_decomposed
        if self.axis is None:
            q = qd.quantize_per_tensor(
                x, float(self.scale), int(self.zero_point), self.quant_min, self.quant_max, self.dtype
            )
        else:
            q = qd.quantize_per_channel(
                x, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max, self.dtype
            )
        return q.to(torch.int64)


_QDTYPE_OF = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}
_INT_OF_QDTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}


def _bound(target, args, kwargs) -> dict:
    """An op overload's evaluated arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(target._schema.arguments):
        if arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif not arg.kwarg_only and i < len(args):
            out[arg.name] = args[i]
        else:
            out[arg.name] = arg.default_value
    return out


def _decomposed_qparams(target, args, kwargs) -> QParams:
    a = _bound(target, args, kwargs)
    per_channel = "axis" in a
    return QParams(
        scale=a["scales"] if per_channel else a["scale"],
        zero_point=a["zero_points"] if per_channel else a["zero_point"],
        axis=a["axis"] if per_channel else None,
        quant_min=int(a["quant_min"]),
        quant_max=int(a["quant_max"]),
        dtype=a["dtype"],
        style="decomposed",
    )


def _tensor_qparams(q: Tensor) -> QParams:
    """The parameters a torch quantized tensor carries."""
    dtype = _INT_OF_QDTYPE[q.dtype]
    info = torch.iinfo(dtype)
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zp, axis = q.q_per_channel_scales(), q.q_per_channel_zero_points(), q.q_per_channel_axis()
    else:
        scale, zp, axis = q.q_scale(), q.q_zero_point(), None
    return QParams(scale, zp, axis, info.min, info.max, dtype, "torch")


def _qparams(node: fx.Node, args, kwargs, result) -> QParams | None:
    """Parameters of a recognised quantize/dequantize call, from its evaluated arguments."""
    if isinstance(result, Tensor) and result.is_quantized:
        return _tensor_qparams(result)
    if node.target in _PT2E_QUANTIZE or node.target in _PT2E_DEQUANTIZE:
        return _decomposed_qparams(node.target, args, kwargs)
    if isinstance(args[0], Tensor) and args[0].is_quantized:  # a dequantize of a torch quantized tensor
        return _tensor_qparams(args[0])
    return None


# ---------------------------------------------------------------------------------------------
# Recording the points of one graph
# ---------------------------------------------------------------------------------------------


def _is_quantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _QUANTIZE


def _is_dequantize(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _DEQUANTIZE)
        or (node.op == "call_method" and node.target == "dequantize")
    )


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
    if not (isinstance(result, Tensor) and result.is_quantized) or _is_quantize(n):
        return False
    values, _ = pytree.tree_flatten((args, kwargs))
    return any(isinstance(v, Tensor) and v.is_quantized for v in values)


@dataclass
class _Point:
    key: str
    node: str  # the graph node that produced the integers (a quantize, or the weight's dequantize)
    kind: str  # "activation" | "weight"
    depth: int
    qparams: QParams | None
    position: int  # in the graph, of the node the key names (pairing order; see _pairs)
    values: list = field(default_factory=list)  # integer tensor per batch
    float_inputs: list = field(default_factory=list)  # float input per batch (None for weights)


@dataclass
class _Output:
    name: str
    depth: int
    qparams: QParams | None  # set when the output is a dequantize
    floats: list = field(default_factory=list)
    ints: list = field(default_factory=list)  # the dequantize's integer input, per batch
    leaf: Any = None  # the graph node returned


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
            self._record(n, args, result)
            key = self.key_of.get(n)
            if key in self.force and self.batch < len(self.force[key].values):
                result = self._forced(n, args, kwargs, result, self.force[key])
        return result

    def _forced(self, n: fx.Node, args, kwargs, result, reference: _Point):
        ints = reference.values[self.batch]
        if self.points[self.key_of[n]].kind == "weight":  # re-run the dequantize on the given ints
            return getattr(self, n.op)(n.target, (_like(ints, args[0]),) + tuple(args[1:]), kwargs)
        return _like(ints, result, reference.qparams)

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
                self._add_point(n, self.modules[n.target], "module", depth + 1, _tensor_qparams(result), n)
                depth += 1
        elif self.lowered_ops and calls and _lowered_op(n, args, kwargs, result):
            # a lowered module or op (quantized in, quantized out): its own output is a point
            kind, base = ("module", n.target) if n.op == "call_module" else ("op", n.name)
            self._add_point(n, self._new_key(base), kind, depth + 1, _tensor_qparams(result), n)
            depth += 1
        elif calls and first is not None and _is_int(first_value) and first in self.constant and (
            _is_dequantize(n) or _is_float(result)
        ):
            # An integer constant turned into float: a (folded or unfolded) quantized weight.
            weight = self._weight_key(n)
            if weight is not None:
                qparams = _qparams(n, args, kwargs, result) if _is_dequantize(n) else None
                self._add_point(n, self._new_key(weight[0]), "weight", 0, qparams, weight[1])
        elif calls and first is not None and first not in self.constant and _is_float(first_value) and (
            _is_quantize(n) or _is_int(result)
        ):
            # Quantizing a value computed from the inputs; from a graph input it is no
            # requantization, so it does not add depth.
            if first.op != "placeholder":
                depth += 1
            qparams = _qparams(n, args, kwargs, result) if _is_quantize(n) else None
            self._add_point(n, self._new_key(first.name), "activation", depth, qparams, first)
        self.depth[n] = depth

    def _add_point(self, n, key, kind, depth, qparams, named: fx.Node) -> None:
        self.key_of[n] = key
        node = n.target if n.op == "call_module" else n.name
        self.points[key] = _Point(key, node, kind, depth, qparams, self.position[named])

    def _classify_outputs(self, n: fx.Node) -> None:
        leaves, _ = pytree.tree_flatten(n.args[0])
        for i, leaf in enumerate(leaves):
            depth = self.depth.get(leaf, 0) if isinstance(leaf, fx.Node) else 0
            qparams = None
            if _is_dequantize(leaf):
                args, kwargs = self.fetch_args_kwargs_from_env(leaf)
                qparams = _qparams(leaf, args, kwargs, None)
            self.outputs.append(_Output(f"output[{i}]", depth, qparams, leaf=leaf))

    def _record(self, n: fx.Node, args, result) -> None:
        key = self.key_of.get(n)
        if key is not None:
            point = self.points[key]
            if point.kind == "weight":
                point.values.append(_ints(args[0]))
                point.float_inputs.append(None)
            else:
                point.values.append(_ints(result))
                point.float_inputs.append(args[0].detach() if _is_float(args[0]) else None)
        if n.op == "output":
            leaves, _ = pytree.tree_flatten(n.args[0])
            values, _ = pytree.tree_flatten(args[0])
            for out, leaf, value in zip(self.outputs, leaves, values):
                out.floats.append(value.detach() if isinstance(value, Tensor) else value)
                if out.qparams is not None:
                    out.ints.append(_ints(self.env[leaf.args[0]]).to(torch.int64))


def _like(ints: Tensor, template, qparams: QParams | None = None):
    """``ints`` in the form of ``template``: same dtype, or a quantized tensor on the grid of
    ``qparams`` (the reference's, so that a wrong candidate scale does not travel on) or, if
    unknown, of ``template``."""
    if not isinstance(template, Tensor) or ints.shape != template.shape:
        return template  # not substitutable: the point fails on its own anyway
    if not template.is_quantized:
        return ints.to(template.dtype)
    if qparams is not None and qparams.style == "torch":
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
    recorder = _Recorder(gm, modules, force, rename, lowered_ops)
    for batch in _batches(batches):
        recorder.run_batch(batch)
    return recorder


def quantize_points(gm: fx.GraphModule, batches: Sequence) -> dict[str, list[Tensor]]:
    """The integer output of every quantize point of ``gm``, per batch, in topological order.

    ``batches``: a sequence of input tuples (or single tensors). ``gm`` is only interpreted,
    never modified. Keys are described in the module docstring.
    """
    return {key: point.values for key, point in _run(gm, batches).points.items()}


def output_quantization(gm: fx.GraphModule, batch) -> list[tuple[QParams | None, int]]:
    """Per output of ``gm``: its qparams if it is a dequantize (else ``None``), and how many
    requantizations the longest path to it has (what a depth budget counts)."""
    return [(out.qparams, out.depth) for out in _run(gm, [batch]).outputs]


# ---------------------------------------------------------------------------------------------
# Judging points
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worst:
    """The element with the largest difference at a point."""

    batch: int
    index: tuple
    expected: int
    got: int
    float_input: float | None  # the reference's float input there (None for folded weights)
    got_float_input: float | None  # the candidate's


@dataclass(frozen=True)
class PointResult:
    key: str
    kind: str  # "activation", "weight", "module", "output"
    node: str  # the reference node (module path for lowered modules)
    depth: int
    allowed: int
    max_lsb: int | None  # largest |candidate - reference| in steps; None if not comparable
    differing: int  # elements that differ at all
    elements: int
    beyond: int  # elements beyond ``allowed`` (all exactly one step beyond, if ok)
    ok: bool
    worst: Worst | None = None
    expected_qparams: QParams | None = None
    got_qparams: QParams | None = None
    note: str = ""  # why not comparable, NaN in the candidate, float outputs, ...
    max_abs: float | None = None  # float outputs only: largest |difference|
    nonfinite: int = 0  # outputs only: NaN/inf elements the candidate has beyond the reference's
    mismatch: str = ""  # what differs besides the integers (dtype, qparams): a failure of its own
    bound: float | None = None  # float outputs only: the largest |difference| allowed


def _judge(
    key: str,
    kind: str,
    node: str,
    depth: int,
    tolerance: Tolerance,
    expected: list[Tensor],
    got: list[Tensor],
    float_inputs: list,
    got_float_inputs: list,
    expected_qparams: QParams | None = None,
    got_qparams: QParams | None = None,
    note: str = "",
    keeps: tuple = (),
) -> PointResult:
    """``keeps``: other qparams the reference graph shows the point may legitimately carry (see
    _other_grids); values on them are compared on the reference's grid."""
    allowed = tolerance.allowed(depth)
    common = dict(key=key, kind=kind, node=node, depth=depth, allowed=allowed,
                  expected_qparams=expected_qparams, got_qparams=got_qparams)  # fmt: skip
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            return PointResult(max_lsb=None, differing=e.numel(), elements=e.numel(), beyond=e.numel(),
                               ok=False, note=f"shape {tuple(e.shape)} in the reference, "
                               f"{tuple(g.shape)} in the candidate", **common)  # fmt: skip
    if len(expected) != len(got):
        return PointResult(max_lsb=None, differing=0, elements=0, beyond=0, ok=False,
                           note=f"ran {len(got)} times in the candidate, {len(expected)} in the reference",
                           **common)  # fmt: skip
    notes, mismatch = ([note] if note else []), []
    if expected and expected[0].dtype != got[0].dtype:
        mismatch.append(f"dtype {got[0].dtype} in the candidate, {expected[0].dtype} in the reference")
    differ = qparams_difference(expected_qparams, got_qparams)
    if differ and any(qparams_difference(k, got_qparams) is None for k in keeps):
        # a lowered op that keeps its input's qparams (e.g. hardtanh, whose output the next op
        # requantizes), as the reference graph allows: its values are compared on the reference's grid
        got = [_on_grid(g, got_qparams, expected_qparams) for g in got]
        notes.append("the lowered op carries qparams the reference graph allows it (its input's, or its "
                     "fixed ones): compared on the reference's grid")
    elif differ:
        mismatch.append(f"output qparams differ: {differ}")
    worst_value, worst_at, differing, elements, beyond, one_more = -1, None, 0, 0, 0, 0
    for b, (e, g) in enumerate(zip(expected, got)):
        diff = (g.to(torch.int64) - e.to(torch.int64)).abs()
        elements += diff.numel()
        if diff.numel() == 0:
            continue
        differing += int((diff > 0).sum())
        beyond += int((diff > allowed).sum())
        one_more += int((diff == allowed + 1).sum())
        flat = int(diff.argmax())
        if int(diff.reshape(-1)[flat]) > worst_value:
            worst_value = int(diff.reshape(-1)[flat])
            worst_at = (b, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)))
    max_lsb = max(worst_value, 0)
    ok = not mismatch and (max_lsb <= allowed or (
        tolerance.off_by_one_fraction is not None
        and beyond == one_more
        and one_more <= tolerance.off_by_one_fraction * elements
    ))
    worst = None
    if worst_at is not None and worst_value > 0:
        b, index = worst_at
        worst = Worst(
            batch=b,
            index=index,
            expected=int(expected[b][index]),
            got=int(got[b][index]),
            float_input=_at(float_inputs, b, index),
            got_float_input=_at(got_float_inputs, b, index),
        )
    return PointResult(max_lsb=max_lsb, differing=differing, elements=elements, beyond=beyond, ok=ok,
                       worst=worst, note="; ".join(notes), mismatch="; ".join(mismatch), **common)  # fmt: skip


def qparams_difference(expected: QParams | None, got: QParams | None) -> str | None:
    """What differs between two points' qparams, and by how much (None: the same, or unknown)."""
    if expected is None or got is None:
        return None
    if expected.axis != got.axis:
        return f"axis {got.axis} in the candidate, {expected.axis} in the reference (None: per tensor)"
    scales = [torch.as_tensor(q.scale, dtype=torch.float64).reshape(-1) for q in (expected, got)]
    zero_points = [torch.as_tensor(q.zero_point).to(torch.int64).reshape(-1) for q in (expected, got)]
    if scales[0].shape != scales[1].shape:
        return f"{scales[1].numel()} scales in the candidate, {scales[0].numel()} in the reference"
    parts = []
    channel = (lambda i: f" (channel {i})") if expected.axis is not None else (lambda i: "")
    if not torch.equal(*scales):
        i = int((scales[1] / scales[0] - 1).abs().argmax())
        parts.append(f"scale {float(scales[1][i]):.9g} in the candidate, {float(scales[0][i]):.9g} in the "
                     f"reference{channel(i)}: x{float(scales[1][i] / scales[0][i]):.9g}")
    if zero_points[0].shape != zero_points[1].shape or not torch.equal(*zero_points):
        i = int((zero_points[1] - zero_points[0]).abs().argmax()) if zero_points[0].shape == zero_points[1].shape else 0
        parts.append(f"zero_point {int(zero_points[1][i])} in the candidate, {int(zero_points[0][i])} in the "
                     f"reference{channel(i)}")
    if (expected.quant_min, expected.quant_max) != (got.quant_min, got.quant_max):
        parts.append(f"range {got.quant_min}..{got.quant_max} in the candidate, "
                     f"{expected.quant_min}..{expected.quant_max} in the reference")
    return "; ".join(parts) or None


def _on_grid(ints: Tensor, source: QParams, target: QParams) -> Tensor:
    """Integers of ``source``'s grid, dequantized and quantized onto ``target``'s (int64).

    Saturated to ``target``'s range, as its quantize would store them: a lowered hardtanh that
    keeps its input's wider range (seen: -1 where the reference's zero point is 0) carries
    values the reference saturates, and the next op's requantization saturates them alike."""
    values = (ints.to(torch.float64) - int(source.zero_point)) * float(source.scale)
    on_grid = torch.round(values / float(target.scale)).to(torch.int64) + int(target.zero_point)
    return on_grid.clamp(target.quant_min, target.quant_max)


def _at(tensors: list, batch: int, index: tuple) -> float | None:
    if batch >= len(tensors):
        return None
    t = tensors[batch]
    if not isinstance(t, Tensor) or t.dim() != len(index) or any(i >= s for i, s in zip(index, t.shape)):
        return None
    return float(t[index])


def _judge_output(ref: _Output, got, depth: int, tolerance: Tolerance, bound: float | None = None) -> PointResult:
    """One final output: in LSB of the reference's output scale if it is a dequantize; a float
    output bit for bit, or within ``bound`` (see _float_bound) under a relaxed tolerance."""
    name = ref.name
    for b, (e, g) in enumerate(zip(ref.floats, got)):
        if not isinstance(e, Tensor) or not isinstance(g, Tensor) or e.shape != g.shape:
            return PointResult(name, "output", name, depth, tolerance.allowed(depth), None, 0, 0, 0, False,
                               note=f"output is {_describe(g)} in the candidate, {_describe(e)} in the "
                               "reference")  # fmt: skip
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in got if g.is_floating_point())
    ref_nonfinite = sum(int((~torch.isfinite(e)).sum()) for e in ref.floats if e.is_floating_point())
    if nonfinite > ref_nonfinite:
        nan = sum(int(torch.isnan(g).sum()) for g in got if g.is_floating_point())
        elements = sum(g.numel() for g in got)
        what = f"{nan} NaN and {nonfinite - nan} inf" if nan and nonfinite > nan else (
            f"{nan} NaN" if nan else f"{nonfinite} inf")  # fmt: skip
        return PointResult(name, "output", name, depth, tolerance.allowed(depth), None, nonfinite, elements,
                           nonfinite, False, nonfinite=nonfinite - ref_nonfinite,
                           note=f"{what} in the candidate's output ({ref_nonfinite} in the reference)")
    if ref.qparams is not None:
        got_ints = [ref.qparams.quantize(g) for g in got]
        return _judge(name, "output", name, depth, tolerance, ref.ints, got_ints, ref.floats, got,
                      ref.qparams, ref.qparams,
                      note="candidate output put on the reference output's grid")  # fmt: skip
    # A float output (no dequantize at the end): there is no output scale, so exact unless the
    # tolerance is relaxed and the steps it allows at the quantizes feeding it bound it.
    max_abs = max((float((g.double() - e.double()).abs().max()) for e, g in zip(ref.floats, got)
                   if e.numel()), default=0.0)  # fmt: skip
    differing = sum(int((g != e).sum()) for e, g in zip(ref.floats, got))
    if bound is not None:
        # plus float32 rounding of the float ops after the last dequantize (a few ulp)
        top = max((float(e.abs().max()) for e in ref.floats if e.numel()), default=0.0)
        bound += 8 * torch.finfo(torch.float32).eps * top
        note = ("float output (no dequantize at the end): within the allowed steps times the scale of "
                "each quantize feeding it, through non-expanding float ops")
        ok = max_abs <= bound
    else:
        note = "float output (no dequantize at the end): compared bit for bit" + (
            "" if tolerance.is_exact else " (a float op between it and its quantizes that may "
            "amplify their steps: no bound)")
        ok = all(torch.equal(e, g) for e, g in zip(ref.floats, got))
    beyond = differing if not ok else 0
    return PointResult(name, "output", name, depth, tolerance.allowed(depth), None, differing,
                       sum(e.numel() for e in ref.floats), beyond, ok, note=note, max_abs=max_abs,
                       bound=bound)  # fmt: skip


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing a candidate conversion against the reference, point by point."""

    tolerance: Tolerance
    points: dict  # key -> PointResult, in the reference's topological order
    outputs: dict  # "output[i]" -> PointResult
    missing: tuple  # keys quantized in the reference but not in the candidate (a dropped q/dq)
    extra: tuple  # keys quantized in the candidate only
    order: tuple  # every reference key (missing ones included) in topological order
    isolated: bool = False  # each candidate point was fed the reference's integers
    module_inputs: dict = field(default_factory=dict)  # compare_lowered: path -> (ModuleInput, ...)

    @property
    def failures(self) -> list[str]:
        """Failing keys in reference order: points, missing points, outputs, then extra points."""
        failed = [k for k in self.order if k in self.missing or not self.points[k].ok]
        failed += [k for k, r in self.outputs.items() if not r.ok]
        return failed + list(self.extra)

    @property
    def ok(self) -> bool:
        return not self.failures

    def shared(self) -> Comparison:
        """Judged on the points both graphs have, and the outputs: for two forms that may quantize
        at different places (reference representations), not at different values."""
        order = tuple(k for k in self.order if k in self.points)
        return dataclasses.replace(self, missing=(), extra=(), order=order)

    @property
    def first_divergence(self) -> str | None:
        failures = self.failures
        return failures[0] if failures else None

    def _lsb_results(self) -> list[PointResult]:
        results = list(self.points.values()) + list(self.outputs.values())
        return [r for r in results if r.max_lsb is not None]

    @property
    def max_lsb(self) -> int:
        """The largest difference observed anywhere (points and outputs), in steps."""
        return max((r.max_lsb for r in self._lsb_results()), default=0)

    @property
    def output_lsb(self) -> float | None:
        """Largest output difference in LSB of the output scale; inf if the candidate output is
        NaN/inf; None if no output is a dequantize."""
        if any(r.nonfinite for r in self.outputs.values()):
            return math.inf
        values = [r.max_lsb for r in self.outputs.values() if r.max_lsb is not None]
        return float(max(values)) if values else None

    @property
    def outputs_ok(self) -> bool:
        """Only the final outputs hold (for forms whose inner quantize nodes legitimately differ,
        such as the reference representation)."""
        return all(r.ok for r in self.outputs.values())

    def outputs_message(self) -> str:
        """:meth:`message` for a comparison judged on its final outputs only."""
        failing = [r for r in self.outputs.values() if not r.ok]
        if not failing:
            return f"final outputs match the reference within {self.tolerance}"
        lines = _describe_failure(failing[0], self.tolerance, self.isolated)
        others = [_short(self, r.key) for r in failing[1:]]
        if others:
            lines.append(f"  also failing: {', '.join(others)}")
        return "\n".join(lines)

    def message(self) -> str:
        lines = []
        lsb = self._lsb_results()
        worst = max(lsb, key=lambda r: r.max_lsb, default=None)
        summary = (
            f"max over all {len(self.points)} points and {len(self.outputs)} outputs: {self.max_lsb} LSB"
            + (f" at {worst.key!r}" if worst is not None and worst.max_lsb else "")
        )
        if self.output_lsb is not None:
            summary += f"; final outputs: {self.output_lsb:g} LSB"
        if self.ok:
            return f"candidate matches the reference within {self.tolerance}; {summary}"
        first = self.first_divergence
        if first in self.missing:
            lines.append(
                f"first divergence: quantize point {first!r} is missing in the candidate: the reference "
                "quantizes there, the candidate does not (a dropped quantize/dequantize)"
            )
        elif first in self.extra:
            lines.append(f"first divergence: the candidate quantizes at {first!r}, the reference does not")
        else:
            r = self.points.get(first) or self.outputs[first]
            lines += _describe_failure(r, self.tolerance, self.isolated)
        others = [k for k in self.failures if k != first and k not in self.missing and k not in self.extra]
        if others:
            shown = ", ".join(_short(self, k) for k in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            lines.append(f"  also failing: {shown}{more}")
        if self.missing:
            lines.append(f"  missing in the candidate (dropped q/dq): {', '.join(self.missing)}")
        if self.extra:
            lines.append(f"  extra in the candidate (quantized there only): {', '.join(self.extra)}")
        lines.append(f"  {summary}")
        return "\n".join(lines)

    __str__ = message


def _short(c: Comparison, key: str) -> str:
    if key in c.missing:
        return f"{key} (missing)"
    if key in c.extra:
        return f"{key} (extra)"
    r = c.points.get(key) or c.outputs[key]
    if r.mismatch:
        return f"{key} ({r.max_lsb} LSB; {r.mismatch})"
    if r.max_lsb is not None:
        return f"{key} ({r.max_lsb} LSB)"
    if r.max_abs is not None:
        return f"{key} (float output, max |diff| {r.max_abs:.3g})"
    return f"{key} ({r.note})"


def _describe_failure(r: PointResult, tolerance: Tolerance, isolated: bool = False) -> list[str]:
    what = {"activation": "quantize point", "weight": "quantized weight", "module": "lowered module",
            "op": "lowered op", "output": "final output"}[r.kind]  # fmt: skip
    where = f"node {r.node}, " if r.node != r.key else ""
    lines = [f"first divergence: {what} {r.key!r} ({where}requantization depth {r.depth})"]
    if r.mismatch:  # never "diverges" with nothing to show: say what differs, and by how much
        lines.append(f"  {r.mismatch}")
        if r.max_lsb == 0:
            lines.append(f"  the integers agree (0 LSB over {r.elements} elements): only the above differs")
    if r.max_lsb is None:
        if r.max_abs is not None:
            bound = f"; allowed {r.bound:.6g}" if r.bound is not None else ""
            lines.append(f"  float values differ: |candidate - reference| up to {r.max_abs:.6g} "
                         f"({r.differing} of {r.elements} elements){bound}")
        lines.append(f"  {r.note}")
        lines.append(f"  allowed: {tolerance}")
        return lines
    if r.mismatch and r.max_lsb == 0:
        lines.append(f"  allowed: {tolerance}")
        return lines + ([f"  note: {r.note}"] if r.note else [])
    if r.worst is not None:
        w = r.worst
        line = f"  worst element: batch {w.batch}, index {w.index}: expected {w.expected}, got {w.got}"
        if w.float_input is not None:
            line += f"; float input there {w.float_input:.6g}"
            if w.got_float_input is not None and w.got_float_input != w.float_input:
                line += f" (candidate's {w.got_float_input:.6g})"
        elif r.kind == "weight":
            line += " (folded constant: no float input)"
        lines.append(line)
        expected_qp = r.expected_qparams.at(w.index) if r.expected_qparams is not None else None
        got_qp = r.got_qparams.at(w.index) if r.got_qparams is not None else None
        if expected_qp and got_qp and got_qp != expected_qp:
            lines.append(f"  qparams there: reference {expected_qp}; candidate {got_qp}")
        elif expected_qp:
            lines.append(f"  qparams there: {expected_qp}" + (" (the same in the candidate)" if got_qp else ""))
    lines.append(
        f"  |candidate - reference| up to {r.max_lsb} LSB; {r.differing} of {r.elements} elements differ, "
        f"{r.beyond} beyond the allowed {r.allowed} LSB"
    )
    lines.append(f"  allowed: {r.allowed} LSB at depth {r.depth}: {tolerance}")
    if isolated:
        lines.append("  (isolated: every candidate point was fed the reference's integers)")
    if r.note:
        lines.append(f"  note: {r.note}")
    return lines


def compare(
    reference: fx.GraphModule,
    candidate: fx.GraphModule,
    batches: Sequence,
    tolerance: Tolerance = EXACT,
    *,
    isolate: bool = False,
) -> Comparison:
    """Run both converted graphs on ``batches`` and compare every quantize point in integers.

    ``reference``: qref's conversion (the specification); ``candidate``: the converter under
    test, given the same prepared model. Neither is modified. With ``isolate`` every candidate
    point passes the reference's integers on, so each point shows only its own error (depth 1)
    instead of everything accumulated upstream.
    """
    ref = _run(reference, batches, lowered_ops=True)
    force = _forcing(ref) if isolate else None
    got = _run(candidate, batches, force=force, lowered_ops=True)
    rename = _pairs(ref.points, got.points)
    if rename:  # again under the reference's keys (isolation forces points by key)
        got = _run(candidate, batches, force=force, rename=rename, lowered_ops=True)
    depths, output_depths = _depths(ref, set(got.points) if isolate else None)
    results, missing = {}, []
    for key, point in ref.points.items():
        other = got.points.get(key)
        if other is None:
            missing.append(key)
            continue
        results[key] = _judge_point(key, point, other, depths[key], tolerance)
    extra = tuple(k for k in got.points if k not in ref.points)
    outputs = _compare_outputs(ref, got, tolerance, output_depths)
    return Comparison(tolerance, results, outputs, tuple(missing), extra, tuple(ref.points), isolate)


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


def _same_integers(a: _Point, b: _Point) -> bool:
    return bool(a.values) and len(a.values) == len(b.values) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.values, b.values))


def _groups(points: dict) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for key, point in sorted(points.items(), key=lambda item: item[1].position):
        groups.setdefault(_name_group(key, point.kind), []).append(key)
    return groups


def _forcing(ref: _Recorder) -> dict:
    return dict(ref.points)


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


def _judge_point(key: str, ref: _Point, got: _Point, depth: int, tolerance: Tolerance, kind=None, keeps=()):
    return _judge(key, kind or ref.kind, ref.node, depth, tolerance, ref.values, got.values,
                  ref.float_inputs, got.float_inputs, ref.qparams, got.qparams, keeps=keeps)  # fmt: skip


def _compare_outputs(ref: _Recorder, got: _Recorder, tolerance: Tolerance, depths: list) -> dict:
    if len(got.outputs) != len(ref.outputs):
        r = PointResult("output", "output", "output", 0, 0, None, 0, 0, 0, False,
                        note=f"{len(got.outputs)} outputs in the candidate, {len(ref.outputs)} in the reference",
                        )  # fmt: skip
        return {"output": r}
    return {
        out.name: _judge_output(out, other.floats, depth, tolerance,
                                None if tolerance.is_exact else _float_bound(ref, out.leaf, tolerance))
        for out, other, depth in zip(ref.outputs, got.outputs, depths)
    }


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
        if _is_dequantize(node):
            args, kwargs = ref.fetch_args_kwargs_from_env(node)
            q = _qparams(node, args, kwargs, None)
            if q is None:
                return None
            scale = float(torch.as_tensor(q.scale, dtype=torch.float64).max())
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


# ---------------------------------------------------------------------------------------------
# Lowered FX models
# ---------------------------------------------------------------------------------------------


def compare_lowered(
    reference_fx: fx.GraphModule,
    lowered: fx.GraphModule,
    batches: Sequence,
    tolerance: Tolerance | None = None,
    *,
    isolate: bool = True,
) -> Comparison:
    """A lowered FX model (quantized modules) against its reference (``convert_to_reference_fx``).

    Points: every reference module that runs on dequantized inputs and whose output is
    quantized is a point keyed by its module path, compared with the ``int_repr`` of the
    lowered module at that path; quantize nodes left in the lowered graph (the input
    quantize, quantizes around float ops) are points by the usual key; then the final
    outputs. A reference module whose lowered counterpart does not produce a quantized
    tensor is listed as missing; reference quantizes fused into a lowered op (e.g. the one
    after ``add_relu``) are covered by the next point or the outputs; a quantize only the
    lowered graph has is extra (a failure). A lowered module is judged on its own output
    qparams: other ones only where the reference graph allows them (``_other_grids``).
    ``Comparison.module_inputs`` gives each module's quantized input range and qparams, from
    which a kernel deviation is judged (``qref.engines.known_deviation``).

    ``isolate`` (default): each lowered point passes the reference's integers on, so a module
    gets exactly the quantized input its reference module saw (as ``qref.fx.kernel_check``
    does) and the kernel's own contract is what is measured; ``isolate=False`` runs the
    lowered model end to end (errors compound; use a depth budget).
    ``tolerance`` defaults to the kernel contract of the current quantized engine.
    """
    if tolerance is None:
        tolerance = Tolerance.kernel(torch.backends.quantized.engine)
    ref = _run(reference_fx, batches)
    module_key = _modules_before_points(reference_fx, ref)  # path -> reference key
    by_ref_key = {key: path for path, key in module_key.items()}
    force = None
    if isolate:
        force = _forcing(ref)
        force.update({path: ref.points[key] for path, key in module_key.items()})
    got = _run(lowered, batches, modules={path: path for path in module_key}, force=force)
    kept = {k for k in ref.points if by_ref_key.get(k, k) in got.points}
    depths, output_depths = _depths(ref, kept if isolate else None)
    inputs = _module_inputs(reference_fx, ref, module_key)
    inputs.update({p: i for p, i in _lowered_inputs(lowered, ref, module_key).items() if p not in inputs})
    results, missing, order = {}, [], []
    for key, point in ref.points.items():
        depth = depths[key]
        path = by_ref_key.get(key)
        if path is not None:
            order.append(path)
            if path in got.points:
                keeps = _other_grids(reference_fx, path, inputs[path])
                results[path] = _judge_point(path, point, got.points[path], depth, tolerance, kind="module",
                                             keeps=keeps)  # fmt: skip
            else:
                missing.append(path)
        elif key in got.points:
            order.append(key)
            results[key] = _judge_point(key, point, got.points[key], depth, tolerance)
    extra = tuple(k for k in got.points if k not in module_key and k not in ref.points)
    outputs = _compare_outputs(ref, got, tolerance, output_depths)
    return Comparison(tolerance, results, outputs, tuple(missing), extra, tuple(order), isolate, inputs)


@dataclass(frozen=True)
class ModuleInput:
    """One quantized input a reference module was fed (dequantized): its qparams and the
    smallest and largest integer over all batches (what a kernel's limits depend on)."""

    qparams: QParams | None
    low: int | None
    high: int | None


def _module_inputs(reference_fx: fx.GraphModule, ref: _Recorder, module_key: dict) -> dict:
    """Module path -> the ModuleInput of each dequantized input of that reference module."""
    nodes = {n.target: n for n in reference_fx.graph.nodes if n.op == "call_module" and n.target in module_key}
    found = {}
    for path, node in nodes.items():
        found[path] = []
        for dq in (a for a in node.all_input_nodes if _is_dequantize(a)):
            source = dq.args[0] if dq.args and isinstance(dq.args[0], fx.Node) else None
            point = ref.points.get(ref.key_of.get(source))
            values = [v for v in point.values if v.numel()] if point is not None else []
            found[path].append(ModuleInput(
                point.qparams if point is not None else None,
                min((int(v.min()) for v in values), default=None),
                max((int(v.max()) for v in values), default=None),
            ))
        found[path] = tuple(found[path])
    return found


def _other_grids(reference_fx: fx.GraphModule, path: str, inputs: tuple) -> tuple:
    """The qparams besides its quantize's that the reference graph allows the lowered form of
    module ``path``: its input's, for an op that may keep it (_keeps_input_grid), and the fixed
    qparams of a sigmoid/tanh/hardsigmoid module (whose quantized kernel always outputs on them;
    the reference's quantize after it may be another, e.g. a cat's shared one)."""
    grids = [i.qparams for i in inputs if i.qparams is not None] if _keeps_input_grid(reference_fx, path) else []
    from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER

    observer = _FIXED_QPARAMS_OP_TO_OBSERVER.get(type(reference_fx.get_submodule(path)))
    if observer is not None:
        observer = observer()
        scale, zero_point = observer.calculate_qparams()
        dtype = _INT_OF_QDTYPE[observer.dtype]
        info = torch.iinfo(dtype)
        grids.append(QParams(float(scale), int(zero_point), None, info.min, info.max, dtype, "torch"))
    return tuple(grids)


def _lowered_inputs(lowered: fx.GraphModule, ref: _Recorder, module_key: dict) -> dict:
    """Module path -> the ModuleInput of each input of a lowered module that is a point (a
    quantize, or another module point): what it was fed under isolation, for modules that are no
    point themselves (e.g. a Linear whose ReLU the reference applies before its quantize)."""
    found = {}
    for node in lowered.graph.nodes:
        if node.op != "call_module":
            continue
        fed = []
        for a in node.all_input_nodes:
            key = module_key.get(a.target) if a.op == "call_module" else (
                a.args[0].name if _is_quantize(a) and isinstance(a.args[0], fx.Node) else None)
            point = ref.points.get(key)
            if point is not None:
                values = [v for v in point.values if v.numel()]
                fed.append(ModuleInput(point.qparams, min((int(v.min()) for v in values), default=None),
                                       max((int(v.max()) for v in values), default=None)))
        found[node.target] = tuple(fed)
    return found


def _keeps_input_grid(reference_fx: fx.GraphModule, path: str) -> bool:
    """Whether the lowered form of reference module ``path`` may keep its input's qparams: an op
    without weights (an activation or pooling, which quantized kernels run on the input's grid);
    a weighted module always requantizes to its own."""
    module = reference_fx.get_submodule(path)
    return not any(True for _ in module.parameters()) and not hasattr(module, "weight")


def _modules_before_points(reference_fx: fx.GraphModule, ref: _Recorder) -> dict:
    """Module path -> key of the quantize after it, for modules that run on dequantized inputs."""
    found = {}
    for node in reference_fx.graph.nodes:
        if node.op != "call_module" or not any(_is_dequantize(a) for a in node.all_input_nodes):
            continue
        keys = [ref.key_of[u] for u in node.users if u in ref.key_of]
        if keys and node.target not in found:
            found[node.target] = keys[0]
    return found
