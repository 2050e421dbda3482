"""Quantization setups as data: :class:`QuantSetup` and the :func:`quant_setups` strategy.

A setup is everything a flow needs besides the model:

* pt2e: a ``Quantizer`` -- ``"x86"`` (torchao's ``X86InductorQuantizer`` via
  :func:`qref.quantizers.x86_ptq` / :func:`~qref.quantizers.x86_qat`; uint8 affine
  activations, per-channel or per-tensor int8 weights, annotates conv2d and linear only) or
  ``"qref"`` (:class:`qref.quantizers.QrefQuantizer`; uint8/int8/int16, symmetric or affine
  activations with a MinMax / Histogram / MovingAverage observer on a full, reduced or narrow
  range, int8 weights on [-127, 127], [-128, 127] or [-64, 63], per-tensor or per-channel on the
  output- or input-channel axis, derived int32 biases, dynamically quantized Linear inputs, int16
  layers among int8 ones; annotates every conv kind, linear, add, cat, pools and flatten).
* fx: a ``QConfigMapping`` plus the engine's ``BackendConfig`` -- ``"default"`` (torch's
  ``get_default_qconfig_mapping(engine)`` / ``get_default_qat_qconfig_mapping(engine)``) or
  ``"custom"`` (that mapping with its global qconfig replaced by one built from the drawn
  observer, weight granularity, symmetry and ``reduce_range``); drawn only when asked
  (:func:`fx_dynamic_setups`): ``"dynamic"`` (nn.Linear under ``default_dynamic_qconfig``, or
  ``per_channel_dynamic_qconfig``: int8 weights, activations quantized per call) and
  ``"float16"`` (nn.Linear under ``float16_dynamic_qconfig``: float16 weights, on the engines
  whose backend config lowers it).  Convert-time ``None`` entries of a QConfigMapping are
  drawn apart (:func:`fx_none_entries`) and resolved on the prepared model (:func:`fx_skip_mapping`).

``repr(setup)`` rebuilds the setup; ``setup.to_python()`` is the source that builds the
quantizer (``quantizer = ...``) or mapping (``qconfig_mapping = ...``, ``backend_config = ...``),
and :meth:`QuantSetup.quantizer` / :meth:`QuantSetup.qconfig_mapping` execute exactly that
source.  Fields the chosen quantizer/mapping fixes (e.g. X86's uint8 HistogramObserver
activations) must hold those values, so ``repr`` never claims what the setup does not do.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from hypothesis import strategies as st

__all__ = ["QuantSetup", "quant_setups", "FX_ENGINES", "fx_dynamic_setups", "fx_none_entries", "fx_skip_mapping", "fx_called"]

FX_ENGINES = ("fbgemm", "qnnpack", "x86", "onednn")
OBSERVERS = ("minmax", "histogram", "moving_average")
QAT_OBSERVERS = ("minmax", "moving_average")  # fake-quants have no histogram observer
PT2E_QUANTIZERS = ("qref", "x86", "arm")  # QrefQuantizer, torchao's X86 and Arm Inductor quantizers
ACT_DTYPES = ("uint8", "int8", "int16", "float16")  # int16: pt2e qref quantizer only; float16: fx dynamic
# what run coverage (qref.coverage.known) lists per flow: float16 is drawn by data-drawn properties only,
# whose cases coverage does not see, so listing it would report it "never compared" on every run
FLOW_ACT_DTYPES = {"pt2e": ("uint8", "int8", "int16"), "fx": ("uint8",)}
FX_KINDS = ("default", "custom")  # what every fx property draws
FX_DYNAMIC_KINDS = ("dynamic", "float16")  # drawn by the properties about them (fx_dynamic_setups)
# A dynamic kind's activation "observer" is torch's PlaceholderObserver: it records nothing; the
# int8 kernels quantize each call's input with its own min/max, float16 casts it.
PLACEHOLDER = "placeholder"
# float16_dynamic_qconfig is lowered on these engines only: onednn's backend config has no float16
# dtype config (convert_fx leaves the Linear float), and qnnpack's has one but its kernel cannot
# pack float16 weights (convert_fx raises "linear_prepack_fp16 is currently not supported by
# QNNPACK"; tests/test_fx_dynamic.py pins both)
FLOAT16_ENGINES = ("fbgemm", "x86")
# pt2e "qref" setups: int8 weight ranges (None: QrefQuantizer's [-127, 127]) and per-channel axes
WEIGHT_QRANGES = (None, (-128, 127), (-64, 63))
WEIGHT_AXES = ("output", "input")
# the fields only the pt2e "qref" setups draw, and their defaults
_QREF_ONLY = dict(narrow_range=False, weight_qrange=None, weight_axis="output", dynamic=False, int16_layers=())
# engines whose kernels require reduce_range=True activations (7-bit, to avoid overflow)
_REDUCE_RANGE_ENGINES = ("fbgemm", "x86")
# torch has no get_x86_backend_config: its "x86" FX flow uses the native backend config
_BACKEND_CONFIGS = {"fbgemm": "get_fbgemm_backend_config", "qnnpack": "get_qnnpack_backend_config",
                    "onednn": "get_onednn_backend_config", "x86": "get_native_backend_config"}


@dataclass(frozen=True)
class QuantSetup:
    flow: str  # "pt2e" | "fx"
    qat: bool = False
    # pt2e: "x86" | "qref" (which Quantizer); fx: "default" | "custom" (which QConfigMapping).
    # Not called ``quantizer``: that is the method returning the Quantizer object.
    kind: str = "qref"
    per_channel: bool = True  # weights
    act_dtype: str = "uint8"  # "uint8" | "int8" | "int16" | "float16" (fx: uint8, float16 for its float16 kind)
    symmetric: bool = False  # activations
    observer: str = "histogram"  # activations: "minmax" | "histogram" | "moving_average"
    engine: str | None = None  # fx only
    reduce_range: bool = False  # activations use half the integer range
    # -- pt2e "qref" setups only (every other setup keeps these defaults) --
    # activations drop the dtype's most negative value (signed: [-127, 127], [-32767, 32767]; with
    # reduce_range [-63, 63]) or, unsigned, its largest ([0, 254]; with reduce_range [0, 126])
    narrow_range: bool = False
    weight_qrange: tuple | None = None  # int8 weights: None is [-127, 127]; (-128, 127), (-64, 63)
    weight_axis: str = "output"  # per-channel weights: "output" channels, or "input" channels
    dynamic: bool = False  # Linear (x86: and conv) inputs quantized at run time (choose_qparams), outputs float
    int16_layers: tuple = ()  # conv/linear ops (graph order) with int16 activations, others act_dtype

    def __post_init__(self) -> None:
        fixed = self.fixed_fields()
        wrong = {k: v for k, v in fixed.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"{self.flow}/{self.kind} setup fixes {wrong}")
        if self.flow == "pt2e" and self.kind not in PT2E_QUANTIZERS:
            raise ValueError(f"pt2e quantizer must be one of {PT2E_QUANTIZERS}, not {self.kind!r}")
        if self.flow == "fx" and self.kind not in FX_KINDS + FX_DYNAMIC_KINDS:
            raise ValueError(f"fx quantizer must be one of {FX_KINDS + FX_DYNAMIC_KINDS}, not {self.kind!r}")
        dynamic = self.flow == "fx" and self.kind in FX_DYNAMIC_KINDS
        if self.observer not in OBSERVERS + ((PLACEHOLDER,) if dynamic else ()) or self.act_dtype not in ACT_DTYPES:
            raise ValueError(f"bad observer/act_dtype: {self.observer!r}/{self.act_dtype!r}")
        if self.qat and self.observer == "histogram":
            raise ValueError("QAT fake-quants use minmax or moving_average observers")
        self._check_qref_fields()

    def _check_qref_fields(self) -> None:
        """The fields only the pt2e "qref" setups draw: their defaults elsewhere, legal values there."""
        drawn = {f: getattr(self, f) for f, default in _QREF_ONLY.items() if getattr(self, f) != default}
        if (self.flow, self.kind) == ("pt2e", "x86"):
            drawn.pop("dynamic", None)  # X86InductorQuantizer's is_dynamic config
        if drawn and (self.flow, self.kind) != ("pt2e", "qref"):
            raise ValueError(f"{self.flow}/{self.kind} setup fixes {dict((f, _QREF_ONLY[f]) for f in drawn)}")
        if self.weight_qrange not in WEIGHT_QRANGES:
            raise ValueError(f"weight_qrange must be one of {WEIGHT_QRANGES}, not {self.weight_qrange!r}")
        if self.weight_axis not in WEIGHT_AXES:
            raise ValueError(f"weight_axis must be one of {WEIGHT_AXES}, not {self.weight_axis!r}")
        if self.weight_axis != "output" and not self.per_channel:
            raise ValueError("a weight axis other than the output channels needs per-channel weights")
        if (self.dynamic or self.int16_layers) and self.act_dtype not in ("int8", "uint8"):
            raise ValueError("dynamic and int16 layers go with uint8/int8 activations")
        if tuple(sorted(set(self.int16_layers))) != tuple(self.int16_layers) or any(
                not isinstance(i, int) or i < 0 for i in self.int16_layers):
            raise ValueError(f"int16_layers: increasing layer indices, not {self.int16_layers!r}")

    def __repr__(self) -> str:
        """Rebuilds the setup; the fields only pt2e "qref" setups draw appear when they are not
        their defaults."""
        import dataclasses

        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in _QREF_ONLY or getattr(self, f.name) != _QREF_ONLY[f.name]]
        return f"QuantSetup({', '.join(shown)})"

    def fixed_fields(self) -> dict:
        """Fields the flow/quantizer/engine decide (they must have these values)."""
        if self.flow == "pt2e":
            if self.kind == "x86":
                x86_only = {k: v for k, v in _QREF_ONLY.items() if k != "dynamic"}  # its is_dynamic config
                return dict(engine=None, act_dtype="uint8", symmetric=False, reduce_range=False,
                            observer="moving_average" if self.qat else "histogram", **x86_only)
            if self.kind == "arm":  # int8 affine activations, per-tensor symmetric weights
                return dict(engine=None, act_dtype="int8", symmetric=False, reduce_range=False, per_channel=False,
                            observer="moving_average" if self.qat else "histogram", **_QREF_ONLY)
            return dict(engine=None)
        if self.flow != "fx":
            raise ValueError(f"flow must be 'pt2e' or 'fx', not {self.flow!r}")
        if self.engine not in FX_ENGINES:
            raise ValueError(f"fx setups need an engine in {FX_ENGINES}, not {self.engine!r}")
        if self.kind in FX_DYNAMIC_KINDS:
            return _fixed_fx_dynamic(self.kind, self.engine)
        fixed = dict(act_dtype="uint8")
        if self.kind == "default":
            fixed.update(per_channel=self.engine != "qnnpack", symmetric=False,
                         reduce_range=self.engine in _REDUCE_RANGE_ENGINES,
                         observer="moving_average" if self.qat else "histogram")
        else:
            if self.engine == "qnnpack":
                fixed["per_channel"] = False
            if self.engine in _REDUCE_RANGE_ENGINES:
                fixed["reduce_range"] = True
        return fixed

    # -------------------------------------------------------------------- what it quantizes
    def supports(self, spec) -> bool:
        """Whether this setup prepares ``spec`` (a ModelSpec) *and* quantizes some op of it."""
        ops = spec.ops
        if any(conv.transpose and conv.groups > 1 for conv, _ in spec.conv_bn_pairs()):
            return False  # torch/torchao cannot fold grouped ConvTranspose + BN (prepare raises)
        if self.flow == "pt2e":
            if self.kind in ("x86", "arm"):  # the Inductor quantizers annotate conv2d and linear (not matmul)
                return bool(ops & {"conv2d", "linear"})
            return bool(ops & {"conv1d", "conv2d", "conv3d", "conv_transpose", "linear"})
        if self.kind in FX_DYNAMIC_KINDS:
            return _fx_dynamic_supports(self, spec)
        if self.engine == "onednn" and "conv_transpose" in ops:
            return False  # onednn: prepare_fx rejects per-channel ConvTranspose
        if self.engine == "onednn" and any(type(a).__name__ == "Linear" and getattr(b, "kind", None) == "tanh"
                                           for a, b in spec.adjacent()):
            return False  # onednn fuses Linear + Tanh, whose two qconfigs (fixed qparams) prepare_fx refuses
        for conv, _bn in spec.conv_bn_pairs():
            if conv.transpose and self.qat:
                return False  # torch's FX QAT cannot fuse ConvTranspose + BatchNorm
        if self.engine == "onednn" and self.qat and spec.has_conv_bn_add():
            return False  # onednn's QAT has no fused conv-bn-add module
        return True

    # -------------------------------------------------------------------- source and objects
    def to_python(self) -> str:
        """Source defining ``quantizer`` (pt2e) or ``qconfig_mapping`` and ``backend_config`` (fx)."""
        return self._pt2e_source() if self.flow == "pt2e" else self._fx_source()

    def quantizer(self):
        """A fresh pt2e ``Quantizer``."""
        if self.flow != "pt2e":
            raise ValueError("quantizer() is for the pt2e flow; use qconfig_mapping()")
        return _run(self.to_python())["quantizer"]

    def qconfig_mapping(self):
        """A fresh FX ``QConfigMapping`` (prepare-time)."""
        if self.flow != "fx":
            raise ValueError("qconfig_mapping() is for the fx flow; use quantizer()")
        return _run(self.to_python())["qconfig_mapping"]

    def backend_config(self):
        """The engine's FX ``BackendConfig``."""
        if self.flow != "fx":
            raise ValueError("backend_config() is for the fx flow")
        return _run(self.to_python())["backend_config"]

    def describe(self) -> str:
        if self.flow == "pt2e" and self.kind == "arm":
            return f"pt2e arm {'QAT' if self.qat else 'PTQ'} per-tensor"
        if self.flow == "pt2e" and self.kind == "x86":
            return (f"pt2e x86 {'QAT' if self.qat else 'PTQ'} {'per-channel' if self.per_channel else 'per-tensor'}"
                    + (" dynamic" if self.dynamic else ""))
        parts = [self.flow, self.kind, self.engine or "", "QAT" if self.qat else "PTQ",
                 "per-channel" if self.per_channel else "per-tensor",
                 "input-channel axis" if self.weight_axis == "input" else "",
                 f"weights [{self.weight_qrange[0]}, {self.weight_qrange[1]}]" if self.weight_qrange else "",
                 self.act_dtype, f"int16 layers {list(self.int16_layers)}" if self.int16_layers else "",
                 "dynamic linear" if self.dynamic else "",
                 "sym" if self.symmetric else "affine", self.observer,
                 "reduce_range" if self.reduce_range else "", "narrow" if self.narrow_range else ""]
        return " ".join(p for p in parts if p)

    def _act_range(self, dtype: str | None = None) -> tuple[int, int]:
        lo, hi = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-(2**15), 2**15 - 1)}[dtype or self.act_dtype]
        if self.reduce_range:  # one bit less
            lo, hi = lo // 2, hi // 2
        if self.narrow_range:  # the dtype's most negative value unused (unsigned: its largest)
            lo, hi = (lo + 1, hi) if lo < 0 else (lo, hi - 1)
        return lo, hi

    def _pt2e_source(self) -> str:
        if self.kind == "arm":
            return ("from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (\n"
                    "    ArmInductorQuantizer, get_default_arm_inductor_quantization_config)\n\n"
                    "quantizer = ArmInductorQuantizer().set_global(\n"
                    f"    get_default_arm_inductor_quantization_config(is_qat={self.qat}))\n")
        if self.kind == "x86":
            fn = "x86_qat" if self.qat else "x86_ptq"
            dynamic = ", dynamic=True" if self.dynamic else ""
            return (f"from qref.quantizers import {fn}\n\n"
                    f"quantizer = {fn}(per_channel={self.per_channel}{dynamic})\n")
        act_obs = {"minmax": "MinMaxObserver", "histogram": "HistogramObserver",
                   "moving_average": "MovingAverageMinMaxObserver"}[self.observer]
        w_obs = ("MovingAverage" if self.qat else "") + ("PerChannelMinMaxObserver" if self.per_channel else "MinMaxObserver")
        if self.qat:
            act, weight = (f"FakeQuantize.with_args(observer={act_obs})",
                           f"FakeQuantize.with_args(observer={w_obs})")
            names = {"FakeQuantize", act_obs, w_obs}
        else:
            act, weight, names = act_obs, w_obs, {act_obs, w_obs}
        lo, hi = self._act_range()
        scheme = "per_tensor_symmetric" if self.symmetric else "per_tensor_affine"
        w_lo, w_hi = self.weight_qrange or (-127, 127)
        extra = ""
        if self.weight_axis != "output":
            extra += f"    weight_axis={self.weight_axis!r},  # one scale per input channel; their biases stay float\n"
        if self.dynamic:
            if self.qat:  # as XNNPACKQuantizer's dynamic QAT config
                dynamic = "FakeQuantize.with_args(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1))"
                names |= {"FakeQuantize", "MovingAverageMinMaxObserver"}
            else:
                dynamic = "PlaceholderObserver"
                names.add("PlaceholderObserver")
            extra += ("    dynamic_linear=True,  # linear inputs: choose_qparams at run time; outputs float\n"
                      f"    dynamic_ctr={dynamic},\n")
        if self.int16_layers:
            wide_lo, wide_hi = self._act_range("int16")
            extra += (f"    wide_layers={tuple(self.int16_layers)!r},  # these conv/linear ops: int16 activations\n"
                      f"    wide_dtype=torch.int16,\n    wide_qmin={wide_lo},\n    wide_qmax={wide_hi},\n")
        return (
            "import torch\n"
            f"from torchao.quantization.pt2e import {', '.join(sorted(names))}\n\n"
            "from qref.quantizers import QrefQuantizer, QrefQuantizerConfig\n\n"
            "quantizer = QrefQuantizer(QrefQuantizerConfig(\n"
            f"    act_dtype=torch.{self.act_dtype},\n"
            f"    act_qmin={lo},\n"
            f"    act_qmax={hi},\n"
            f"    act_qscheme=torch.{scheme},\n"
            f"    act_ctr={act},\n"
            f"    weight_qmin={w_lo},\n"
            f"    weight_qmax={w_hi},\n"
            f"    weight_ctr={weight},  # {'per-channel' if self.per_channel else 'per-tensor'} symmetric int8\n"
            + extra +
            f"    is_qat={self.qat},\n"
            "))\n"
        )

    def _fx_source(self) -> str:
        e = self.engine
        if self.kind in FX_DYNAMIC_KINDS:
            return _fx_dynamic_source(self)
        default = "get_default_qat_qconfig_mapping" if self.qat else "get_default_qconfig_mapping"
        head = ("import torch\n"
                "import torch.ao.quantization.quantize_fx  # noqa: F401  (get_*_backend_config needs it loaded)\n"
                f"from torch.ao.quantization import {default}\n")
        getter = _BACKEND_CONFIGS[e]
        head += f"from torch.ao.quantization.backend_config import {getter}\n"
        tail = f"backend_config = {getter}()\n"
        if self.kind == "default":
            return head + f"\nqconfig_mapping = {default}({e!r})\n" + tail
        lo, hi = self._act_range()
        scheme = "per_tensor_symmetric" if self.symmetric else "per_tensor_affine"
        act_obs = {"minmax": "MinMaxObserver", "histogram": "HistogramObserver",
                   "moving_average": "MovingAverageMinMaxObserver"}[self.observer]
        w_obs = ("MovingAverage" if self.qat else "") + ("PerChannelMinMaxObserver" if self.per_channel else "MinMaxObserver")
        wt_obs = ("MovingAverage" if self.qat else "") + "MinMaxObserver"
        w_scheme = "per_channel_symmetric" if self.per_channel else "per_tensor_symmetric"
        names = sorted({act_obs, w_obs, wt_obs} | ({"FakeQuantize"} if self.qat else set()))
        act_args = f"dtype=torch.quint8, qscheme=torch.{scheme}, quant_min={lo}, quant_max={hi}"
        w_args = f"dtype=torch.qint8, qscheme=torch.{w_scheme}"
        wt_args = "dtype=torch.qint8, qscheme=torch.per_tensor_symmetric"
        if self.qat:
            act = f"FakeQuantize.with_args(observer={act_obs}, {act_args})"
            weight = f"FakeQuantize.with_args(observer={w_obs}, quant_min=-128, quant_max=127, {w_args})"
            weight_t = f"FakeQuantize.with_args(observer={wt_obs}, quant_min=-128, quant_max=127, {wt_args})"
        else:
            act = f"{act_obs}.with_args({act_args})"
            weight = f"{w_obs}.with_args({w_args})"
            weight_t = f"{wt_obs}.with_args({wt_args})"
        return (
            head
            + "from torch import nn\n"
            + "from torch.ao.quantization import QConfig\n"
            + f"from torch.ao.quantization import {', '.join(names)}\n\n"
            + f"activation = {act}\n"
            + f"weight = {weight}\n"
            + "# torch keeps ConvTranspose weights per-tensor (per-channel is unsupported there)\n"
            + f"transpose_weight = {weight_t}\n"
            + f"qconfig_mapping = {default}({e!r}).set_global(QConfig(activation=activation, weight=weight))\n"
            + "for t in (nn.ConvTranspose1d, nn.ConvTranspose2d):\n"
            + "    qconfig_mapping.set_object_type(t, QConfig(activation=activation, weight=transpose_weight))\n"
            + tail
        )


