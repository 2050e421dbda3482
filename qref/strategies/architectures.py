"""Real architectures as data: :class:`ArchitectureSpec` and the :func:`architecture_specs` strategy.

A spec names a ``transformers`` model family and the config keyword arguments drawn for it;
:meth:`ArchitectureSpec.build` constructs that model from its config with seeded random weights
(nothing is downloaded) and wraps it so that ``forward`` takes one tensor and returns one:

* vision families (``mobilenet_v2``, ``mobilenet_v1``, ``resnet``, ``convnext``, ``vit``): the
  ``*ForImageClassification`` model, ``pixel_values`` (float ``(1, 3, H, W)``) in, ``logits`` out;
* text families (``bert``, ``distilbert``): the base model without pooler, ``input_ids`` (int64
  ``(1, seq_len)``, drawn from the vocabulary) in, ``last_hidden_state`` out; the attention mask
  is the model's default (every token attended).

``repr(spec)`` rebuilds the spec (``from qref.strategies.architectures import ArchitectureSpec``);
``spec.to_python()`` is the reproducer's model source (``build_model()``, which calls
``spec.build()``: the model *is* transformers' code).  Weights come from ``torch.manual_seed(seed)``
around construction (transformers' own initialisation, the global RNG restored afterwards), then
every BatchNorm's running statistics and affine parameters are drawn from
``torch.Generator().manual_seed(seed)`` (a fresh model's are 0/1: folding them would test nothing).

Requires the ``models`` extra (``pip install qref[models]``); this module imports ``transformers``
only when a model is built, so the strategies draw (and the suite collects) without it.
:func:`models_available` says whether it is importable.

Sizes are small (one example converts in seconds): 1-2 stages or layers, widths 8-32, images
16-32 pixels, sequences of 4-16 tokens, vocabularies of 16-64.  MobileNet V1/V2 have a fixed
block structure in transformers (13 / 17 blocks): only their width (``depth_multiplier``,
``min_depth``) and image size are drawn.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from hypothesis import strategies as st

__all__ = [
    "ArchitectureSpec", "architecture_specs", "FAMILIES", "VISION_FAMILIES", "TEXT_FAMILIES",
    "FX_TRACEABLE", "MODELS_EXTRA_MISSING", "models_available", "architecture_cases", "fx_trace_error",
]

VISION_FAMILIES = ("resnet", "convnext", "vit", "mobilenet_v1", "mobilenet_v2")
TEXT_FAMILIES = ("bert", "distilbert")
# cheapest first (what a failure shrinks to): MobileNets have 13/17 fixed blocks, seconds per example
FAMILIES = ("resnet", "convnext", "vit", "bert", "distilbert", "mobilenet_v1", "mobilenet_v2")

# Families whose wrapped model torch.fx.symbolic_trace (and so prepare_fx) traces, with transformers
# 5.23: MobileNet V1/V2 with tf_padding=False (tf_padding computes its padding with int() of a
# shape: "int() argument must be ... not 'Proxy'").  The others branch on input shapes or dtypes in
# Python ("symbolically traced variables cannot be used as inputs to control flow": resnet,
# convnext, vit check `num_channels != self.num_channels` / `pixel_values.dtype`; bert and
# distilbert slice position ids with a traced length, "slice indices must be integers").
FX_TRACEABLE = ("mobilenet_v2", "mobilenet_v1")

MODELS_EXTRA_MISSING = "not run: install qref[models]"

# family -> (transformers model class, config class, extra constructor keywords, model input)
_CLASSES = {
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", {}, "pixel_values"),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config", {}, "pixel_values"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", {}, "pixel_values"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", {}, "pixel_values"),
    "vit": ("ViTForImageClassification", "ViTConfig", {}, "pixel_values"),
    "bert": ("BertModel", "BertConfig", {"add_pooling_layer": False}, "input_ids"),
    "distilbert": ("DistilBertModel", "DistilBertConfig", {}, "input_ids"),
}

# Coarse op families (the names of qref.strategies.models / qref.coverage) each family contains.
_OPS = {
    "mobilenet_v2": frozenset({"conv2d", "bn", "relu6", "add", "pool", "linear"}),
    "mobilenet_v1": frozenset({"conv2d", "bn", "relu6", "pool", "linear"}),
    "resnet": frozenset({"conv2d", "bn", "relu", "add", "pool", "linear"}),
    "convnext": frozenset({"conv2d", "linear", "add", "pool"}),
    "vit": frozenset({"conv2d", "linear", "add", "matmul"}),
    "bert": frozenset({"linear", "add", "matmul"}),
    "distilbert": frozenset({"linear", "add", "matmul"}),
}


def models_available() -> bool:
    """Whether ``transformers`` (the ``models`` extra) can be imported."""
    import sys

    if "transformers" in sys.modules:
        return sys.modules["transformers"] is not None
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        return False


def _plain(value):
    """Config values as transformers wants them (lists, not the spec's hashable tuples)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    config: tuple  # ((keyword, value), ...) sorted by keyword: the config's drawn arguments
    input_shape: tuple  # (1, 3, H, W) pixel values, or (1, seq_len) token ids
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in _CLASSES:
            raise ValueError(f"unknown architecture family {self.family!r}: choose one of {FAMILIES}")
        config = self.config.items() if isinstance(self.config, dict) else self.config
        object.__setattr__(self, "config", tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                        for k, v in config)))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))

    def __repr__(self) -> str:
        config = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.config) + "}"
        return (f"ArchitectureSpec({self.family!r}, {config}, input_shape={self.input_shape!r}, "
                f"seed={self.seed!r})")

    # -------------------------------------------------------------------- what it is
    @property
    def text(self) -> bool:
        return self.family in TEXT_FAMILIES

    @property
    def input_name(self) -> str:
        return _CLASSES[self.family][3]

    @property
    def vocab_size(self) -> int | None:
        return dict(self.config).get("vocab_size") if self.text else None

    @property
    def ops(self) -> frozenset:
        """Coarse op families in the network (qref.coverage's names)."""
        ops = _OPS[self.family]
        if dict(self.config).get("attn_implementation") == "sdpa":
            ops = ops - {"matmul"}  # one scaled_dot_product_attention op instead
        return ops

    # QuantSetup.supports() asks a ModelSpec about these layer patterns; none applies here
    # (no transposed convs), except FX's conv-bn-add fusion in ResNet's residual blocks.
    def all_layers(self) -> list:
        return []

    def adjacent(self) -> list:
        return []

    def conv_bn_pairs(self) -> list:
        return []

    def has_conv_bn_add(self) -> bool:
        return self.family == "resnet"

    # -------------------------------------------------------------------- the model
    def build(self):
        """The wrapped float model (eval mode), deterministic for ``seed``."""
        return _build(self)

    def example_inputs(self, seed: int = 0) -> tuple:
        """One argument tuple: pixel values in [-1, 1], or token ids drawn from the vocabulary."""
        import torch

        g = torch.Generator().manual_seed(seed)
        if self.text:
            return (torch.randint(self.vocab_size, self.input_shape, generator=g, dtype=torch.int64),)
        return (torch.rand(self.input_shape, generator=g) * 2 - 1,)

    def to_python(self, docstring: bool = True) -> str:
        """Model source for a reproducer: ``build_model()`` builds this spec (transformers' code)."""
        return (
            (f'"""A qref architecture spec:\n{self!r}\n"""\n' if docstring else "")
            + "import torch\n\n"
            "from qref.strategies.architectures import ArchitectureSpec  # needs qref[models]\n\n"
            f"SPEC = {self!r}\n"
            f"INPUT_SHAPE = {self.input_shape!r}\n\n\n"
            "def build_model():\n"
            "    # transformers' model from its config, seeded random weights (no download)\n"
            "    return SPEC.build()\n"
        )


