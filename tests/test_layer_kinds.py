"""Each layer kind of qref.strategies.models carries its own rules: a new kind is one class,
defined here without touching models.py, that validates its shape, builds, runs, exports, emits
its source and reports its op name.

(The frozen copy of the type-switching code these rules replaced, which proved the refactor
changed nothing, was retired once the kinds grew: transformer pieces, affine-free BatchNorm and
Linear on 3-D inputs changed the generated source by design.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from qref.strategies.models import Act, BatchNorm, Conv, Layer, ModelSpec, SpecError, propagate

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