@functools.lru_cache(maxsize=128)
def _compiled(source: str):
    return compile(source, "<qref-setup>", "exec")


def _run(source: str) -> dict:
    ns: dict = {"__name__": "qref_generated_setup"}
    with warnings.catch_warnings():  # onednn's "no VNNI" accuracy warning and the like
        warnings.simplefilter("ignore", UserWarning)
        exec(_compiled(source), ns)
    return ns


def _fx_engines() -> list[str]:
    from qref.engines import engines

    return [e for e in FX_ENGINES if e in engines()] or list(FX_ENGINES)


@st.composite
def quant_setups(draw, flow: str, qat: bool | None = None, engine: str | None = None,
                 model=None) -> QuantSetup:
    """Setups of ``flow`` (``qat`` / ``engine`` drawn when None).  With ``model`` (a
    ModelSpec) only setups that prepare it and quantize at least one of its ops."""
    if qat is None:
        qat = draw(st.booleans(), label="qat")
    observers = ["minmax", "moving_average"] if qat else ["minmax", "histogram", "moving_average"]
    if flow == "pt2e":
        choices = [(k, pc) for k in PT2E_QUANTIZERS for pc in (False, True) if not (k == "arm" and pc)]
        if model is not None:
            choices = [(k, pc) for k, pc in choices
                       if QuantSetup("pt2e", qat, k, pc, **_fixed_pt2e(k, qat)).supports(model)]
        if not choices:
            raise ValueError(f"no pt2e quantizer prepares and quantizes {model!r}")
        kind = draw(st.sampled_from(sorted({k for k, _ in choices}, key=PT2E_QUANTIZERS.index)), label="quantizer")
        per_channels = [pc for k, pc in choices if k == kind]
        if kind == "qref" and per_channels == [False, True]:
            per_channels = [False, True, True]  # qref's per-channel weights also draw their axis
        per_channel = draw(st.sampled_from(per_channels), label="per_channel")
        if kind == "x86":  # its is_dynamic config: conv and linear inputs quantized at run time
            dynamic = draw(st.booleans(), label="x86 dynamic")
            return QuantSetup("pt2e", qat, kind, per_channel, dynamic=dynamic, **_fixed_pt2e(kind, qat))
        if kind == "arm":
            return QuantSetup("pt2e", qat, kind, per_channel, **_fixed_pt2e(kind, qat))
        return draw(_qref_setups(qat, per_channel, observers, model))
    if flow != "fx":
        raise ValueError(f"flow must be 'pt2e' or 'fx', not {flow!r}")
    engines = [engine] if engine is not None else _fx_engines()
    if model is not None:
        engines = [e for e in engines if QuantSetup("fx", qat, "default", engine=e,
                                                      **_fixed_fx_default(e, qat)).supports(model)]
        if not engines:
            raise ValueError(f"no fx engine of {engine or FX_ENGINES} prepares {model!r}")
    e = draw(st.sampled_from(engines), label="engine")
    kind = draw(st.sampled_from(["default", "custom"]), label="mapping")
    if kind == "default":
        return QuantSetup("fx", qat, "default", engine=e, **_fixed_fx_default(e, qat))
    return QuantSetup(
        "fx", qat, "custom",
        per_channel=False if e == "qnnpack" else draw(st.booleans(), label="per_channel"),
        symmetric=draw(st.booleans(), label="symmetric"),
        observer=draw(st.sampled_from(observers), label="observer"),
        engine=e,
        reduce_range=True if e in _REDUCE_RANGE_ENGINES else draw(st.booleans(), label="reduce_range"),
    )