@functools.lru_cache(maxsize=1)
def _wrapper_class():
    import torch

    class ArchitectureModel(torch.nn.Module):
        """A transformers model with one tensor in (``input_name``) and one tensor out."""

        def __init__(self, model, input_name: str, output: str):
            super().__init__()
            self.model = model
            self.input_name = input_name
            self.output = output

        def forward(self, x):
            if self.input_name == "input_ids":
                out = self.model(input_ids=x)
            else:
                out = self.model(pixel_values=x)
            return out.logits if self.output == "logits" else out.last_hidden_state

    return ArchitectureModel


def _build(spec: ArchitectureSpec):
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    from qref._quiet import silence_noise

    silence_noise()
    transformers = _transformers()
    model_cls, config_cls, extra, input_name = _CLASSES[spec.family]
    kwargs = {k: _plain(v) for k, v in spec.config}
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = getattr(transformers, model_cls)(config, **extra)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    module.bias.copy_(torch.randn(n, generator=g) * 0.1)
    output = "last_hidden_state" if spec.text else "logits"
    return _wrapper_class()(model, input_name, output).eval()


def _transformers():
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
    transformers.logging.set_verbosity_error()  # e.g. gpt-style token-id warnings of tiny vocabularies
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


# ---------------------------------------------------------------------------- strategies

