"""Each layer kind of qref.strategies.models carries its own rules (issue 12, section 3).

* The per-kind rules give exactly what the type-switching code they replaced gave: a frozen
  copy of that code (below, the oracle) is compared with the module on drawn and hand-written
  specs (source text, shapes, op names, walks, SpecError messages).
* A new kind is one class, defined here without touching models.py: it validates its shape,
  builds, runs, exports, emits its source and reports its op name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qref.strategies.models import (
    Act, BatchNorm, Cat, Conv, Flatten, Layer, Linear, MatMul, ModelSpec, Pool, Residual, SpecError,
    conv_bn_specs, fixed_qparams_specs, model_specs, propagate,
)

# ---------------------------------------------------------------------------- the oracle
# models.py before the layer kinds carried their rules (commit 748ba6a), trimmed to what it
# computed from a spec.  Frozen: do not edit it to make a test pass.

_OLD_ACTIVATIONS = {"relu": "nn.ReLU()", "relu6": "nn.ReLU6()", "hardtanh": "nn.Hardtanh(-1.0, 1.0)",
                    "sigmoid": "nn.Sigmoid()", "tanh": "nn.Tanh()", "hardsigmoid": "nn.Hardsigmoid()"}


def _old_conv_out(n, c):
    if c.transpose:
        return (n - 1) * c.stride - 2 * c.padding + c.dilation * (c.kernel_size - 1) + c.output_padding + 1
    return (n + 2 * c.padding - c.dilation * (c.kernel_size - 1) - 1) // c.stride + 1


def _old_pool_out(n, p):
    return (n - p.kernel_size) // p.stride + 1


def old_propagate(layers, shape):
    shape = tuple(shape)
    for layer in layers:
        n, c, spatial = shape[0], shape[1], shape[2:]
        if isinstance(layer, Conv):
            if layer.in_channels != c or len(spatial) != layer.dim:
                raise SpecError(f"{layer!r} on shape {shape}")
            if c % layer.groups or layer.out_channels % layer.groups:
                raise SpecError(f"groups do not divide channels: {layer!r}")
            out = tuple(_old_conv_out(s, layer) for s in spatial)
            if min(out) < 1:
                raise SpecError(f"{layer!r} on {shape} gives {out}")
            shape = (n, layer.out_channels, *out)
        elif isinstance(layer, BatchNorm):
            ranks = (0, 1) if layer.dim == 1 else (2,)
            if layer.num_features != c or len(spatial) not in ranks:
                raise SpecError(f"{layer!r} on shape {shape}")
            if any(not 0 <= i < c for i in layer.zero_gamma):
                raise SpecError(f"{layer!r}: zero_gamma channel out of range")
        elif isinstance(layer, Linear):
            if len(spatial) != 0 or layer.in_features != c:
                raise SpecError(f"{layer!r} on shape {shape}")
            shape = (n, layer.out_features)
        elif isinstance(layer, Act):
            if layer.kind not in _OLD_ACTIVATIONS:
                raise SpecError(f"unknown activation {layer.kind!r}")
        elif isinstance(layer, Pool):
            if len(spatial) != layer.dim:
                raise SpecError(f"{layer!r} on shape {shape}")
            out = tuple(_old_pool_out(s, layer) for s in spatial)
            if min(out) < 1:
                raise SpecError(f"{layer!r} on {shape} gives {out}")
            shape = (n, c, *out)
        elif isinstance(layer, Flatten):
            shape = (n, math.prod(shape[1:]))
        elif isinstance(layer, Residual):
            if old_propagate(layer.body, shape) != shape:
                raise SpecError(f"residual body changes the shape {shape}")
        elif isinstance(layer, Cat):
            a, b = old_propagate(layer.left, shape), old_propagate(layer.right, shape)
            if len(a) < 2 or a[:1] + a[2:] != b[:1] + b[2:]:
                raise SpecError(f"cat branches disagree: {a} vs {b}")
            shape = (n, a[1] + b[1], *a[2:])
        elif isinstance(layer, MatMul):
            a, b = old_propagate(layer.left, shape), old_propagate(layer.right, shape)
            if len(a) < 3 or a[:-2] != b[:-2] or a[-1] != b[-1]:
                raise SpecError(f"matmul branches do not multiply: {a} @ {b}^T")
            shape = (*a[:-1], b[-2])
        else:
            raise SpecError(f"unknown layer {layer!r}")
    return shape


def old_walk(layers):
    for layer in layers:
        yield layer
        if isinstance(layer, Residual):
            yield from old_walk(layer.body)
        elif isinstance(layer, (Cat, MatMul)):
            yield from old_walk(layer.left)
            yield from old_walk(layer.right)


def old_sequences(layers):
    yield tuple(layers)
    for layer in layers:
        if isinstance(layer, Residual):
            yield from old_sequences(layer.body)
        elif isinstance(layer, (Cat, MatMul)):
            yield from old_sequences(layer.left)
            yield from old_sequences(layer.right)


_OLD_INIT_SOURCE = '''
def init_parameters(model, seed):
    """Small weights and non-trivial BatchNorm statistics from one seeded generator,
    module by module in registration order (the order is part of the recipe)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)):
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
                module.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
                module.bias.copy_(torch.randn(c, generator=g) * 0.2)
                module.num_batches_tracked.fill_(10)