@st.composite
def _qref_setups(draw, qat: bool, per_channel: bool, observers: list, model=None) -> QuantSetup:
    """A pt2e QrefQuantizer setup: activation dtype, scheme, observer and range (full, reduced,
    narrow), int8 weight range and per-channel axis, dynamically quantized linears and int16
    layers among int8 ones (the simplest choice first everywhere: failures shrink to it)."""
    has_linear = model is None or bool(model.ops & {"linear", "attention"})
    # each new choice is made in two draws of three (simplest first), the others half the time:
    # Hypothesis draws the simplest value more often than its share, and each of these shows
    # only on some models (a Linear, two weighted ops), yet must be seen within the quick budget
    more_often = [False, True, True]
    dynamic = draw(st.sampled_from(more_often), label="dynamic linear") and has_linear  # first: 8-bit then
    act_dtype = draw(st.sampled_from(["int8", "uint8"] + ([] if dynamic else ["int16"])), label="act_dtype")
    eight_bit = act_dtype != "int16"
    return QuantSetup(
        "pt2e", qat, "qref", per_channel,
        act_dtype=act_dtype,
        symmetric=draw(st.booleans(), label="symmetric"),
        observer=draw(st.sampled_from(observers), label="observer"),
        reduce_range=draw(st.booleans(), label="reduce_range"),
        narrow_range=draw(st.booleans(), label="narrow_range"),
        weight_qrange=draw(st.sampled_from(WEIGHT_QRANGES), label="weight_qrange"),
        weight_axis=draw(st.sampled_from(["output", "input", "input"]), label="weight_axis") if per_channel else "output",
        dynamic=dynamic,
        # drawn whatever the dtype, so that int8 stays simpler than int16 when shrinking
        int16_layers=layers if (layers := draw(_int16_layers(model), label="int16_layers")) and eight_bit else (),
    )