_WIDTHS = [8, 16, 24, 32]


@st.composite
def _heads_and_width(draw, label: str) -> tuple[int, int]:
    heads = draw(st.sampled_from([1, 2]), label=f"{label} heads")
    width = draw(st.sampled_from([w for w in _WIDTHS if w % heads == 0]), label=f"{label} width")
    return heads, width


@st.composite
def _config(draw, family: str) -> tuple[dict, tuple]:
    """(config keywords, input shape) of ``family``, small."""
    image = draw(st.sampled_from([16, 24, 32]), label="image size")
    labels = draw(st.integers(2, 8), label="num_labels")
    if family in ("mobilenet_v2", "mobilenet_v1"):
        config = dict(
            num_channels=3, image_size=image, num_labels=labels,
            depth_multiplier=draw(st.sampled_from([0.25, 0.35, 0.5]), label="depth_multiplier"),
            min_depth=draw(st.sampled_from([8, 16]), label="min_depth"),
            tf_padding=draw(st.booleans(), label="tf_padding"),
        )
        if family == "mobilenet_v2":
            config["expand_ratio"] = draw(st.sampled_from([6, 2]), label="expand_ratio")
        return config, (1, 3, image, image)
    if family in ("resnet", "convnext"):
        stages = draw(st.integers(1, 2), label="stages")
        widths = tuple(draw(st.sampled_from(_WIDTHS), label=f"stage {i} width") for i in range(stages))
        depths = tuple(draw(st.integers(1, 2), label=f"stage {i} depth") for i in range(stages))
        config = dict(num_channels=3, num_labels=labels, hidden_sizes=widths, depths=depths)
        if family == "resnet":
            config.update(embedding_size=draw(st.sampled_from(_WIDTHS), label="embedding_size"),
                          layer_type=draw(st.sampled_from(["basic", "bottleneck"]), label="layer_type"),
                          downsample_in_first_stage=draw(st.booleans(), label="downsample_in_first_stage"))
        else:
            config.update(num_stages=stages, image_size=image,
                          patch_size=draw(st.sampled_from([4, 2]), label="patch_size"))
        return config, (1, 3, image, image)
    attn = draw(st.sampled_from(["eager", "sdpa"]), label="attention")
    layers = draw(st.integers(1, 2), label="layers")
    heads, width = draw(_heads_and_width(family))
    inner = draw(st.sampled_from([16, 32, 64]), label="intermediate size")
    if family == "vit":
        patch = draw(st.sampled_from([p for p in (8, 4) if image % p == 0]), label="patch_size")
        config = dict(image_size=image, patch_size=patch, num_channels=3, num_labels=labels,
                      hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inner, qkv_bias=draw(st.booleans(), label="qkv_bias"),
                      attn_implementation=attn)
        return config, (1, 3, image, image)
    seq = draw(st.integers(4, 16), label="sequence length")
    vocab = draw(st.sampled_from([16, 32, 64]), label="vocab_size")
    if family == "bert":
        config = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inner, max_position_embeddings=16, type_vocab_size=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                      attn_implementation=attn)
    else:
        config = dict(vocab_size=vocab, dim=width, n_layers=layers, n_heads=heads, hidden_dim=inner,
                      max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                      sinusoidal_pos_embds=draw(st.booleans(), label="sinusoidal_pos_embds"),
                      attn_implementation=attn)
    return config, (1, seq)


@st.composite
def architecture_specs(draw, families=None) -> ArchitectureSpec:
    """Specs of ``families`` (default: all of :data:`FAMILIES`, in that order), sizes small; the
    first family and the smallest size come first, so a failure shrinks to a one-stage ResNet at
    16 pixels (or to the first of ``families``)."""
    families = tuple(families or FAMILIES)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown architecture families {sorted(unknown)}: choose from {FAMILIES}")
    family = draw(st.sampled_from(families), label="architecture")
    config, shape = draw(_config(family), label=f"{family} config")
    seed = draw(st.integers(0, 2**16), label="weight seed")
    return ArchitectureSpec(family, config, shape, seed)


