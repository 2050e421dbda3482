"""Whole conversion cases: a model spec, a setup, calibration batches and evaluation inputs.

:func:`cases` draws a :class:`Case`.  ``case.prepared()`` is a fresh prepared and calibrated
model (export/trace + prepare + calibration run once per distinct case and are cached; every
call returns a deep copy, so a converter may mutate it):

* pt2e PTQ: ``torch.export.export(model.eval(), inputs).module()`` -> ``prepare_pt2e`` ->
  calibration under ``torch.no_grad()``.
* pt2e QAT: export in train mode -> ``prepare_qat_pt2e`` -> calibration forward passes in
  train mode (BN statistics and fake-quant observers update; no backward).  Returned in
  train mode, as torchao's QAT tutorial hands it to ``convert_pt2e``.
* fx: ``prepare_fx(model.eval(), ...)`` / ``prepare_qat_fx(model.train(), ...)`` with the
  setup's ``QConfigMapping`` and ``BackendConfig``, then calibration; QAT models are put in
  eval mode afterwards (as ``fixtures.fx_setups`` does).

Every graph input of the spec (``spec.input_shapes``) gets its own draws, as many batches each;
an index input (``spec.index_ranges``: an embedding reads it) gets token ids below its
``num_embeddings`` instead of floats.  Calibration tensors are built from a few drawn floats (a drawn base of 1-8 values, an
amplitude and an offset, spread over the tensor by a drawn index seed), so they shrink to
constant and zero tensors.  Evaluation inputs are: fresh values inside the calibrated range,
the same values x4..x100 (outside it: saturation), all zeros, and half-steps of a power of two
(rounding ties for that scale).
"""

from __future__ import annotations

import collections
import copy
import threading
import warnings
from dataclasses import dataclass, field

import torch
from hypothesis import event, reject
from hypothesis import strategies as st

from qref.strategies.models import ModelSpec, model_specs
from qref.strategies.setups import QuantSetup, quant_setups

__all__ = ["Case", "cases", "calibration_batches", "prepare_case"]


# ---------------------------------------------------------------------------- preparation

_CACHE_SIZE = 64
_cache: "collections.OrderedDict[tuple, torch.nn.Module]" = collections.OrderedDict()
_export_cache: "collections.OrderedDict[tuple, torch.nn.Module]" = collections.OrderedDict()
_lock = threading.Lock()


def _lru_get(store, key):
    with _lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    return None


def _lru_put(store, key, value) -> None:
    with _lock:
        store[key] = value
        store.move_to_end(key)
        while len(store) > _CACHE_SIZE:
            store.popitem(last=False)


def _tensor_bytes(batches) -> bytes:
    return b"".join(t.contiguous().numpy().tobytes() + repr(tuple(t.shape)).encode()
                    for args in batches for t in args)


def _exported(spec: ModelSpec, train: bool, example: tuple):
    from qref._quiet import silence_noise

    silence_noise()
    key = (repr(spec), train, tuple(tuple(t.shape) for t in example))
    gm = _lru_get(_export_cache, key)
    if gm is None:
        model = spec.build()
        model = model.train() if train else model.eval()
        gm = torch.export.export(model, example).module()
        _lru_put(_export_cache, key, gm)
    return copy.deepcopy(gm)


def prepare_case(spec: ModelSpec, setup: QuantSetup, calibration) -> torch.nn.Module:
    """Export/trace, prepare and calibrate (uncached; :meth:`Case.prepared` caches it)."""
    from qref._quiet import silence_noise

    silence_noise()
    calibration = [tuple(args) for args in calibration]
    example = calibration[0]
    if setup.flow == "pt2e":
        from qref import _torchao_patterns

        _torchao_patterns.enable()  # memoised torchao pattern exports: fast prepare_qat_pt2e
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

        gm = _exported(spec, setup.qat, example)
        with warnings.catch_warnings():
            # X86InductorQuantizer on a max_pool2d whose input it did not quantize: expected here
            warnings.filterwarnings("ignore", "The input of maxpool2d is not quantized", UserWarning)
            prepared = (prepare_qat_pt2e if setup.qat else prepare_pt2e)(gm, setup.quantizer())
        with torch.no_grad():
            for args in calibration:
                prepared(*args)
        from qref.pt2e.annotations import rebind_on_deepcopy  # its copies' annotations name their own nodes
        return rebind_on_deepcopy(prepared)
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    model = spec.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX deprecation notices
        if setup.qat:
            prepared = prepare_qat_fx(model.train(), setup.qconfig_mapping(), example,
                                      backend_config=setup.backend_config())
        else:
            prepared = prepare_fx(model.eval(), setup.qconfig_mapping(), example,
                                  backend_config=setup.backend_config())
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    if setup.qat:
        prepared.eval()
    return prepared