def _weighted_ops(model) -> int:
    """About how many conv / linear ops ``model`` (a ModelSpec) exports (an attention block: 4)."""
    if model is None:
        return 3
    kinds = [type(layer).__name__ for layer in model.all_layers()]
    return max(1, kinds.count("Conv") + kinds.count("Linear") + 4 * kinds.count("Attention"))


@st.composite
def _int16_layers(draw, model=None) -> tuple:
    """None, or some of the conv / linear ops with int16 activations: never all of them when
    there are several, so that int8 and int16 meet in the graph."""
    if not draw(st.sampled_from([False, True, True]), label="int16 layers"):
        return ()
    n = _weighted_ops(model)
    layers = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=max(1, n - 1), unique=True),
                  label="int16 layer indices")
    return tuple(sorted(layers))


def _fixed_pt2e(kind: str, qat: bool) -> dict:
    observer = "moving_average" if qat else "histogram"
    if kind == "x86":
        return dict(act_dtype="uint8", symmetric=False, reduce_range=False, observer=observer)
    if kind == "arm":
        return dict(act_dtype="int8", symmetric=False, reduce_range=False, observer=observer)
    return dict(observer="minmax")


def _fixed_fx_default(engine: str, qat: bool) -> dict:
    return dict(per_channel=engine != "qnnpack", symmetric=False, act_dtype="uint8",
                reduce_range=engine in _REDUCE_RANGE_ENGINES,
                observer="moving_average" if qat else "histogram")