# ---------------------------------------------------------------------------- cases

@functools.lru_cache(maxsize=64)
def _fx_trace_error(spec: ArchitectureSpec) -> str | None:
    import torch

    try:
        torch.fx.symbolic_trace(spec.build())
    except Exception as error:  # noqa: BLE001 - what torch.fx makes of transformers' code
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return None


def fx_trace_error(spec: ArchitectureSpec) -> str | None:
    """Why ``torch.fx.symbolic_trace`` (prepare_fx's tracer) cannot trace the model; None if it can."""
    return _fx_trace_error(spec)


@st.composite
def _token_batch(draw, shape: tuple, vocab: int, label: str):
    """Token ids: a drawn handful of ids spread over the sequence by a drawn seed (shrinks to
    one repeated id, 0: the pad token)."""
    import torch

    base = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8), label=f"{label} tokens")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label=f"{label} index seed"))
    idx = torch.randint(len(base), shape, generator=g)
    return torch.tensor(base, dtype=torch.int64)[idx].contiguous()


@st.composite
def _token_evaluation(draw, shape: tuple, vocab: int) -> tuple:
    import torch

    fresh = draw(_token_batch(shape, vocab, "evaluation"), label="evaluation")
    token = draw(st.integers(0, vocab - 1), label="repeated token")
    labelled = [
        ("fresh token ids", fresh),
        ("pad tokens (all 0)", torch.zeros(shape, dtype=torch.int64)),
        (f"token {token} repeated", torch.full(shape, token, dtype=torch.int64)),
        ("every id in turn", (torch.arange(shape[-1], dtype=torch.int64) % vocab).expand(shape).contiguous()),
    ]
    return tuple(l for l, _ in labelled), tuple((t,) for _, t in labelled)


@st.composite
def architecture_cases(draw, flow: str, qat: bool | None = None, families=None, engine: str | None = None):
    """A :class:`qref.strategies.cases.Case` whose spec is an :class:`ArchitectureSpec`: a setup of
    ``flow`` that quantizes it, calibration batches (pixel values as ``cases`` draws them, or token
    ids from the vocabulary) and evaluation inputs.

    pt2e cases are prepared while drawn (cached); one that torch.export/torchao cannot prepare is
    rejected.  FX cases of a model torch.fx does not trace are drawn unprepared: the property says
    so (:func:`fx_trace_error`) and draws again."""
    import dataclasses

    from hypothesis import event, reject

    from qref.strategies.cases import Case, _evaluation, _input_qparams, calibration_batches
    from qref.strategies.setups import quant_setups

    if qat is None:
        qat = draw(st.booleans(), label="qat")
    spec = draw(architecture_specs(families), label="architecture spec")
    if qat and not spec.text:
        # train-mode BatchNorm needs more than one value per channel (1x1 maps late in MobileNet)
        spec = dataclasses.replace(spec, input_shape=(2, *spec.input_shape[1:]))
    try:
        setup = draw(quant_setups(flow, qat=qat, engine=engine, model=spec), label="setup")
    except ValueError as error:
        event(f"rejected: {error}".split(" ArchitectureSpec")[0])
        reject()
    if spec.text:
        n = draw(st.integers(2, 4), label="calibration batches")
        batches = tuple((draw(_token_batch(spec.input_shape, spec.vocab_size, f"calibration {i}"),
                              label=f"calibration {i}"),) for i in range(n))
    else:
        batches = tuple((t,) for t in draw(calibration_batches(spec.input_shape), label="calibration"))
    unevaluated = Case(spec, setup, batches, (), ())
    prepared = None
    if flow == "pt2e" or fx_trace_error(spec) is None:
        try:
            prepared = unevaluated.prepared()  # cached: the property's own calls reuse it
        except Exception as error:  # noqa: BLE001 - preparation is not under test
            event(f"rejected: preparation raised {type(error).__name__}")
            reject()
    if spec.text:
        labels, inputs = draw(_token_evaluation(spec.input_shape, spec.vocab_size), label="evaluation inputs")
    else:
        calibration = [args[0] for args in batches]
        qparams = None if prepared is None else _input_qparams(prepared)
        labels, inputs = draw(_evaluation(spec.input_shape, calibration, qparams), label="evaluation inputs")
    return Case(spec, setup, batches, inputs, labels)