# ---------------------------------------------------------------------------- the case

@dataclass(frozen=True, eq=False)
class Case:
    spec: ModelSpec
    setup: QuantSetup
    calibration: tuple  # of argument tuples
    inputs: tuple  # evaluation argument tuples
    input_labels: tuple = field(default=())  # one label per evaluation input

    def __repr__(self) -> str:
        return (f"Case(spec={self.spec!r}, setup={self.setup!r}, "
                f"calibration=<{len(self.calibration)} batches>, inputs={list(self.input_labels)!r})")

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis/IPython: keep it one line
        printer.text(repr(self))

    @property
    def flow(self) -> str:
        return self.setup.flow

    @property
    def example_inputs(self) -> tuple:
        return self.calibration[0]

    def float_model(self) -> torch.nn.Module:
        """The float network in eval mode (fresh)."""
        return self.spec.build().eval()

    def cache_key(self) -> tuple:
        return (repr(self.spec), repr(self.setup), _tensor_bytes(self.calibration))

    def prepared(self) -> torch.nn.Module:
        """A fresh prepared + calibrated model (cached; a deep copy per call)."""
        key = self.cache_key()
        model = _lru_get(_cache, key)
        if model is None:
            model = prepare_case(self.spec, self.setup, self.calibration)
            _lru_put(_cache, key, model)
        from qref._quiet import silence_noise

        silence_noise()
        return copy.deepcopy(model)

    def tensors(self) -> dict:
        """Every calibration and evaluation tensor by name (``calibration_<batch>_<arg>``,
        ``input_<index>_<arg>``): what the reproducer loads from ``inputs.pt``."""
        out = {}
        for prefix, batches in (("calibration", self.calibration), ("input", self.inputs)):
            for i, args in enumerate(batches):
                for j, t in enumerate(args):
                    out[f"{prefix}_{i}_{j}"] = t
        return out

    def save_inputs(self, path) -> None:
        """``torch.save(self.tensors(), path)`` (loadable with ``weights_only=True``)."""
        torch.save(self.tensors(), path)

    @staticmethod
    def _names(prefix: str, batches) -> str:
        tuples = ", ".join("(" + "".join(f"_TENSORS[{prefix + f'_{i}_{j}'!r}], " for j in range(len(args))) + ")"
                           for i, args in enumerate(batches))
        return f"[{tuples}]"

    def to_python(self, converter_target: str, replay: tuple | None = None) -> str:
        """A standalone reproducer script: the model and setup sources, inputs loaded from
        ``inputs.pt`` next to the script (see :meth:`save_inputs`), prepare, calibrate,
        convert with ``converter_target`` and print its divergence from qref's reference conversion
        at every quantize point (exit status 1 when they differ).

        ``replay=(module, property, arguments)``: instead, run that property of the suite on this
        case with ``converter_target`` and print its verdict (exit status 1 when it fails)."""
        s = self.setup
        if s.flow == "pt2e":
            prepare = (
                "    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e\n\n"
                f"    model = build_model().{'train' if s.qat else 'eval'}()\n"
                "    exported = torch.export.export(model, CALIBRATION[0]).module()\n"
                f"    prepared = {'prepare_qat_pt2e' if s.qat else 'prepare_pt2e'}(exported, quantizer)\n"
                "    with torch.no_grad():\n"
                "        for args in CALIBRATION:\n"
                "            prepared(*args)\n"
                "    return prepared\n"
            )
        else:
            prepare = (
                f"    from torch.ao.quantization.quantize_fx import {'prepare_qat_fx' if s.qat else 'prepare_fx'}\n\n"
                f"    model = build_model().{'train' if s.qat else 'eval'}()\n"
                f"    prepared = {'prepare_qat_fx' if s.qat else 'prepare_fx'}(model, qconfig_mapping, "
                "CALIBRATION[0], backend_config=backend_config)\n"
                "    with torch.no_grad():\n"
                "        for args in CALIBRATION:\n"
                "            prepared(*args)\n"
                + ("    prepared.eval()\n" if s.qat else "")
                + "    return prepared\n"
            )
        return (
            f'"""qref reproducer.\n\nmodel: {self.spec!r}\nsetup: {self.setup!r}\n'
            f'converter: {converter_target}\n\nRun next to inputs.pt (Case.save_inputs).\n"""\n'
            "from qref._quiet import import_torchao_quietly\n\n"
            "import_torchao_quietly()  # hides torchao's CUDA-extension load messages\n"
            "# ---- model " + "-" * 60 + "\n"
            + self.spec.to_python(docstring=False)
            + "\n# ---- quantization setup " + "-" * 47 + "\n"
            + s.to_python()
            + "\n# ---- inputs " + "-" * 59 + "\n"
            "from pathlib import Path\n\n"
            "_TENSORS = torch.load(Path(__file__).with_name(\"inputs.pt\"), weights_only=True)\n"
            f"CALIBRATION = {self._names('calibration', self.calibration)}\n"
            f"INPUTS = {self._names('input', self.inputs)}\n"
            f"LABELS = {list(self.input_labels)!r}\n\n\n"
            "def prepare():\n"
            + prepare
            + (self._replay_main(converter_target, *replay) if replay else self._compare_main(converter_target))
        )

    def _replay_main(self, converter_target: str, module: str, name: str, arguments: dict) -> str:
        from qref.strategies.models import __all__ as spec_names

        classes = ", ".join(sorted(n for n in spec_names if n[0].isupper()))
        spec_class = type(self.spec)  # a spec of another module (e.g. an ArchitectureSpec): import it too
        other = ("" if spec_class.__module__ == "qref.strategies.models"
                 else f"    from {spec_class.__module__} import {spec_class.__name__}\n")
        return (
            "\n\ndef main():\n"
            "    # the property itself, as the suite ran it on this case (prepare() above is the same\n"
            "    # preparation, written out in plain torchao/torch calls)\n"
            "    from qref.properties._support import replay\n"
            "    from qref.strategies.cases import Case\n"
            f"    from qref.strategies.models import {classes}  # noqa: F401\n"
            + other
            + "    from qref.strategies.setups import QuantSetup\n\n"
            f"    case = Case(spec={self.spec!r},\n"
            f"                setup={self.setup!r},\n"
            "                calibration=tuple(CALIBRATION), inputs=tuple(INPUTS), input_labels=tuple(LABELS))\n"
            f"    raise SystemExit(replay({module!r}, {name!r}, {converter_target!r}, case, {arguments!r}))\n\n\n"
            "if __name__ == \"__main__\":\n"
            "    main()\n"
        )

    def _compare_main(self, converter_target: str) -> str:
        s = self.setup
        convert_call = ("convert(prepared)" if s.flow == "pt2e"
                        else "convert(prepared, backend_config=backend_config)")  # fmt: skip
        return (
            "\n\ndef main():\n"
            "    import copy\n\n"
            "    import qref\n"
            "    from qref.compare import compare\n"
            "    from qref.converters import resolve\n\n"
            f"    convert = resolve({converter_target!r}, {s.flow!r})\n"
            + (f"    with qref.use_engine({s.engine!r}, threads=1):\n" if s.flow == "fx" else "    if True:\n")
            + "        prepared = prepare()\n"
            + ("        reference = qref.convert_fx(copy.deepcopy(prepared), backend_config=backend_config)\n"
               if s.flow == "fx" else "        reference = qref.convert_pt2e(copy.deepcopy(prepared))\n")
            + f"        converted = {convert_call}\n"
            "        result = compare(reference, converted, INPUTS)\n"
            "    print(f\"{convert.target} vs qref's reference on inputs {LABELS}:\")\n"
            "    print(result.message())\n"
            "    raise SystemExit(0 if result.ok else 1)\n\n\n"
            "if __name__ == \"__main__\":\n"
            "    main()\n"
        )