# ---------------------------------------------------------------------------- fx: dynamic and float16

def _fixed_fx_dynamic(kind: str, engine: str) -> dict:
    """Dynamic kinds fix everything but (int8 only) the weight granularity; reduce_range is the
    engine's (torch decides it at convert time for the per-call quantize)."""
    fixed = dict(qat=False, symmetric=False, observer=PLACEHOLDER, reduce_range=engine in _REDUCE_RANGE_ENGINES,
                 act_dtype="float16" if kind == "float16" else "uint8")
    if kind == "float16":
        fixed["per_channel"] = False
    return fixed


def _fx_dynamic_supports(setup: QuantSetup, spec) -> bool:
    if "linear" not in spec.ops or (setup.kind == "float16" and setup.engine not in FLOAT16_ENGINES):
        return False
    # the mapping names Linear and ReLU only: a Linear fused with another module (Linear +
    # BatchNorm1d; onednn's Linear + Tanh / LeakyReLU) gets two qconfigs, which prepare_fx refuses
    fused_with = {"BatchNorm"} | ({"tanh", "leaky_relu"} if setup.engine == "onednn" else set())
    return not any(type(a).__name__ == "Linear" and (type(b).__name__ in fused_with or getattr(b, "kind", None)
                                                     in fused_with)
                   for a, b in spec.adjacent())


