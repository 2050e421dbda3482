"""Inductor: ``torch.compile`` of the converted model under ``torch.no_grad()`` with freezing,
which on x86 replaces each dq -> conv/linear -> q pattern by onednn's quantized kernels
(``onednn.qconv_pointwise`` / ``qlinear_pointwise``) and fuses the rest into C++ loops."""

from __future__ import annotations

import torch

from ..compare.tolerance import Tolerance
from ..engines import has_vnni
from . import KernelForm, int16_pairs

CONTRACT = Tolerance.depth_budget(
    1, cause=("inductor's quantized kernels requantize in integer arithmetic (onednn) and its fused "
              "loops reorder float math; each requantization may round the other way: 1 LSB per "
              "requantization between the inputs and an output (measured: properties/test_backends.py)"))


FLOAT_RELATIVE = 2.0**-16
FLOAT_CAUSE = ("float ops the quantizer left float run in inductor's fused C++ loops, which reassociate "
               "float32 sums: seen 6e-8 absolute; allowed 2**-16 of the output's largest magnitude, 256x "
               "finer than one 8-bit step of the same range")

SCOPE = ("X86InductorQuantizer setups only: torchao 0.18's x86 inductor passes lower its scheme (uint8 "
         "activations, int8 weights) and fail on others instead of leaving them unfused: int16 activations "
         "(an assertion), int8 activations into a conv1d (packed_weights_conv1d refuses int8 inputs), a "
         "uint8 conv1d with padding beside a cat (a wrong output width); pinned in tests/test_backends.py. "
         "Static ones only: torch 2.13's inductor computes choose_qparams wrong where its input comes from "
         "a reduction or pooling (mean, sum, softmax, max_pool2d: a scale of 0.0014 for eager's 0.0027), "
         "so the dynamic X86 setups are not lowered (docs/findings.md, pinned in tests/test_backends.py)")


KERNEL_FORMS = (KernelForm("int16 pair saturation", int16_pairs.CAUSE, lambda: not has_vnni(), int16_pairs.forms),)


def accepts(setup) -> bool:
    """Whether inductor's x86 passes are meant for ``setup``'s scheme (see SCOPE)."""
    return setup.flow == "pt2e" and setup.kind == "x86" and not setup.dynamic


def lower(converted: torch.fx.GraphModule, example_args: tuple):
    """The compiled model, compiled once on ``example_args`` (so a compile error is the lowering's)."""
    import torch._inductor.config as config

    torch._dynamo.reset()  # every example compiles afresh: no guard of an earlier model applies
    with config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(converted, dynamic=False)
        compiled(*example_args)

    def run(*args):
        with config.patch(freezing=True), torch.no_grad():
            return compiled(*args)

    return run