# ---------------------------------------------------------------------------- strategies

_AMPLITUDES = [1.0, 0.25, 4.0, 0.01, 50.0]


@st.composite
def _batch(draw, shape: tuple, amplitude=None, label: str = "batch") -> torch.Tensor:
    base = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=8), label=f"{label} base")
    if amplitude is None:
        amplitude = draw(st.sampled_from(_AMPLITUDES), label=f"{label} amplitude")
    offset = draw(st.sampled_from([0.0, 0.5, -0.5]), label=f"{label} offset")
    spread = draw(st.integers(0, 2**16), label=f"{label} index seed")
    g = torch.Generator().manual_seed(spread)
    idx = torch.randint(len(base), shape, generator=g)
    values = (torch.tensor(base, dtype=torch.float32) + offset) * amplitude
    return values[idx].contiguous()


# Edge activations the observers must survive: an empty observed range (all zeros), a channel
# that is always zero, and one huge outlier that stretches the range.
CALIBRATION_EDGES = ("none", "zeros", "zero channel", "outlier")


@st.composite
def calibration_batches(draw, shape: tuple, min_batches: int = 2, max_batches: int = 4) -> list:
    """2-4 calibration tensors of ``shape`` (one amplitude per case, drawn), maybe with one of
    :data:`CALIBRATION_EDGES` (a constant tensor is a one-value base)."""
    amplitude = draw(st.sampled_from(_AMPLITUDES), label="calibration amplitude")
    n = draw(st.integers(min_batches, max_batches), label="calibration batches")
    batches = [draw(_batch(shape, amplitude, f"calibration {i}"), label=f"calibration {i}") for i in range(n)]
    edge = draw(st.sampled_from(CALIBRATION_EDGES), label="calibration edge")
    if edge == "zeros":
        batches = [torch.zeros_like(b) for b in batches]
    elif edge == "zero channel":
        channel = draw(st.integers(0, shape[1] - 1), label="zero channel")
        for b in batches:
            b[:, channel] = 0.0
    elif edge == "outlier":
        where = draw(st.integers(0, batches[0].numel() - 1), label="outlier index")
        sign = draw(st.sampled_from([1.0, -1.0]), label="outlier sign")
        batches[0].view(-1)[where] = sign * amplitude * 1000.0
    return batches