def _fx_dynamic_source(setup: QuantSetup) -> str:
    qconfig = ("float16_dynamic_qconfig" if setup.kind == "float16"
               else "per_channel_dynamic_qconfig" if setup.per_channel else "default_dynamic_qconfig")
    getter = _BACKEND_CONFIGS[setup.engine]
    return ("import torch.ao.quantization.quantize_fx  # noqa: F401  (get_*_backend_config needs it loaded)\n"
            f"from torch import nn\n"
            f"from torch.ao.quantization import QConfigMapping, {qconfig}\n"
            f"from torch.ao.quantization.backend_config import {getter}\n\n"
            "# ReLU too: prepare_fx fuses Linear + ReLU and needs one qconfig for both parts\n"
            f"qconfig_mapping = QConfigMapping().set_object_type(nn.Linear, {qconfig}).set_object_type(nn.ReLU, {qconfig})\n"
            f"backend_config = {getter}()\n")


@st.composite
def fx_dynamic_setups(draw, kinds=FX_DYNAMIC_KINDS, engine: str | None = None, model=None) -> QuantSetup:
    """A dynamic setup of ``kinds`` (int8 first, so failures shrink to it) on ``engine`` (drawn
    when None; float16 only where the engine lowers it); with ``model`` only setups that prepare
    and quantize it (ValueError if none)."""
    engines = [engine] if engine is not None else _fx_engines()
    choices = [(k, e, pc) for k in kinds for e in engines for pc in (False, True)
               if _fixed_fx_dynamic(k, e).get("per_channel", pc) == pc and (k != "float16" or e in FLOAT16_ENGINES)]
    choices = [(k, e, pc) for k, e, pc in choices
               if model is None or QuantSetup("fx", False, k, pc, engine=e, **_without_per_channel(k, e)).supports(model)]
    if not choices:
        raise ValueError(f"no dynamic fx setup of {kinds} on {engine or FX_ENGINES} quantizes {model!r}")
    kind = draw(st.sampled_from(sorted({k for k, _, _ in choices}, key=FX_DYNAMIC_KINDS.index)), label="dynamic kind")
    e = draw(st.sampled_from(sorted({e for k, e, _ in choices if k == kind}, key=FX_ENGINES.index)), label="engine")
    per_channel = draw(st.sampled_from([pc for k, x, pc in choices if (k, x) == (kind, e)]), label="per_channel")
    return QuantSetup("fx", False, kind, per_channel, engine=e, **_without_per_channel(kind, e))


