"""Small networks as data: :class:`ModelSpec` and the Hypothesis strategies that draw them.

A spec is a frozen dataclass tree: an input shape, a tuple of layers and a seed.  Layers are
``Conv`` (1d/2d, transposed, grouped/depthwise; 3d in the ops tier), ``BatchNorm`` (affine or
not), ``Linear`` (on the last dim of a 2-D to 4-D input), ``Act`` (relu / relu6 / hardtanh, sigmoid / tanh /
hardsigmoid whose outputs have fixed qparams, gelu / silu), ``Pool`` (max / avg), ``Flatten``,
``Residual`` (``x + body(x)``), ``Cat`` (two branches concatenated along channels), ``MatMul``
(two branches multiplied as matrices), and the transformer pieces ``LayerNorm``, ``Softmax`` and
``Attention`` (Q/K/V linears, scaled scores, softmax, output projection).  Beyond a chain on
one input: ``ExtraInput`` (another graph input through its own layers, joined by add / cat /
matmul), ``AlsoOutput`` (an intermediate value is a graph output too) and ``Embedding`` (a lookup
on an integer index input); ``spec.input_shapes``, ``spec.index_ranges`` and
``spec.output_shapes`` describe the graph's inputs and outputs.

* ``repr(spec)`` is Python that rebuilds the spec (``from qref.strategies.models import *``).
* ``spec.to_python()`` is standalone PyTorch source (``class Model``, ``init_parameters``,
  ``build_model()``) and ``spec.build()`` executes exactly that source, so the two agree
  bit for bit by construction.  Weights, biases and every BatchNorm's running statistics and
  affine parameters come from ``torch.Generator().manual_seed(spec.seed)`` in module order.
* The strategies do the shape arithmetic, so every drawn spec builds, runs, exports with
  ``torch.export`` and traces with ``torch.fx``.  Layers are drawn as lists and the simplest
  choice comes first in every ``sampled_from``, so a failure shrinks to a one-layer network.

Adding a layer kind is one :class:`Layer` subclass: a frozen dataclass whose fields are its
parameters, with its op name, its shape rule and its module::

    @dataclass(frozen=True, repr=False)
    class Softmax(Layer):
        dim: int = -1
        op = "softmax"                  # its name in ModelSpec.ops (and the module's: self.softmax0)

        def output_shape(self, shape):  # raise SpecError where the layer cannot apply
            return shape

        def module_source(self):
            return f"nn.Softmax(dim={self.dim})"

A kind with no module of its own (``Residual``, ``Cat``) overrides ``forward`` instead and lists
its nested layer sequences in ``branches``.  ``init_parameters`` sets conv / linear weights and
BatchNorm statistics; any other module keeps torch's initialisation, which must then be
deterministic (or set by the kind's ``after_init``).  The strategies draw a new kind once
``_block`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import linecache
import math
from dataclasses import dataclass
from typing import ClassVar, Iterable

from hypothesis import strategies as st

__all__ = [
    "Conv", "BatchNorm", "Linear", "Act", "Pool", "Flatten", "Residual", "Cat", "MatMul", "Softmax", "LayerNorm",
    "Attention", "Shared", "ExtraInput", "AlsoOutput", "Embedding", "ModelSpec", "model_specs", "conv_bn_specs",
    "fixed_qparams_specs", "TIERS", "OP_KINDS", "PATTERN_KINDS", "SEQUENCE_KINDS", "GRAPH_KINDS", "PT2E_ONLY_OPS",
]

TIERS = ("ops", "patterns", "models")
# Block kinds the "patterns" and "models" tiers draw (``kinds=`` narrows them).
PATTERN_KINDS = ("conv", "conv_bn", "linear_act", "linear_bn", "add", "cat", "matmul", "pool", "flatten_linear",
                 "linear_seq", "attention", "shared")
# kinds on (N, T, C) / (N, A, B, C) inputs, features last (transformer pieces)
SEQUENCE_KINDS = ("linear_seq", "attention")
# graph shapes beyond a chain on one float input, drawn only where ``kinds`` names them (every
# property on the default kinds keeps one input and one output): a second graph input joined
# later, a second graph output, an embedding lookup on an integer index input
GRAPH_KINDS = ("two_inputs", "two_outputs", "embedding")
# the ops the "ops" tier draws, one kind each (``kinds=`` narrows it to them)
OP_KINDS = ("conv1d", "conv2d", "conv3d", "linear")
# ops the strategies draw in the pt2e flow only: qref's FX reference lowers none of them yet (a
# module called twice: torch's convert_fx lowers it to one quantized module with one output
# scale for both calls; qref's lowering does not lower a shared module)
PT2E_ONLY_OPS = ("attention", "gelu", "silu", "layer_norm", "softmax", "shared")

MAX_CHANNELS = 8
MAX_SIDE = 12  # spatial sizes never exceed this (transposed convs grow them)
MAX_FEATURES = 64  # flatten -> linear


# ---------------------------------------------------------------------------- layer kinds

class SpecError(ValueError):
    pass


class _Node:
    """repr() that omits fields left at their defaults (still valid Python)."""

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default and type(v) is type(f.default):
                continue
            parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis prints failing specs with this
        printer.text(repr(self))


class Layer(_Node):
    """One layer kind: a frozen dataclass of its parameters that carries its own rules.

    A kind sets ``op`` and ``output_shape``, then ``module_source`` if it is one ``nn.Module``,
    or ``forward`` (and ``branches``) if it joins nested layer sequences.
    """

    op: ClassVar[str]  # op family in ModelSpec.ops, named like fixtures.zoo.ZooModel.ops
    branches: ClassVar[tuple] = ()  # nested layer sequences (a residual body, cat branches)

    @property
    def module_name(self) -> str:
        """Its module's attribute name, before the module number (``self.relu0``)."""
        return self.op

    @classmethod
    def ops_drawn(cls) -> tuple:
        """Every ``op`` a layer of this kind can have (what a run's coverage is measured on)."""
        return (cls.op,)

    def ops_used(self) -> tuple:
        """Its ops in ModelSpec.ops (a kind that joins with another op names that one too)."""
        return (self.op,)

    def output_shape(self, shape: tuple) -> tuple:
        """The shape rule: the output shape on an input of ``shape`` (SpecError if invalid)."""
        raise NotImplementedError

    def module_source(self) -> str:
        """Source of its ``nn.Module``'s constructor."""
        raise NotImplementedError

    def after_init(self, module: str) -> list[str]:
        """Statements on its built module (``module`` is e.g. ``model.bn0``) after init_parameters."""
        return []

    def forward(self, source: _Source, x: str) -> str:
        """The expression of its output on the variable ``x``: by default, its module called."""
        return f"self.{source.add_module(self)}({x})"


def layer_kinds() -> list[type]:
    """Every concrete layer kind of this module (a :class:`Layer` subclass with an ``op``)."""
    found, todo = [], [Layer]
    while todo:
        kind = todo.pop()
        todo.extend(kind.__subclasses__())
        if kind is not Layer and not kind.__name__.startswith("_") and kind.__module__ == __name__:
            found.append(kind)
    return sorted(found, key=lambda k: k.__name__)


def propagate(layers: Iterable, shape: tuple) -> tuple:
    """Output shape of ``layers`` on an input of ``shape`` (raises :class:`SpecError`)."""
    shape = tuple(shape)
    for layer in layers:
        if not isinstance(layer, Layer):
            raise SpecError(f"unknown layer {layer!r}")
        if len(shape) < 2:  # every shape rule may read the channels
            raise SpecError(f"{layer!r} on shape {shape}: no channel dim")
        shape = layer.output_shape(shape)
    return shape