'''


def _old_ctor(layer):
    if isinstance(layer, Conv):
        cls = f"nn.ConvTranspose{layer.dim}d" if layer.transpose else f"nn.Conv{layer.dim}d"
        args = [str(layer.in_channels), str(layer.out_channels), f"kernel_size={layer.kernel_size}"]
        for name, default in (("stride", 1), ("padding", 0)):
            if getattr(layer, name) != default:
                args.append(f"{name}={getattr(layer, name)}")
        if layer.transpose and layer.output_padding:
            args.append(f"output_padding={layer.output_padding}")
        for name, default in (("groups", 1), ("dilation", 1)):
            if getattr(layer, name) != default:
                args.append(f"{name}={getattr(layer, name)}")
        if not layer.bias:
            args.append("bias=False")
        return f"{cls}({', '.join(args)})"
    if isinstance(layer, BatchNorm):
        return f"nn.BatchNorm{layer.dim}d({layer.num_features}, eps={layer.eps!r}, momentum={layer.momentum!r})"
    if isinstance(layer, Linear):
        return f"nn.Linear({layer.in_features}, {layer.out_features}" + ("" if layer.bias else ", bias=False") + ")"
    if isinstance(layer, Act):
        return _OLD_ACTIVATIONS[layer.kind]
    if isinstance(layer, Pool):
        cls = f"nn.MaxPool{layer.dim}d" if layer.kind == "max" else f"nn.AvgPool{layer.dim}d"
        return f"{cls}({layer.kernel_size}, stride={layer.stride})"
    if isinstance(layer, Flatten):
        return "nn.Flatten()"
    raise TypeError(layer)


_OLD_SHORT = {Conv: "conv", BatchNorm: "bn", Linear: "fc", Pool: "pool", Flatten: "flatten"}


class _OldEmitter:
    def __init__(self):
        self.init_lines, self.forward_lines, self.zero_gamma = [], [], []
        self.count = 0
        self.tmp = 0

    def name(self, layer, prefix):
        short = layer.kind if isinstance(layer, Act) else _OLD_SHORT[type(layer)]
        name = f"{prefix}{short}{self.count}"
        self.count += 1
        return name

    def var(self, base):
        self.tmp += 1
        return f"{base}{self.tmp}"

    def emit(self, layers, x, prefix=""):
        for layer in layers:
            if isinstance(layer, Residual):
                y = self.emit(layer.body, x, prefix)
                out = self.var("x")
                self.forward_lines.append(f"{out} = {x} + {y}")
                x = out
            elif isinstance(layer, (Cat, MatMul)):
                a = self.emit(layer.left, x, prefix)
                b = self.emit(layer.right, x, prefix)
                out = self.var("x")
                joined = (f"torch.cat([{a}, {b}], dim=1)" if isinstance(layer, Cat)
                          else f"torch.matmul({a}, {b}.transpose(-1, -2))")
                self.forward_lines.append(f"{out} = {joined}")
                x = out
            else:
                name = self.name(layer, prefix)
                self.init_lines.append(f"self.{name} = {_old_ctor(layer)}")
                if isinstance(layer, BatchNorm) and layer.zero_gamma:
                    self.zero_gamma.append(f"model.{name}.weight[{list(layer.zero_gamma)!r}] = 0.0")
                out = self.var("x")
                self.forward_lines.append(f"{out} = self.{name}({x})")
                x = out
        return x


def old_to_python(spec, docstring=True):
    e = _OldEmitter()
    out = e.emit(spec.layers, "x")
    init = "\n".join(f"        {line}" for line in e.init_lines) or "        pass"
    forward = "\n".join(f"        {line}" for line in e.forward_lines)
    zero = "".join(f"        {line}\n" for line in e.zero_gamma)
    return (
        (f'"""Generated by qref.strategies.models from:\n{spec!r}\n"""\n' if docstring else "")
        + "import math\n\n"
        "import torch\n"
        "from torch import nn\n\n"
        f"INPUT_SHAPE = {tuple(spec.input_shape)!r}\n"
        f"SEED = {spec.seed!r}\n\n\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"{init}\n\n"
        "    def forward(self, x):\n"
        f"{forward}\n"
        f"        return {out}\n\n"
        f"{_OLD_INIT_SOURCE}\n\n"
        "def build_model(seed=SEED):\n"
        "    model = Model()\n"
        "    init_parameters(model, seed)\n"
        + ("    with torch.no_grad():\n" + zero if zero else "")
        + "    return model\n"
    )


def old_ops(spec):
    ops = set()
    for layer in old_walk(spec.layers):
        if isinstance(layer, Conv):
            ops.add("conv_transpose" if layer.transpose else f"conv{layer.dim}d")
        elif isinstance(layer, BatchNorm):
            ops.add("bn")
        elif isinstance(layer, Linear):
            ops.add("linear")
        elif isinstance(layer, Act):
            ops.add(layer.kind)
        elif isinstance(layer, Pool):
            ops.add("pool")
        elif isinstance(layer, Flatten):
            ops.add("flatten")
        elif isinstance(layer, Residual):
            ops.add("add")
        elif isinstance(layer, Cat):
            ops.add("cat")
        elif isinstance(layer, MatMul):
            ops.add("matmul")
    return frozenset(ops)


def old_adjacent(spec):
    return [pair for seq in old_sequences(spec.layers) for pair in zip(seq, seq[1:])]


def old_has_conv_bn_add(spec):
    return any(isinstance(r, Residual) and len(r.body) >= 2 and isinstance(r.body[-2], Conv)
               and isinstance(r.body[-1], BatchNorm) for r in old_walk(spec.layers))


# ---------------------------------------------------------------------------- same as the oracle

# Hand-written: every kind, every constructor argument, empty and nested branches.
EVERY_KIND = [
    ModelSpec((1, 3, 5, 5), ()),
    ModelSpec((2, 3, 7, 7), (Conv(3, 6, 3, 2, 1, 2, 3, False), BatchNorm(6, 1e-3, 0.01, (0, 5)), Act("relu6"),
                             Pool("avg", 2, 1), Flatten(), Linear(24, 4, False), Act("hardsigmoid")), seed=7),
    ModelSpec((2, 4, 3), (Conv(4, 4, 3, 2, 1, 1, 2, True, True, 1, 1), BatchNorm(4, dim=1), Act("tanh"),
                          Pool("max", 3, 1, 1))),
    ModelSpec((2, 5), (Linear(5, 3), BatchNorm(3, zero_gamma=(1,), dim=1), Act("sigmoid"), Act("hardtanh"))),
    ModelSpec((2, 2, 4, 4), (Residual(), Residual((Conv(2, 2, 3, padding=1), BatchNorm(2))), Act()), seed=3),
    ModelSpec((1, 2, 4, 4), (Cat(), Cat((Conv(4, 3),), ()), Cat((), (Conv(7, 1), Act("tanh"))),
                             Conv(8, 4))),
    ModelSpec((2, 3, 4, 4), (MatMul(), MatMul((Conv(3, 3, 3, padding=1), Act()), (Conv(3, 3),)),
                             Residual((Cat((Conv(3, 1),), (Conv(3, 2),)), MatMul((), (Conv(3, 3),)))))),
    ModelSpec((2, 4, 6), (MatMul((Conv(4, 4, dim=1),), ()), Flatten(), Linear(16, 2))),
]

# Every strategy the suite draws specs from.
STRATEGIES = {f"{flow}-{'qat' if qat else 'ptq'}-{tier}": model_specs(flow, tier, qat)
              for flow in ("pt2e", "fx") for qat in (False, True) for tier in ("ops", "patterns", "models")}
STRATEGIES |= {"conv_bn": conv_bn_specs(), "conv_bn-qat": conv_bn_specs(qat=True),
               "conv_bn-grouped-transpose": conv_bn_specs(transpose=True, groups=True),
               "fixed_qparams": fixed_qparams_specs(), "fixed_qparams-fx": fixed_qparams_specs("fx")}


def _assert_as_before(spec: ModelSpec) -> None:
    assert spec.to_python() == old_to_python(spec)
    assert spec.to_python(docstring=False) == old_to_python(spec, docstring=False)
    assert spec.output_shape == old_propagate(spec.layers, spec.input_shape)
    assert spec.ops == old_ops(spec)
    assert spec.all_layers() == list(old_walk(spec.layers))
    assert spec.adjacent() == old_adjacent(spec)
    assert spec.conv_bn_pairs() == [(a, b) for a, b in old_adjacent(spec)
                                    if isinstance(a, Conv) and isinstance(b, BatchNorm)]
    assert spec.has_conv_bn_add() == old_has_conv_bn_add(spec)


@pytest.mark.parametrize("spec", EVERY_KIND, ids=repr)
def test_hand_written_specs_as_before(spec):
    _assert_as_before(spec)
    model = spec.build().eval()
    with torch.no_grad():
        assert tuple(model(torch.ones(spec.input_shape)).shape) == spec.output_shape


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_drawn_specs_as_before(name):
    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRATEGIES[name])
    def check(spec):
        _assert_as_before(spec)

    check()


MALFORMED = [
    ((1, 3, 4, 4), (Conv(4, 4),)),  # wrong channels
    ((1, 3, 4), (Conv(3, 4),)),  # wrong rank
    ((1, 4, 4, 4), (Conv(4, 6, groups=4),)),  # groups do not divide the output channels
    ((1, 3, 2, 2), (Conv(3, 3, 5),)),  # kernel larger than the input
    ((2, 3, 4, 4), (BatchNorm(4),)),
    ((2, 3, 4, 4), (BatchNorm(3, dim=1),)),
    ((2, 3), (BatchNorm(3, zero_gamma=(3,), dim=1),)),
    ((2, 3, 4), (Linear(3, 2),)),
    ((2, 3), (Linear(4, 2),)),
    ((2, 3), (Act("gelu"),)),
    ((2, 3, 4), (Pool(),)),
    ((2, 3, 1, 4), (Pool(),)),
    ((1, 3, 4, 4), (Residual((Conv(3, 5),)),)),
    ((1, 3, 4, 4), (Cat((Conv(3, 3, 3),), ()),)),
    ((2, 3, 4), (MatMul((Conv(3, 3, 2, dim=1),), ()),)),  # the last sides differ
    ((1, 3, 4, 4), (MatMul((Conv(3, 5),), ()),)),
    ((2, 3), (MatMul(),)),
    ((2, 3, 4), (Residual((Cat((Conv(3, 3, 3),), ()),)),)),  # the nested rule's message
    ((2, 3), ("not a layer",)),
]


@pytest.mark.parametrize("shape,layers", MALFORMED, ids=repr)
def test_malformed_specs_fail_as_before(shape, layers):
    with pytest.raises(SpecError) as old:
        old_propagate(layers, shape)
    with pytest.raises(SpecError) as new:
        ModelSpec(shape, layers)
    assert str(new.value) == str(old.value)


# ---------------------------------------------------------------------------- a new kind is one class

@dataclass(frozen=True, repr=False)
class Softmax(Layer):
    """``nn.Softmax(dim)``: a kind the module does not have, added in one class."""

    dim: int = -1

    op = "softmax"

    def output_shape(self, shape: tuple) -> tuple:
        if not -len(shape) <= self.dim < len(shape):
            raise SpecError(f"{self!r} on shape {shape}")
        return shape

    def module_source(self) -> str:
        return f"nn.Softmax(dim={self.dim})"


@dataclass(frozen=True, repr=False)
class Product(Layer):
    """``left(x) * right(x)``: a new kind with branches and no module of its own."""

    left: tuple = ()
    right: tuple = ()

    op = "mul"

    @property
    def branches(self) -> tuple:
        return (self.left, self.right)

    def output_shape(self, shape: tuple) -> tuple:
        a, b = propagate(self.left, shape), propagate(self.right, shape)
        if a != b:
            raise SpecError(f"product branches disagree: {a} vs {b}")
        return a

    def forward(self, source, x: str) -> str:
        return f"{source.emit(self.left, x)} * {source.emit(self.right, x)}"


def test_a_new_kind_is_one_class():
    spec = ModelSpec((2, 3, 4, 4), (Conv(3, 5, 3, padding=1), Softmax(dim=1)), seed=5)
    assert spec.output_shape == (2, 5, 4, 4) and spec.ops == {"conv2d", "softmax"}
    assert repr(spec) == "ModelSpec(input_shape=(2, 3, 4, 4), layers=(Conv(in_channels=3, out_channels=5, " \
                         "kernel_size=3, padding=1), Softmax(dim=1)), seed=5)"
    assert eval(repr(spec), {"ModelSpec": ModelSpec, "Conv": Conv, "Softmax": Softmax}) == spec
    source = spec.to_python(docstring=False)
    assert "        self.softmax1 = nn.Softmax(dim=1)\n" in source
    assert "        x2 = self.softmax1(x1)\n        return x2\n" in source

    model = spec.build().eval()
    x = torch.randn(spec.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), torch.softmax(model.conv0(x), dim=1))
        exported = torch.export.export(model, (x,)).module()
        assert torch.allclose(exported(x), model(x))
    assert torch.equal(spec.build().conv0.weight, model.conv0.weight)  # seeded like any spec

    with pytest.raises(SpecError):
        ModelSpec((2, 3), (Softmax(dim=2),))
    assert spec.adjacent() == [(Conv(3, 5, 3, padding=1), Softmax(dim=1))]


def test_a_new_kind_with_branches_is_one_class():
    conv = Conv(3, 3, 3, padding=1)
    spec = ModelSpec((2, 3, 4, 4), (Product((conv, BatchNorm(3)), (Act("sigmoid"),)), Softmax(1)))
    assert spec.output_shape == (2, 3, 4, 4)
    assert spec.ops == {"mul", "conv2d", "bn", "sigmoid", "softmax"}
    assert spec.all_layers()[1:4] == [conv, BatchNorm(3), Act("sigmoid")]  # walks into the branches
    assert spec.conv_bn_pairs() == [(conv, BatchNorm(3))]
    assert "        x4 = x2 * x3\n" in spec.to_python()

    model = spec.build().eval()
    x = torch.randn(spec.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), torch.softmax(model.bn1(model.conv0(x)) * torch.sigmoid(x), dim=1))
    with pytest.raises(SpecError, match="product branches disagree"):
        ModelSpec((2, 3, 4, 4), (Product((Conv(3, 2),), ()),))