def _without_per_channel(kind: str, engine: str) -> dict:
    return {k: v for k, v in _fixed_fx_dynamic(kind, engine).items() if k not in ("per_channel", "qat")}


# ---------------------------------------------------------------------------- fx: convert-time None entries

NONE_ENTRY_KINDS = ("module_name", "object_type", "module_name_regex")


def fx_none_entries(max_entries: int = 3) -> st.SearchStrategy[tuple]:
    """Convert-time ``None`` entries as (entry kind, index) pairs: :func:`fx_skip_mapping` turns
    each into an entry on the index-th (modulo) module or op the prepared graph calls."""
    entry = st.tuples(st.sampled_from(NONE_ENTRY_KINDS), st.integers(0, 15))
    return st.lists(entry, min_size=1, max_size=max_entries).map(tuple)


def fx_called(prepared) -> tuple[list[str], list]:
    """(names of the modules the prepared graph calls, the module types and functions it calls
    that an object-type entry may name), observers left out, in graph order."""
    from qref.observers import is_observer

    names, types = [], []
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            module = prepared.get_submodule(str(node.target))
            if is_observer(module):
                continue
            names.append(str(node.target))
            float_cls = getattr(type(module), "_FLOAT_MODULE", type(module))  # a QAT module: its float class
            # a fused module's type is no prepare-time key (its parts are): naming a part None
            # while the other keeps its qconfig is refused by prepare's and convert's fusion check
            if isinstance(float_cls, type) and "intrinsic" not in float_cls.__module__ and float_cls not in types:
                types.append(float_cls)
        elif node.op == "call_function" and node.target not in types and getattr(node.target, "__name__", "") \
                not in ("getattr", "getitem"):
            types.append(node.target)
    return names, types