def _input_qparams(prepared, index: int = 0) -> tuple[float, int, int, int] | None:
    """(scale, zero_point, quant_min, quant_max) of the observer on the model's graph input
    ``index`` (its forward argument of that position), if any."""
    from qref.observers import is_observer, kind, observer_qparams

    placeholders = [node for node in prepared.graph.nodes if node.op == "placeholder"]
    for node in placeholders[index:index + 1]:
        for user in node.users:
            module = getattr(prepared, str(user.target), None) if user.op == "call_module" else None
            if module is not None and is_observer(module) and kind(module) == "static":  # dynamic: no scale
                qp = observer_qparams(module)
                return float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0]), qp.quant_min, qp.quant_max
    return None


@st.composite
def _evaluation(draw, shape: tuple, calibration: list, input_qparams) -> tuple:
    lo = min(float(t.min()) for t in calibration)
    hi = max(float(t.max()) for t in calibration)
    unit = draw(_batch(shape, 1.0, "evaluation"), label="evaluation")  # values in [-1.5, 1.5]
    inside = (lo + (unit.clamp(-1, 1) + 1) * 0.5 * (hi - lo)).to(torch.float32)
    factor = draw(st.sampled_from([4.0, 10.0, 100.0]), label="out-of-range factor")
    # Rounding ties of the model's own input quantization: (k + 1/2) * scale, k + zero_point in range.
    if input_qparams is not None:
        scale, zp, qmin, qmax = input_qparams
        k_lo, k_hi, step, name = qmin - zp, qmax - zp - 1, scale, "rounding ties of the input scale"
    else:
        e = draw(st.integers(-8, 0), label="tie exponent")
        k_lo, k_hi, step, name = -8, 7, 2.0**e, f"half-steps of 2**{e}"
    ks = draw(st.lists(st.integers(k_lo, k_hi), min_size=1, max_size=8), label="tie multiples")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="tie index seed"))
    picks = torch.randint(len(ks), shape, generator=g)
    ties = ((torch.tensor(ks, dtype=torch.float64) + 0.5) * step)[picks].to(torch.float32)
    labelled = [
        ("in calibration range", inside),
        (f"calibration range x{factor:g}", inside * factor),
        ("zeros", torch.zeros(shape)),
        (name, ties.contiguous()),
    ]
    return tuple(l for l, _ in labelled), tuple((t,) for _, t in labelled)