@dataclass(frozen=True, repr=False)
class Conv(Layer):
    """``nn.Conv{dim}d`` or ``nn.ConvTranspose{dim}d`` (square kernels)."""

    in_channels: int
    out_channels: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    transpose: bool = False
    output_padding: int = 0
    dim: int = 2

    module_name = "conv"

    @property
    def op(self) -> str:
        return "conv_transpose" if self.transpose else f"conv{self.dim}d"

    @classmethod
    def ops_drawn(cls) -> tuple:
        return ("conv1d", "conv2d", "conv3d", "conv_transpose")

    def output_side(self, n: int) -> int:
        """One spatial side of the output, from that side of the input."""
        if self.transpose:
            return ((n - 1) * self.stride - 2 * self.padding + self.dilation * (self.kernel_size - 1)
                    + self.output_padding + 1)
        return (n + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // self.stride + 1

    def output_shape(self, shape: tuple) -> tuple:
        if self.in_channels != shape[1] or len(shape) - 2 != self.dim:
            raise SpecError(f"{self!r} on shape {shape}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise SpecError(f"groups do not divide channels: {self!r}")
        out = tuple(self.output_side(s) for s in shape[2:])
        if min(out) < 1:
            raise SpecError(f"{self!r} on {shape} gives {out}")
        return (shape[0], self.out_channels, *out)

    def module_source(self) -> str:
        cls = f"nn.ConvTranspose{self.dim}d" if self.transpose else f"nn.Conv{self.dim}d"
        args = [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"]
        for name, default in (("stride", 1), ("padding", 0)):
            if getattr(self, name) != default:
                args.append(f"{name}={getattr(self, name)}")
        if self.transpose and self.output_padding:
            args.append(f"output_padding={self.output_padding}")
        for name, default in (("groups", 1), ("dilation", 1)):  # ConvTranspose order: groups, bias, dilation
            if getattr(self, name) != default:
                args.append(f"{name}={getattr(self, name)}")
        if not self.bias:
            args.append("bias=False")
        return f"{cls}({', '.join(args)})"


@dataclass(frozen=True, repr=False)
class BatchNorm(Layer):
    """``nn.BatchNorm{dim}d``; ``zero_gamma`` lists channels whose gamma is exactly 0.  The seeded
    statistics and gamma/beta (``init_parameters``: mean ~0.3, var 0.25-1.75, |gamma| 0.5-1.5,
    beta ~0.2) are moved by ``mean_shift``/``beta_shift`` (added) and ``var_scale``/``gamma_scale``
    (multiplied): running statistics far from zero, tiny or huge variances, gammas and betas of
    any size."""

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    zero_gamma: tuple = ()
    dim: int = 2
    affine: bool = True  # False: no gamma/beta (normalisation by the running statistics only)
    mean_shift: float = 0.0
    var_scale: float = 1.0
    gamma_scale: float = 1.0
    beta_shift: float = 0.0

    op = "bn"

    def output_shape(self, shape: tuple) -> tuple:
        ranks = (0, 1) if self.dim == 1 else (2,)  # BatchNorm1d: (N, C) or (N, C, L)
        if self.num_features != shape[1] or len(shape) - 2 not in ranks:
            raise SpecError(f"{self!r} on shape {shape}")
        if any(not 0 <= i < shape[1] for i in self.zero_gamma):
            raise SpecError(f"{self!r}: zero_gamma channel out of range")
        if (self.zero_gamma or self.gamma_scale != 1.0 or self.beta_shift) and not self.affine:
            raise SpecError(f"{self!r}: zero_gamma, gamma_scale and beta_shift need affine=True")
        if not self.var_scale > 0:
            raise SpecError(f"{self!r}: var_scale must be positive")
        return shape

    def module_source(self) -> str:
        affine = "" if self.affine else ", affine=False"
        return f"nn.BatchNorm{self.dim}d({self.num_features}, eps={self.eps!r}, momentum={self.momentum!r}{affine})"

    def after_init(self, module: str) -> list[str]:
        lines = [f"{module}.running_mean += {self.mean_shift!r}"] if self.mean_shift else []
        lines += [f"{module}.running_var *= {self.var_scale!r}"] if self.var_scale != 1.0 else []
        lines += [f"{module}.weight *= {self.gamma_scale!r}"] if self.gamma_scale != 1.0 else []
        lines += [f"{module}.bias += {self.beta_shift!r}"] if self.beta_shift else []
        return lines + ([f"{module}.weight[{list(self.zero_gamma)!r}] = 0.0"] if self.zero_gamma else [])


@dataclass(frozen=True, repr=False)
class Linear(Layer):
    """``nn.Linear`` on the last dim of a 2-D, 3-D or 4-D input."""

    in_features: int
    out_features: int
    bias: bool = True

    op = "linear"
    module_name = "fc"

    def output_shape(self, shape: tuple) -> tuple:
        # features are the last dim: (N, C), or (N, T, C) / (N, A, B, C) as in transformers
        if len(shape) not in (2, 3, 4) or self.in_features != shape[-1]:
            raise SpecError(f"{self!r} on shape {shape}")
        return (*shape[:-1], self.out_features)

    def module_source(self) -> str:
        return f"nn.Linear({self.in_features}, {self.out_features}" + ("" if self.bias else ", bias=False") + ")"


# Activation kinds and their modules, simplest first (failures shrink towards relu).  The chain
# activations are drawn after any layer; gelu and silu in the transformer blocks.
_CHAIN_ACTIVATIONS = {"relu": "nn.ReLU()", "relu6": "nn.ReLU6()", "hardtanh": "nn.Hardtanh(-1.0, 1.0)",
                      "sigmoid": "nn.Sigmoid()", "tanh": "nn.Tanh()", "hardsigmoid": "nn.Hardsigmoid()"}
_ACTIVATIONS = {**_CHAIN_ACTIVATIONS, "gelu": "nn.GELU()", "silu": "nn.SiLU()"}


@dataclass(frozen=True, repr=False)
class Act(Layer):
    """``relu`` (nn.ReLU), ``relu6`` (nn.ReLU6 = hardtanh(0, 6)), ``hardtanh`` (nn.Hardtanh(-1, 1)),
    ``sigmoid``, ``tanh`` and ``hardsigmoid`` (quantizers give their outputs fixed qparams),
    ``gelu`` and ``silu`` (transformer blocks)."""

    kind: str = "relu"

    @property
    def op(self) -> str:
        return self.kind

    @classmethod
    def ops_drawn(cls) -> tuple:
        return tuple(_ACTIVATIONS)

    def output_shape(self, shape: tuple) -> tuple:
        if self.kind not in _ACTIVATIONS:
            raise SpecError(f"unknown activation {self.kind!r}")
        return shape

    def module_source(self) -> str:
        return _ACTIVATIONS[self.kind]


@dataclass(frozen=True, repr=False)
class Softmax(Layer):
    """``nn.Softmax(dim=-1)``."""

    op = "softmax"

    def output_shape(self, shape: tuple) -> tuple:
        return shape

    def module_source(self) -> str:
        return "nn.Softmax(dim=-1)"


@dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """``nn.LayerNorm`` over the last dim (``affine``: with its own weight and bias)."""

    features: int
    eps: float = 1e-5
    affine: bool = True

    op = "layer_norm"
    module_name = "ln"

    def output_shape(self, shape: tuple) -> tuple:
        if shape[-1] != self.features:
            raise SpecError(f"{self!r} on shape {shape}")
        return shape

    def module_source(self) -> str:
        affine = "" if self.affine else ", elementwise_affine=False"
        return f"nn.LayerNorm({self.features}, eps={self.eps!r}{affine})"


@dataclass(frozen=True, repr=False)
class Attention(Layer):
    """Self-attention on ``(N, T, embed)``: Q/K/V linears, ``softmax(q @ k^T * d**-0.5) @ v``
    per head, and the output projection (``nn.MultiheadAttention``'s math, as separate ops)."""

    embed: int
    heads: int = 1

    op = "attention"
    branches = ()

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 3 or shape[-1] != self.embed or self.embed % self.heads:
            raise SpecError(f"{self!r} on shape {shape}")
        return shape

    @classmethod
    def ops_drawn(cls) -> tuple:
        return ("attention",)

    def forward(self, source: _Source, x: str) -> str:
        e, h = self.embed, self.heads
        heads = [source.let(f"self.{source.add_module(Linear(e, e))}({x}).unflatten(-1, ({h}, {e // h}))"
                            ".transpose(1, 2)") for _ in "qkv"]
        q, k, v = heads
        scores = source.let(f"torch.matmul({q}, {k}.transpose(-1, -2)) * {(e // h) ** -0.5!r}")
        mixed = source.let(f"torch.matmul({scores}.softmax(dim=-1), {v}).transpose(1, 2).flatten(-2)")
        return f"self.{source.add_module(Linear(e, e))}({mixed})"


@dataclass(frozen=True, repr=False)
class Pool(Layer):
    kind: str = "max"  # "max" | "avg"
    kernel_size: int = 2
    stride: int = 2
    dim: int = 2

    op = "pool"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) - 2 != self.dim:
            raise SpecError(f"{self!r} on shape {shape}")
        out = tuple((s - self.kernel_size) // self.stride + 1 for s in shape[2:])
        if min(out) < 1:
            raise SpecError(f"{self!r} on {shape} gives {out}")
        return (*shape[:2], *out)

    def module_source(self) -> str:
        cls = f"nn.MaxPool{self.dim}d" if self.kind == "max" else f"nn.AvgPool{self.dim}d"
        return f"{cls}({self.kernel_size}, stride={self.stride})"


@dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``nn.Flatten()`` (``torch.flatten(x, 1)``)."""

    op = "flatten"

    def output_shape(self, shape: tuple) -> tuple:
        return (shape[0], math.prod(shape[1:]))

    def module_source(self) -> str:
        return "nn.Flatten()"


@dataclass(frozen=True, repr=False)
class Residual(Layer):
    """``x + body(x)``; ``body`` keeps the shape."""

    body: tuple = ()

    op = "add"

    @property
    def branches(self) -> tuple:
        return (self.body,)

    def output_shape(self, shape: tuple) -> tuple:
        if propagate(self.body, shape) != shape:
            raise SpecError(f"residual body changes the shape {shape}")
        return shape

    def forward(self, source: _Source, x: str) -> str:
        return f"{x} + {source.emit(self.body, x)}"


@dataclass(frozen=True, repr=False)
class Shared(Layer):
    """One module called twice: ``layer(between(layer(x)))`` (shared weights; with a BatchNorm in
    ``between`` and another after it, two conv->BN chains share one conv, real-converter-bugs
    #5, #6).  ``layer`` keeps the shape."""

    layer: Layer = None
    between: tuple = ()

    op = "shared"

    @property
    def branches(self) -> tuple:
        return ((self.layer,), self.between)

    @classmethod
    def ops_drawn(cls) -> tuple:
        return ("shared",)

    def output_shape(self, shape: tuple) -> tuple:
        once = propagate((self.layer,), shape)
        if once != shape or propagate(self.between, shape) != shape:
            raise SpecError(f"shared {self.layer!r} must keep the shape {shape}")
        return shape

    def forward(self, source: _Source, x: str) -> str:
        first = source.emit((self.layer,), x)
        middle = source.emit(self.between, first)
        with source.reusing():
            return self.layer.forward(source, middle)


@dataclass(frozen=True, repr=False)
class _TwoBranches(Layer):
    """Two layer sequences on the same input, joined; an empty branch is the identity."""

    left: tuple = ()
    right: tuple = ()

    @property
    def branches(self) -> tuple:
        return (self.left, self.right)


@dataclass(frozen=True, repr=False)
class Cat(_TwoBranches):
    """``torch.cat([left(x), right(x)], dim=1)``; an empty branch is the identity."""

    op = "cat"

    def output_shape(self, shape: tuple) -> tuple:
        a, b = propagate(self.left, shape), propagate(self.right, shape)
        if len(a) < 2 or a[:1] + a[2:] != b[:1] + b[2:]:
            raise SpecError(f"cat branches disagree: {a} vs {b}")
        return (shape[0], a[1] + b[1], *a[2:])

    def forward(self, source: _Source, x: str) -> str:
        left, right = source.emit(self.left, x), source.emit(self.right, x)
        return f"torch.cat([{left}, {right}], dim=1)"


@dataclass(frozen=True, repr=False)
class MatMul(_TwoBranches):
    """``torch.matmul(left(x), right(x).transpose(-1, -2))``: a product of two activations (no
    weight), batched over all but the last two dims; an empty branch is the identity."""

    op = "matmul"

    def output_shape(self, shape: tuple) -> tuple:
        a, b = propagate(self.left, shape), propagate(self.right, shape)
        if len(a) < 3 or a[:-2] != b[:-2] or a[-1] != b[-1]:
            raise SpecError(f"matmul branches do not multiply: {a} @ {b}^T")
        return (*a[:-1], b[-2])

    def forward(self, source: _Source, x: str) -> str:
        left, right = source.emit(self.left, x), source.emit(self.right, x)
        return f"torch.matmul({left}, {right}.transpose(-1, -2))"


@dataclass(frozen=True, repr=False)
class ExtraInput(Layer):
    """Another graph input of ``shape`` through ``body``, joined to the chain's value ``x``:
    ``x + body(y)`` (add), ``torch.cat([x, body(y)], dim=1)`` (cat) or
    ``torch.matmul(x, body(y).transpose(-1, -2))`` (matmul).  The model's forward takes one
    more argument per ExtraInput, in the order the layers are written (depth first)."""

    shape: tuple = ()
    body: tuple = ()
    join: str = "add"  # "add" | "cat" | "matmul"

    op = "extra_input"
    JOINS: ClassVar[tuple] = ("add", "cat", "matmul")  # simplest first

    @property
    def branches(self) -> tuple:
        return (self.body,)

    def ops_used(self) -> tuple:
        return (self.op, self.join)

    def output_shape(self, shape: tuple) -> tuple:
        if self.join not in self.JOINS or len(self.shape) < 2:
            raise SpecError(f"{self!r}: join must be one of {self.JOINS}, on an input with a channel dim")
        other = propagate(self.body, self.shape)
        if self.join == "add" and other == shape:
            return shape
        if self.join == "cat" and len(other) == len(shape) and other[:1] + other[2:] == shape[:1] + shape[2:]:
            return (shape[0], shape[1] + other[1], *shape[2:])
        if self.join == "matmul" and len(shape) >= 3 and other[:-2] == shape[:-2] and other[-1] == shape[-1]:
            return (*shape[:-1], other[-2])
        raise SpecError(f"{self!r} cannot join {other} to {shape}")

    def forward(self, source: _Source, x: str) -> str:
        other = source.emit(self.body, source.add_input())
        if self.join == "add":
            return f"{x} + {other}"
        if self.join == "cat":
            return f"torch.cat([{x}, {other}], dim=1)"
        return f"torch.matmul({x}, {other}.transpose(-1, -2))"


@dataclass(frozen=True, repr=False)
class AlsoOutput(Layer):
    """The value here is also a graph output (the identity in the chain): the forward returns
    ``(this value, ..., the final value)``.  Only in the top-level layers of a spec."""

    op = "extra_output"

    def output_shape(self, shape: tuple) -> tuple:
        return shape

    def forward(self, source: _Source, x: str) -> str:
        source.outputs.append(x)
        return x


@dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """``nn.Embedding(num_embeddings, embedding_dim)`` on an integer index input ``(N, T)``:
    ``(N, T, embedding_dim)``.  Only as the first layer on a graph input (the spec's or an
    ExtraInput's), which is then drawn as indices in ``[0, num_embeddings)``."""

    num_embeddings: int
    embedding_dim: int

    op = "embedding"

    def output_shape(self, shape: tuple) -> tuple:
        if len(shape) != 2 or self.num_embeddings < 1 or self.embedding_dim < 1:
            raise SpecError(f"{self!r} on shape {shape}: indices are (N, T)")
        return (*shape, self.embedding_dim)

    def module_source(self) -> str:
        return f"nn.Embedding({self.num_embeddings}, {self.embedding_dim})"


# ---------------------------------------------------------------------------- the spec

def _walk(layers):
    """Every layer of ``layers``, nested ones included (depth first)."""
    for layer in layers:
        yield layer
        for branch in layer.branches:
            yield from _walk(branch)


def _sequences(layers):
    """``layers`` and every nested layer sequence (residual bodies, cat branches)."""
    yield tuple(layers)
    for layer in layers:
        for branch in layer.branches:
            yield from _sequences(branch)


_INIT_SOURCE = '''
def init_parameters(model, seed):
    """Small weights and non-trivial BatchNorm statistics from one seeded generator,
    module by module in registration order (the order is part of the recipe)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.copy_(uniform(module.weight.shape, bound))
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, bound))
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                gamma = (torch.rand(c, generator=g) + 0.5) * sign
                beta = torch.randn(c, generator=g) * 0.2
                if module.affine:
                    module.weight.copy_(gamma)
                    module.bias.copy_(beta)
                module.num_batches_tracked.fill_(10)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))
'''


class _Source:
    """The generated ``Model`` as the layers write it: modules, forward lines, after-init lines."""

    def __init__(self) -> None:
        self.module_lines: list[str] = []
        self.forward_lines: list[str] = []
        self.after_init_lines: list[str] = []
        self.inputs: list[str] = ["x"]  # the forward's arguments (ExtraInput adds one each)
        self.outputs: list[str] = []  # values returned before the final one (AlsoOutput)
        self._names: dict[int, str] = {}  # id(layer) -> its module's name
        self._reuse = False

    @contextlib.contextmanager
    def reusing(self):
        """Within: a layer registered before is called through its existing module (``Shared``)."""
        self._reuse = True
        try:
            yield
        finally:
            self._reuse = False

    def add_module(self, layer: Layer) -> str:
        """Registers ``layer``'s module and returns its attribute name (numbered in order)."""
        if self._reuse and id(layer) in self._names:
            return self._names[id(layer)]
        name = f"{layer.module_name}{len(self.module_lines)}"
        self._names[id(layer)] = name
        self.module_lines.append(f"self.{name} = {layer.module_source()}")
        self.after_init_lines += layer.after_init(f"model.{name}")
        return name

    def add_input(self) -> str:
        """Another argument of the forward (``input1``, ``input2``, ...); returns its name."""
        self.inputs.append(f"input{len(self.inputs)}")
        return self.inputs[-1]

    def let(self, value: str) -> str:
        """A forward line ``xN = value``; returns ``xN`` (for layers that take several lines)."""
        x = f"x{len(self.forward_lines) + 1}"
        self.forward_lines.append(f"{x} = {value}")
        return x

    def emit(self, layers, x: str) -> str:
        """Forward lines of ``layers`` on ``x``, one variable per layer; returns the last one."""
        for layer in layers:
            x = self.let(layer.forward(self, x))
        return x


@dataclass(frozen=True, repr=False)
class ModelSpec(_Node):
    """A small network: ``layers`` applied in order to an input of ``input_shape`` (and to the
    further graph inputs its ExtraInput layers read)."""

    input_shape: tuple
    layers: tuple
    seed: int = 0

    def __post_init__(self) -> None:
        propagate(self.layers, self.input_shape)  # raises SpecError for a malformed spec
        top = set(map(id, self.layers))
        firsts = {id(chain[0]) for chain in self._input_chains() if chain}
        for layer in _walk(self.layers):
            if isinstance(layer, AlsoOutput) and id(layer) not in top:
                raise SpecError(f"{layer!r} only in a spec's top-level layers")
            if isinstance(layer, Embedding) and id(layer) not in firsts:
                raise SpecError(f"{layer!r} only as the first layer on a graph input")
            if isinstance(layer, Shared) and any(isinstance(inner, (ExtraInput, AlsoOutput, Embedding))
                                                 for inner in _walk(layer.branches[0] + layer.branches[1])):
                raise SpecError(f"{layer!r}: a shared layer reads no graph input and is no output")

    def _input_chains(self) -> list:
        """The layer sequence each graph input goes through first, in forward argument order."""
        return [self.layers] + [layer.body for layer in _walk(self.layers) if isinstance(layer, ExtraInput)]

    @property
    def input_shapes(self) -> tuple:
        """One shape per graph input, in forward argument order (``input_shape`` first)."""
        return (tuple(self.input_shape),) + tuple(tuple(layer.shape) for layer in _walk(self.layers)
                                                  if isinstance(layer, ExtraInput))

    @property
    def index_ranges(self) -> tuple:
        """Per graph input: ``num_embeddings`` if it is an index input (an Embedding reads it
        first: int64 indices in ``[0, num_embeddings)``), else None (float32)."""
        return tuple(chain[0].num_embeddings if chain and isinstance(chain[0], Embedding) else None
                     for chain in self._input_chains())

    def example_inputs(self) -> tuple:
        """One tensor per graph input: ones, or index 0 for an index input (for tracing)."""
        import torch

        return tuple(torch.ones(shape) if vocab is None else torch.zeros(shape, dtype=torch.int64)
                     for shape, vocab in zip(self.input_shapes, self.index_ranges))

    @property
    def output_shape(self) -> tuple:
        """The shape of the final output (the last one the forward returns)."""
        return propagate(self.layers, self.input_shape)

    @property
    def output_shapes(self) -> tuple:
        """One shape per graph output, in the order the forward returns them."""
        shapes, shape = [], tuple(self.input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
            if isinstance(layer, AlsoOutput):
                shapes.append(shape)
        return (*shapes, shape)

    def all_layers(self) -> list:
        """Every layer, nested ones included (depth first)."""
        return list(_walk(self.layers))

    @property
    def ops(self) -> frozenset:
        """Coarse op families, named like ``fixtures.zoo.ZooModel.ops``."""
        return frozenset(op for layer in _walk(self.layers) for op in layer.ops_used())

    def adjacent(self) -> list:
        """Every (layer, next layer) pair of every layer sequence, nested ones included."""
        return [pair for seq in _sequences(self.layers) for pair in zip(seq, seq[1:])]

    def conv_bn_pairs(self) -> list:
        """(Conv, BatchNorm) pairs where the BatchNorm directly follows the conv."""
        return [(a, b) for a, b in self.adjacent() if isinstance(a, Conv) and isinstance(b, BatchNorm)]

    def has_conv_bn_add(self) -> bool:
        """Whether some residual body ends in conv -> BatchNorm (FX fuses conv-bn-add there)."""
        return any(isinstance(r, Residual) and len(r.body) >= 2 and isinstance(r.body[-2], Conv)
                   and isinstance(r.body[-1], BatchNorm) for r in _walk(self.layers))

    def to_python(self, docstring: bool = True) -> str:
        """Standalone PyTorch source: ``class Model``, ``init_parameters``, ``build_model()``."""
        source = _Source()
        final = source.emit(self.layers, "x")
        out = f"({', '.join([*source.outputs, final])})" if source.outputs else final
        init = "\n".join(f"        {line}" for line in source.module_lines) or "        pass"
        forward = "\n".join(f"        {line}" for line in source.forward_lines)
        after_init = "".join(f"        {line}\n" for line in source.after_init_lines)
        shapes = "" if len(self.input_shapes) == 1 else f"INPUT_SHAPES = {self.input_shapes!r}\n"
        return (
            (f'"""Generated by qref.strategies.models from:\n{self!r}\n"""\n' if docstring else "")
            + "import math\n\n"
            "import torch\n"
            "from torch import nn\n\n"
            f"INPUT_SHAPE = {tuple(self.input_shape)!r}\n"
            + shapes
            + f"SEED = {self.seed!r}\n\n\n"
            "class Model(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            f"{init}\n\n"
            f"    def forward(self, {', '.join(source.inputs)}):\n"
            f"{forward}\n"
            f"        return {out}\n\n"
            f"{_INIT_SOURCE}\n\n"
            "def build_model(seed=SEED):\n"
            "    model = Model()\n"
            "    init_parameters(model, seed)\n"
            + ("    with torch.no_grad():\n" + after_init if after_init else "")
            + "    return model\n"
        )

    def build(self):
        """A fresh float32 ``nn.Module`` (train mode, like any new module): ``to_python()`` run."""
        return _namespace(self.to_python())["build_model"]()


@functools.lru_cache(maxsize=256)
def _namespace(source: str) -> dict:
    # A linecache entry lets tracebacks, inspect and torch.export show the generated lines.
    filename = f"<qref-model-{abs(hash(source)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {"__name__": "qref_generated_model"}
    exec(compile(source, filename, "exec"), ns)
    return ns


# ---------------------------------------------------------------------------- strategies

@dataclass(frozen=True)
class _Ctx:
    flow: str
    qat: bool
    transpose: bool | None = None  # None: may draw transposed convs
    groups: bool | None = None  # None: may draw grouped/depthwise


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv(draw, shape: tuple, ctx: _Ctx, *, keep_shape: bool = False, transpose=None, groups=None,
          out_channels: int | None = None, max_out: int = MAX_CHANNELS) -> Conv:
    """A conv valid on ``shape`` whose output stays within MAX_SIDE.  ``keep_shape``: output
    shape equals input shape (stride 1, 'same' padding, out == in channels)."""
    c, spatial = shape[1], shape[2:]
    dim = len(spatial)
    transpose = ctx.transpose if transpose is None else transpose
    groups = ctx.groups if groups is None else groups
    if transpose is None:
        transpose = draw(st.booleans(), label="transpose")
    groups_kind = "none" if groups is False else draw(
        st.sampled_from(["grouped", "depthwise"] if groups else ["none", "grouped", "depthwise"]),
        label="groups kind")
    if keep_shape:
        out_channels = c
    if groups_kind == "depthwise" and c > 1:
        g = c
        if out_channels is None:
            out_channels = c * draw(st.sampled_from([m for m in (1, 2) if c * m <= max_out] or [1]),
                                    label="depth multiplier")
    elif groups_kind == "grouped" and c > 1:
        options = [d for d in _divisors(c) if d > 1 and (out_channels is None or out_channels % d == 0)
                   and d <= max_out]
        g = draw(st.sampled_from(options), label="groups") if options else 1
        if out_channels is None:
            out_channels = g * draw(st.integers(1, max(1, max_out // g)), label="out channels per group")
    else:
        g = 1
    if out_channels is None:
        out_channels = draw(st.integers(1, max_out), label="out_channels")
    if out_channels % g:  # depthwise with a fixed out_channels that is not a multiple
        g = 1
    bias = draw(st.sampled_from([True, False]), label="bias")

    combos = []
    for k in (1, 3, 2):
        for s in (1, 2):
            for d in (1, 2):
                for p in range(0, d * (k - 1) // 2 + 1):
                    for op in ((0, 1) if transpose and s > 1 else (0,)):
                        cand = Conv(c, out_channels, k, s, p, d, g, bias, transpose, op, dim)
                        if op and op >= max(s, d):
                            continue
                        out = [cand.output_side(n) for n in spatial]
                        if out and (min(out) < 1 or max(out) > MAX_SIDE):
                            continue
                        if keep_shape and tuple(out) != tuple(spatial):
                            continue
                        combos.append(cand)
    if not combos:  # e.g. keep_shape with k=1 always works, so this is defensive
        return Conv(c, out_channels, 1, groups=g, bias=bias, transpose=transpose, dim=dim)
    return draw(st.sampled_from(combos), label="conv geometry")


@st.composite
def _bn(draw, channels: int, dim: int, ctx: _Ctx, zero_gamma: bool | None = None, eps=None,
        momentum=None) -> BatchNorm:
    eps = draw(_strategy(eps, [1e-5, 1e-3, 1.0, 0.1]), label="bn eps")
    momentum = draw(_strategy(momentum, [0.1, 0.01, 0.5]), label="bn momentum")
    # QAT preparation refuses affine=False (torch FX asserts, torchao's conv-bn fusion raises on
    # the missing weight): PTQ only, where prepare folds the running statistics alone.
    affine = ctx.qat or zero_gamma or draw(st.sampled_from([True, False]), label="bn affine")
    # torchao's and torch's QAT conv-bn fusions divide by gamma (NaN for gamma 0): PTQ only.
    if zero_gamma is None:
        zero_gamma = not ctx.qat and affine and draw(st.booleans(), label="zero gamma")
    zeros = ()
    if zero_gamma:
        zeros = tuple(sorted(draw(st.sets(st.integers(0, channels - 1), min_size=1), label="zero gamma channels")))
    # the seeded statistics, or far from zero, tiny and huge variances (simplest first)
    mean_shift = draw(st.sampled_from([0.0, 3.0, -8.0]), label="bn mean shift")
    var_scale = draw(st.sampled_from([1.0, 0.01, 25.0]), label="bn var scale")
    gamma_scale = draw(st.sampled_from([1.0, 0.05, 6.0]), label="bn gamma scale") if affine else 1.0
    beta_shift = draw(st.sampled_from([0.0, 1.5, -4.0]), label="bn beta shift") if affine else 0.0
    return BatchNorm(channels, eps, momentum, zeros, max(dim, 1), affine, mean_shift, var_scale, gamma_scale,
                     beta_shift)


def _strategy(value, default_choices) -> st.SearchStrategy:
    """``value`` as a strategy: None -> the default choices, a strategy as is, else just it."""
    if value is None:
        return st.sampled_from(default_choices)
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _bn_ok(shape: tuple) -> bool:
    # train-mode BatchNorm needs more than one value per channel
    return math.prod(shape[:1] + shape[2:]) > 1 and len(shape) in (2, 3, 4)


def _act():
    return st.sampled_from(list(_CHAIN_ACTIVATIONS)).map(Act)


def _maybe_act(draw, label: str = "activation") -> list:
    return [draw(_act(), label=label)] if draw(st.booleans(), label=f"{label}?") else []


def _bn_allowed(ctx: _Ctx, conv: Conv) -> bool:
    """Whether torch/torchao can *prepare* ``conv`` followed by a BatchNorm.

    Neither flow can fold/fuse a grouped ConvTranspose + BN (torch's ``fuse_conv_bn_weights``
    scales the wrong weight axis, prepare raises), and torch's FX QAT cannot fuse any
    ConvTranspose + BN.
    """
    if conv.transpose and conv.groups > 1:
        return False
    return not (ctx.flow == "fx" and ctx.qat and conv.transpose)


def _linear_bn_allowed(ctx: _Ctx) -> bool:
    """pt2e QAT folds no Linear + BN: the converted model keeps a train-mode BatchNorm whose
    numerics are not the QAT model's in eval mode, so such specs would test preparation only."""
    return not (ctx.flow == "pt2e" and ctx.qat)


@st.composite
def _block(draw, kind: str, shape: tuple, ctx: _Ctx) -> list:
    """Layers of one block of ``kind`` valid on ``shape`` (may be [] when ``kind`` cannot apply)."""
    spatial = shape[2:]
    if kind in ("conv", "conv_bn") and spatial:
        conv = draw(_conv(shape, ctx), label="conv")
        layers = [conv]
        out = propagate(layers, shape)
        if kind == "conv_bn" and _bn_ok(out) and _bn_allowed(ctx, conv):
            layers.append(draw(_bn(conv.out_channels, len(spatial), ctx), label="bn"))
        return layers + _maybe_act(draw)
    if kind in ("linear_act", "linear_bn") and not spatial:
        lin = Linear(shape[1], draw(st.integers(1, 16), label="out_features"),
                     draw(st.sampled_from([True, False]), label="bias"))
        bn_ok = kind == "linear_bn" and _bn_ok(shape) and _linear_bn_allowed(ctx)
        bn = [draw(_bn(lin.out_features, 1, ctx), label="bn")] if bn_ok else []
        return [lin, *bn] + _maybe_act(draw)
    if kind == "add" and spatial:
        conv = draw(_conv(shape, ctx, keep_shape=True, transpose=False), label="residual conv")
        body = [conv]
        if _bn_ok(shape) and draw(st.booleans(), label="residual bn"):
            body.append(draw(_bn(conv.out_channels, len(spatial), ctx), label="bn"))
        return [Residual(tuple(body))] + _maybe_act(draw, "activation after add")
    if kind == "cat" and spatial:
        def branch(label):
            if draw(st.booleans(), label=f"{label} is identity"):
                return ()
            conv = draw(_conv(shape, ctx, keep_shape=False, transpose=False, max_out=4), label=label)
            if propagate([conv], shape)[2:] != spatial:
                conv = dataclasses.replace(conv, kernel_size=1, stride=1, padding=0, dilation=1)
            return (conv, *_maybe_act(draw, f"{label} activation"))
        left, right = branch("left branch"), branch("right branch")
        if not left and not right:
            left = (Conv(shape[1], 1, dim=len(spatial)),)
        layers = [Cat(left, right)]
        if propagate(layers, shape)[1] > MAX_CHANNELS:  # squeeze back with a 1x1 conv
            layers.append(Conv(propagate(layers, shape)[1], MAX_CHANNELS // 2, dim=len(spatial)))
        return layers
    if kind == "matmul" and spatial:
        def branch(label):  # keeps the shape, so the branches always multiply
            if draw(st.booleans(), label=f"{label} is identity"):
                return ()
            conv = draw(_conv(shape, ctx, keep_shape=True, transpose=False), label=label)
            return (conv, *_maybe_act(draw, f"{label} activation"))
        # the product's last side is an input side (4-D) or the channel count (3-D): within bounds
        matmul = MatMul(branch("left branch"), branch("right branch"))
        return [matmul] + _maybe_act(draw, "activation after matmul")
    if kind == "linear_seq" and spatial:
        return draw(_linear_seq(shape, ctx), label="linear_seq")
    if kind == "attention" and len(shape) == 3 and ctx.flow == "pt2e":
        return draw(_attention_block(shape), label="attention block")
    if kind == "shared" and spatial and ctx.flow == "pt2e":
        return draw(_shared(shape, ctx), label="shared")
    if kind == "two_inputs":
        return draw(_two_inputs(shape, ctx), label="two_inputs")
    if kind == "two_outputs":  # this value is an output too, then one more weighted block
        return [AlsoOutput(), *draw(_block("conv" if spatial else "linear_act", shape, ctx), label="after output")]
    if kind == "pool" and spatial:
        options = [Pool(kind, k, s, len(spatial)) for kind in ("max", "avg")
                   for k, s in ((2, 2), (2, 1), (3, 2), (3, 1)) if min(spatial) >= k]
        return [draw(st.sampled_from(options), label="pool")] if options else []
    if kind == "flatten_linear":
        layers = [] if not spatial else [Flatten()]
        features = math.prod(shape[1:])
        if features > MAX_FEATURES:
            return []
        lin = Linear(features, draw(st.integers(1, 16), label="out_features"),
                     draw(st.sampled_from([True, False]), label="bias"))
        return layers + [lin] + _maybe_act(draw)
    return []


@st.composite
def _two_inputs(draw, shape: tuple, ctx: _Ctx) -> list:
    """A second graph input joined to ``x``: added (same shape), concatenated along the channels
    (its own channel count) or multiplied as matrices (same shape); its branch is the identity
    or a shape-keeping conv / linear (maybe + an activation)."""
    spatial = shape[2:]
    join = draw(st.sampled_from([j for j in ExtraInput.JOINS if j != "matmul" or spatial]), label="join")
    other = shape
    if join == "cat":
        other = (shape[0], draw(st.integers(1, MAX_CHANNELS // 2), label="second input channels"), *spatial)
    body: list = []
    if draw(st.booleans(), label="second input branch"):  # simplest: none (the identity)
        if spatial:
            body.append(draw(_conv(other, ctx, keep_shape=True, transpose=False), label="second input conv"))
        else:
            body.append(Linear(other[1], other[1], draw(st.booleans(), label="second input bias")))
        body += _maybe_act(draw, "second input activation")
    layers: list = [ExtraInput(other, tuple(body), join)]
    out = propagate(layers, shape)
    if join == "cat" and spatial and out[1] > MAX_CHANNELS:  # squeeze back with a 1x1 conv
        layers.append(Conv(out[1], MAX_CHANNELS // 2, dim=len(spatial)))
    elif join != "cat":
        layers += _maybe_act(draw, f"activation after {join}")
    return layers


@st.composite
def _embedding(draw, ctx: _Ctx) -> tuple:
    """(index input shape, layers): an embedding lookup on ``(N, T)`` indices, then a Linear on
    its ``(N, T, dim)`` output (maybe + an activation)."""
    shape = (draw(st.sampled_from([2, 1]), label="batch"), draw(st.integers(1, 10), label="indices per sample"))
    table = Embedding(draw(st.integers(1, 16), label="num_embeddings"), draw(st.integers(1, 16), label="embedding_dim"))
    lin = Linear(table.embedding_dim, draw(st.integers(1, 16), label="out_features"),
                 draw(st.sampled_from([True, False]), label="bias"))
    return shape, [table, lin, *_maybe_act(draw)]


@st.composite
def _linear_seq(draw, shape: tuple, ctx: _Ctx) -> list:
    """Linear on the last dim of a 3-D/4-D input, then maybe an activation (gelu/silu too in
    pt2e), a LayerNorm or a softmax (pt2e), and, on 3-D, maybe a BatchNorm1d over dim 1 (#7:
    a BatchNorm over the channels after a Linear over the last dim; pt2e PTQ folds it)."""
    lin = Linear(shape[-1], draw(st.integers(1, 16), label="out_features"),
                 draw(st.sampled_from([True, False]), label="bias"))
    layers: list = [lin]
    out = propagate(layers, shape)
    if len(shape) == 3 and _bn_ok(out) and ctx.flow == "pt2e" and _linear_bn_allowed(ctx) \
            and draw(st.booleans(), label="bn over dim 1"):
        layers.append(draw(_bn(out[1], 1, ctx), label="bn"))
    acts = ["relu", "gelu", "silu"] if ctx.flow == "pt2e" else ["relu"]
    if draw(st.booleans(), label="activation?"):
        layers.append(Act(draw(st.sampled_from(acts), label="activation")))
    if ctx.flow == "pt2e":
        tail = draw(st.sampled_from(["none", "layer_norm", "softmax"]), label="tail")
        if tail == "layer_norm":
            layers.append(LayerNorm(lin.out_features, draw(st.sampled_from([1e-5, 1e-3]), label="ln eps"),
                                    draw(st.booleans(), label="ln affine")))
        elif tail == "softmax":
            layers.append(Softmax())
    return layers


@st.composite
def _shared(draw, shape: tuple, ctx: _Ctx) -> list:
    """A shape-keeping conv called twice, maybe with a BatchNorm after each call (two conv->BN
    chains on one weight) and an activation between."""
    conv = draw(_conv(shape, ctx, keep_shape=True, transpose=False), label="shared conv")
    bn = _bn_ok(shape) and draw(st.booleans(), label="bn after each call")
    between: list = [draw(_bn(shape[1], len(shape) - 2, ctx), label="first bn")] if bn else []
    between += _maybe_act(draw, "activation between")
    after = [draw(_bn(shape[1], len(shape) - 2, ctx), label="second bn")] if bn else []
    return [Shared(conv, tuple(between)), *after]


@st.composite
def _attention_block(draw, shape: tuple) -> list:
    """A pre-LayerNorm transformer block on ``(N, T, E)``: ``x + attention(ln(x))``, then maybe
    ``x + fc2(gelu(fc1(ln(x))))``."""
    e = shape[-1]
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if e % h == 0]), label="heads")
    body = ((LayerNorm(e),) if draw(st.booleans(), label="pre layer norm") else ()) + (Attention(e, heads),)
    layers = [Residual(body)]
    if draw(st.booleans(), label="mlp"):
        hidden = draw(st.integers(1, 16), label="mlp hidden")
        layers.append(Residual((LayerNorm(e), Linear(e, hidden), Act("gelu"), Linear(hidden, e))))
    return layers


@st.composite
def _input_shape(draw, rank: int | None = None, max_side: int = 10, min_side: int = 1) -> tuple:
    n = draw(st.sampled_from([2, 1]), label="batch")
    if rank is None:
        rank = draw(st.sampled_from([2, 1, 2, 0]), label="spatial rank")  # conv2d twice as often
    c = draw(st.integers(1, MAX_CHANNELS if rank else 16), label="input channels")
    spatial = tuple(draw(st.integers(min_side, max_side), label="side") for _ in range(rank))
    if n * math.prod(spatial) == 1:
        n = 2  # BatchNorm in train mode needs two values per channel
    return (n, c, *spatial)


def _seeds():
    return st.integers(0, 2**16)


@st.composite
def _ops_spec(draw, ctx: _Ctx, kinds, fixed_qparams: bool = False) -> ModelSpec:
    """``kinds``: "conv" (any rank), "conv1d" / "conv2d" / "conv3d" (that rank), "linear"."""
    ranks = [r for r in (2, 1, 3) if kinds is None or "conv" in kinds or f"conv{r}d" in kinds]
    allowed = [k for k in ("conv", "linear") if kinds is None or k in kinds or (k == "conv" and ranks) or
               (k == "linear" and "linear_act" in kinds)] or ["conv", "linear"]
    kind = draw(st.sampled_from(allowed), label="op")
    if kind == "conv":  # a conv3d on a small volume (no transposed one: no quantizer annotates it)
        rank = draw(st.sampled_from(ranks or [2, 1, 3]), label="conv dim")
        shape = draw(_input_shape(rank=rank, max_side=5 if rank == 3 else 10), label="input shape")
        layers = [draw(_conv(shape, ctx, transpose=False if rank == 3 else None), label="conv")]
    else:
        shape = draw(_input_shape(rank=0), label="input shape")
        layers = [Linear(shape[1], draw(st.integers(1, 16), label="out_features"),
                         draw(st.sampled_from([True, False]), label="bias"))]
    if fixed_qparams:
        fixed = ["sigmoid", "tanh", "hardsigmoid"]
        layers.append(Act(draw(st.sampled_from(fixed), label="fixed-qparams activation")))
    else:
        layers += _maybe_act(draw)
    return ModelSpec(shape, tuple(layers), draw(_seeds(), label="seed"))


def _kinds(kinds, ctx: _Ctx) -> list:
    """The block kinds of ``kinds`` (default: PATTERN_KINDS) in their canonical order; the graph
    kinds only where named.  No embedding in FX QAT: its qconfigs give nn.Embedding a per-channel
    symmetric weight, which torch's QAT Embedding refuses (per_channel_affine_float_qparams only)."""
    if kinds is None:
        return list(PATTERN_KINDS)
    return [k for k in PATTERN_KINDS + GRAPH_KINDS
            if k in kinds and not (k == "embedding" and ctx.flow == "fx" and ctx.qat)]


@st.composite
def _pattern_spec(draw, ctx: _Ctx, kinds) -> ModelSpec:
    kinds = [k for k in _kinds(kinds, ctx) if k != "conv"] or ["conv_bn"]
    kind = draw(st.sampled_from(kinds), label="pattern")
    if kind in ("linear_act", "linear_bn"):
        shape = draw(_input_shape(rank=0), label="input shape")  # batch >= 2: BatchNorm1d can train
    elif kind in SEQUENCE_KINDS:  # (N, T, C) (or (N, A, B, C) for a Linear)
        rank = 1 if kind == "attention" or ctx.flow == "fx" else draw(st.sampled_from([1, 2]), label="dim")
        shape = draw(_input_shape(rank=rank), label="input shape")
    elif kind == "embedding":
        shape, layers = draw(_embedding(ctx), label="embedding")
        return ModelSpec(shape, tuple(layers), draw(_seeds(), label="seed"))
    elif kind in ("two_inputs", "two_outputs"):
        shape = draw(_input_shape(rank=draw(st.sampled_from([2, 1, 0]), label="dim")), label="input shape")
    else:  # a pool needs a side of 2 for its smallest window
        shape = draw(_input_shape(rank=draw(st.sampled_from([2, 1]), label="dim"), min_side=2 if kind == "pool" else 1),
                     label="input shape")
    layers: list = []
    if kind in ("pool", "flatten_linear", "matmul"):  # quantized input first: a conv (+relu)
        layers = draw(_block("conv", shape, ctx), label="conv before")
        if kind == "pool" and min(propagate(layers, shape)[2:]) < 2:  # the conv left no room for a window
            layers = [draw(_conv(shape, ctx, keep_shape=True), label="conv before"), *_maybe_act(draw)]
    elif kind in ("two_inputs", "two_outputs"):  # something to quantize on the first input
        layers = draw(_block("conv" if shape[2:] else "linear_act", shape, ctx), label="weighted before")
    if kind == "flatten_linear" and math.prod(propagate(layers, shape)[1:]) > MAX_FEATURES:
        if min(propagate(layers, shape)[2:]) >= 2:
            layers.append(Pool("max", 2, 2, len(shape) - 2))
    block = draw(_block(kind, propagate(layers, shape), ctx), label=kind)
    if not block:  # the pattern cannot apply here (tiny input): fall back to conv-bn
        block = draw(_block("conv_bn", propagate(layers, shape), ctx), label="conv_bn")
    layers += block
    return ModelSpec(shape, tuple(layers), draw(_seeds(), label="seed"))


@st.composite
def _models_spec(draw, ctx: _Ctx, kinds, max_blocks: int) -> ModelSpec:
    kinds = _kinds(kinds, ctx) or list(PATTERN_KINDS)
    if "embedding" in kinds and draw(st.booleans(), label="index input"):
        shape, layers = draw(_embedding(ctx), label="first block")
    else:
        shape = draw(_input_shape(), label="input shape")
        firsts = ("linear_act", "linear_bn") if len(shape) == 2 else ("conv", "conv_bn")
        first = draw(st.sampled_from([k for k in firsts if k in kinds] or firsts[:1]), label="first block kind")
        layers = list(draw(_block(first, shape, ctx), label="first block"))
    later = [k for k in kinds if k != "embedding"] or list(PATTERN_KINDS)  # an embedding reads a graph input
    more = draw(st.lists(st.sampled_from(later), max_size=max_blocks - 1), label="blocks")
    for kind in more:
        cur = propagate(layers, shape)
        layers += draw(_block(kind, cur, ctx), label=kind)
    return ModelSpec(shape, tuple(layers), draw(_seeds(), label="seed"))


def model_specs(flow: str = "pt2e", tier: str = "models", qat: bool = False, kinds=None,
                max_blocks: int = 5) -> st.SearchStrategy[ModelSpec]:
    """Specs of small networks every ``flow`` can export/trace and ``qat`` can train.

    * ``"ops"``: one conv (1d/2d, maybe transposed/grouped/depthwise; or 3d on a volume of sides
      <= 5) or linear, maybe + an activation (relu ... sigmoid/tanh, whose fixed-qparams kernels count as ops too).
    * ``"patterns"``: one pattern of ``kinds`` (default all of :data:`PATTERN_KINDS` but
      ``conv``): conv-bn(-act), linear(-act), linear-bn(-act), residual add (-act), cat of two
      branches, matmul of two branches (-act), conv then pool, conv then flatten-linear.
    * ``"models"``: a first weighted block then up to ``max_blocks - 1`` blocks of ``kinds``.

    Graphs beyond one input and one output only where ``kinds`` names :data:`GRAPH_KINDS`:
    ``two_inputs`` (a second graph input, maybe through a conv / linear, added, concatenated or
    multiplied to the chain), ``two_outputs`` (an intermediate value returned too) and
    ``embedding`` (an embedding lookup on integer indices, then a linear: the first block; FX's
    default mappings leave the lookup float, qref's pt2e quantizer quantizes its table).
    """
    if flow not in ("pt2e", "fx"):
        raise ValueError(f"flow must be 'pt2e' or 'fx', not {flow!r}")
    ctx = _Ctx(flow, bool(qat))
    if tier == "ops":
        return _ops_spec(ctx, kinds)
    if tier == "patterns":
        return _pattern_spec(ctx, kinds)
    if tier == "models":
        return _models_spec(ctx, kinds, max_blocks)
    raise ValueError(f"tier must be one of {TIERS}, not {tier!r}")


def fixed_qparams_specs(flow: str = "pt2e") -> st.SearchStrategy[ModelSpec]:
    """One conv or linear followed by sigmoid, tanh or hardsigmoid, whose output qparams the
    quantizer fixes (not observed): the ops tier with that activation always present (no
    BatchNorm, so the same specs serve PTQ and QAT)."""
    return _ops_spec(_Ctx(flow, False), None, fixed_qparams=True)


@st.composite
def conv_bn_specs(draw, transpose: bool | None = None, groups: bool | None = None,
                  dim: int | None = None, zero_gamma: bool | None = None, flow: str = "pt2e",
                  qat: bool = False, preparable: bool | None = None, eps=None,
                  momentum=None) -> ModelSpec:
    """One conv followed by one BatchNorm (the folding family): any eps/momentum, zero gammas
    (PTQ only), bias on/off, plain/grouped/depthwise, conv or conv-transpose, 1d or 2d.

    ``preparable`` (default: True unless both ``transpose`` and ``groups`` are True) keeps to
    specs torch/torchao can prepare in ``flow``: grouped ConvTranspose + BN is not (see
    ``_bn_allowed``), but qref's own folding can still be checked on it with
    ``conv_bn_specs(transpose=True, groups=True)``.  ``eps`` / ``momentum``: a value or a
    strategy (default: 1e-5, 1e-3, 1.0, 0.1 / 0.1, 0.01, 0.5).
    """
    if preparable is None:
        preparable = not (transpose and groups)
    if flow == "fx" and qat:
        if transpose:
            raise ValueError("torch's FX QAT cannot fuse ConvTranspose + BatchNorm")
        transpose = False
    if qat and zero_gamma:
        raise ValueError("QAT conv-bn fusion is undefined for a zero gamma")
    ctx = _Ctx(flow, bool(qat), transpose, groups)
    rank = dim if dim is not None else draw(st.sampled_from([2, 1]), label="dim")
    shape = draw(_input_shape(rank=rank), label="input shape")
    if groups and shape[1] == 1:
        shape = (shape[0], 2, *shape[2:])
    conv = draw(_conv(shape, ctx, transpose=transpose, groups=groups), label="conv")
    if preparable and not _bn_allowed(ctx, conv):  # grouped ConvTranspose + BN: see _bn_allowed
        conv = dataclasses.replace(conv, groups=1)
    out = propagate([conv], shape)
    if not _bn_ok(out):  # e.g. batch 1 and a 1x1 output: make the batch 2
        shape = (2, *shape[1:])
    bn = draw(_bn(conv.out_channels, rank, ctx, zero_gamma=False if qat else zero_gamma, eps=eps,
                  momentum=momentum), label="bn")
    return ModelSpec(shape, (conv, bn), draw(_seeds(), label="seed"))