def fx_skip_mapping(setup: QuantSetup, prepared, entries) -> tuple:
    """``setup``'s prepare-time mapping plus a ``None`` entry per (kind, index) of ``entries``,
    resolved on ``prepared``: ``module_name`` and ``module_name_regex`` pick a called module
    by index (the regex matches that name exactly for an even index, every name of its family --
    the same prefix and any number -- for an odd one), ``object_type`` a called module type or
    function.  Returns (mapping, the entries as ``set_*`` calls: what the failure shows)."""
    import re

    names, types = fx_called(prepared)
    mapping, calls = setup.qconfig_mapping(), []
    for kind, index in entries:
        if kind == "object_type" and types:
            target = types[index % len(types)]
            mapping.set_object_type(target, None)
            calls.append(f"set_object_type({getattr(target, '__qualname__', target)}, None)")
        elif kind == "module_name" and names:
            name = names[index % len(names)]
            mapping.set_module_name(name, None)
            calls.append(f"set_module_name({name!r}, None)")
        elif kind == "module_name_regex" and names:
            name = names[index % len(names)]
            family = name.rstrip("0123456789")
            pattern = re.escape(name) + "$" if index % 2 == 0 or family == name else re.escape(family) + r"\d+$"
            mapping.set_module_name_regex(pattern, None)
            calls.append(f"set_module_name_regex({pattern!r}, None)")
    return mapping, calls