def _calibration(draw, spec: ModelSpec) -> list:
    """Per graph input, its calibration tensors (as many for every input): float inputs as
    :func:`calibration_batches` draws them (each input its own amplitude and edge), index inputs
    as token ids below the input's ``num_embeddings``.  Drawn with the caller's ``draw``, and the
    token strategies imported only for an index input: a one-float-input case draws exactly what
    it drew before several inputs existed (Hypothesis's generation also samples the literals of
    the project modules loaded)."""
    per_input: list = []
    for i, (shape, vocab) in enumerate(zip(spec.input_shapes, spec.index_ranges)):
        label = "calibration" if i == 0 else f"calibration of input {i}"
        n = (2, 4) if not per_input else (len(per_input[0]),) * 2
        if vocab is None:
            batches = calibration_batches(shape) if not per_input else calibration_batches(shape, *n)
            per_input.append(draw(batches, label=label))
        else:
            from qref.strategies.architectures import _token_batch

            count = draw(st.integers(*n), label=f"{label} batches")
            per_input.append([draw(_token_batch(shape, vocab, f"{label} {j}"), label=f"{label} {j}")
                              for j in range(count)])
    return per_input


def _evaluations(draw, spec: ModelSpec, per_input: list, prepared) -> tuple:
    """(labels, argument tuples): each graph input's four evaluation tensors (:func:`_evaluation`,
    or token ids for an index input), the k-th of every input in the k-th tuple (drawn with the
    caller's ``draw``, as :func:`_calibration`)."""
    labels, tensors = [], []
    for i, (shape, vocab, calibration) in enumerate(zip(spec.input_shapes, spec.index_ranges, per_input)):
        label = "evaluation inputs" if i == 0 else f"evaluation inputs of input {i}"
        if vocab is None:
            drawn = draw(_evaluation(shape, calibration, _input_qparams(prepared, i)), label=label)
        else:
            from qref.strategies.architectures import _token_evaluation

            drawn = draw(_token_evaluation(shape, vocab), label=label)
        labels.append(drawn[0])
        tensors.append([args[0] for args in drawn[1]])
    if len(labels) == 1:
        return labels[0], tuple((t,) for t in tensors[0])
    joined = tuple(column[0] if len(set(column)) == 1 else "; ".join(f"input {i}: {l}" for i, l in enumerate(column))
                   for column in zip(*labels))
    return joined, tuple(zip(*tensors))


@st.composite
def cases(draw, flow: str, tier: str = "models", qat: bool | None = None, engine: str | None = None,
          model=None) -> Case:
    """A :class:`Case` of ``flow``: a spec of ``tier`` (or drawn from ``model``, a ModelSpec
    strategy), a setup that quantizes it, calibration batches and evaluation inputs.

    The case is prepared while drawn (cached): a spec that torch/torchao cannot prepare, or
    that no setup of ``engine`` quantizes, is rejected (a limitation of preparation, not of
    any converter), and the evaluation inputs include rounding ties of the prepared model's
    input scale.
    """
    if qat is None:
        qat = draw(st.booleans(), label="qat")
    spec_strategy = model if model is not None else model_specs(flow, tier, qat)
    spec = draw(spec_strategy, label="model spec")
    try:
        setup = draw(quant_setups(flow, qat=qat, engine=engine, model=spec), label="setup")
    except ValueError as error:  # no setup of this flow/engine quantizes the spec
        event(f"rejected: {error}".split(" ModelSpec")[0])
        reject()
    per_input = _calibration(draw, spec)
    batches = tuple(zip(*per_input))
    unevaluated = Case(spec, setup, batches, (), ())
    try:
        prepared = unevaluated.prepared()  # cached: the properties' own calls reuse it
    except Exception as error:  # noqa: BLE001 - preparation is not under test
        event(f"rejected: preparation raised {type(error).__name__}")
        reject()
    labels, inputs = _evaluations(draw, spec, per_input, prepared)
    return Case(spec, setup, batches, inputs, labels)
