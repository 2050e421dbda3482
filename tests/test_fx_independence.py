"""qref's FX converters are an oracle, not a copy of torch (issue 11, section 1).

1. While qref converts, none of torch's conversion functions runs: QAT ``to_float`` (conv-BN
   folding), the reference modules' ``from_float`` (weight quantization), the quantized
   modules' ``from_reference`` / ``get_quantized_weight`` (weight packing), torch's
   ``convert_fx`` / ``_convert_fx`` / ``convert_to_reference_fx`` / ``_lower_to_native_backend``,
   ``fuse_*_bn_weights``, and no observer's ``calculate_qparams`` is called by qref's code
   (an observer's own forward may call it: a fake-quant updates itself that way).
   A ``sys.setprofile`` watcher sees every Python call; it is itself shown to flag each
   kind of those calls made directly, and torch's own ``convert_fx``.
2. The builders qref uses instead agree with torch bit for bit beyond the zoo: every
   quantized module the lowering builds and every QAT module kind, on small models.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import os
import pkgutil
import sys
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.ao.nn.quantized.reference as nnqr
from torch import nn
from torch.ao.quantization import (
    QConfigMapping,
    default_embedding_qat_qconfig,
    float_qparams_weight_only_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.backend_config import (
    get_fbgemm_backend_config,
    get_native_backend_config,
    get_onednn_backend_config,
    get_qnnpack_backend_config,
)
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as torch_reference_fx
from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

import qref
from fixtures.fx_setups import SETUPS, prepared, unsupported
from fixtures.zoo import ZOO
from qref.engines import engines, use_engine
from qref.fx import convert_fx, convert_to_reference_fx, lower
from qref.fx.patterns import backend_patterns
from qref.fx.weighted import _QAT_TO_FLOAT

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

# --- the watcher -------------------------------------------------------------------

FORBIDDEN_METHODS = ("to_float", "from_float", "from_reference", "get_quantized_weight")
FORBIDDEN_FUNCTIONS = {
    "torch.ao.quantization.quantize_fx": ("convert_fx", "_convert_fx", "convert_to_reference_fx"),
    "torch.ao.quantization.fx.convert": ("convert", "convert_weighted_module"),
    "torch.ao.quantization.fx._lower_to_native_backend": ("_lower_to_native_backend",),
    "torch.ao.quantization.fx.lower_to_fbgemm": ("lower_to_fbgemm",),
    "torch.ao.quantization.fx.lower_to_qnnpack": ("lower_to_qnnpack",),
    "torch.nn.utils.fusion": ("fuse_conv_bn_weights", "fuse_linear_bn_weights"),
    "torch.ao.nn.quantized.reference.modules.utils": ("_quantize_weight",),
}
# Packages whose classes' FORBIDDEN_METHODS are watched (every module below them).
MODULE_PACKAGES = ("torch.ao.nn", "torch.nn.qat", "torch.nn.intrinsic", "torch.nn.quantized")
OBSERVER_MODULES = ("torch.ao.quantization.observer", "torch.ao.quantization.fake_quantize",
                    "torchao.quantization.pt2e.observer", "torchao.quantization.pt2e.fake_quantize")  # fmt: skip
QREF_DIR = os.path.dirname(os.path.abspath(qref.__file__))


def _import_all(package: str) -> list:
    """``package`` and every module below it (imported), as module objects."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001  (optional backends that do not import here)
            continue
    return modules


def _code(obj):
    func = getattr(obj, "__func__", obj)  # classmethod / staticmethod
    return getattr(inspect.unwrap(func), "__code__", None)


def _method_codes(modules, names) -> dict:
    """Code object -> 'Class.method' for every method ``names`` defined in ``modules``' classes."""
    out = {}
    for module in modules:
        for cls in vars(module).values():
            if not isinstance(cls, type) or not cls.__module__.startswith(module.__name__.split(".")[0]):
                continue
            for name in names:
                code = _code(vars(cls).get(name))
                if code is not None:
                    out[code] = f"{cls.__module__}.{cls.__qualname__}.{name}"
    return out


def forbidden_codes() -> tuple[dict, dict]:
    """(always forbidden, forbidden when called from qref's code): code object -> name."""
    always = {}
    for package in MODULE_PACKAGES:
        always.update(_method_codes(_import_all(package), FORBIDDEN_METHODS))
    for module_name, names in FORBIDDEN_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            always[_code(getattr(module, name))] = f"{module_name}.{name}"
    observer_modules = []
    for name in OBSERVER_MODULES:
        try:
            observer_modules.append(importlib.import_module(name))
        except ImportError:
            continue
    from_qref = _method_codes(observer_modules, ("calculate_qparams",))
    return always, from_qref


ALWAYS, FROM_QREF = forbidden_codes()


class Watcher:
    """Records calls of the forbidden functions while active (``with Watcher() as w``).

    ``calls``: the forbidden calls seen, ``seen``: how many Python calls were seen at all
    (so a test can tell the hook was in place, not displaced by another profiler).
    """

    def __init__(self):
        self.calls: list[str] = []
        self.seen = 0

    def _profile(self, frame, event, arg):
        if event != "call":
            return
        self.seen += 1
        code = frame.f_code
        name = ALWAYS.get(code)
        if name is not None:
            self.calls.append(name)
        elif code in FROM_QREF:
            caller = frame.f_back
            if caller is not None and os.path.abspath(caller.f_code.co_filename).startswith(QREF_DIR):
                self.calls.append(f"{FROM_QREF[code]} (called by {caller.f_code.co_name} in qref)")

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False


def test_watcher_knows_every_forbidden_function():
    """The code-object tables hold what they must (else a renamed torch function escapes)."""
    names = set(ALWAYS.values())
    for expected in ("torch.ao.nn.intrinsic.qat.modules.conv_fused._ConvBnNd.to_float",
                     "torch.ao.nn.intrinsic.qat.modules.linear_fused.LinearBn1d.to_float",
                     "torch.ao.nn.qat.modules.linear.Linear.to_float",
                     "torch.ao.nn.quantized.reference.modules.linear.Linear.from_float",
                     "torch.ao.nn.quantized.reference.modules.conv._ConvNd.from_float",
                     "torch.ao.nn.quantized.modules.linear.Linear.from_reference",
                     "torch.ao.nn.quantized.modules.conv._ConvNd.from_reference",
                     "torch.ao.nn.quantized.modules.activation.PReLU.from_reference",
                     "torch.ao.nn.quantized.modules.batchnorm._BatchNorm.from_reference",
                     "torch.ao.nn.quantized.modules.embedding_ops.Embedding.from_reference",
                     "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearLeakyReLU.from_reference",
                     "torch.ao.nn.quantized.dynamic.modules.linear.Linear.from_reference",
                     "torch.ao.quantization.quantize_fx.convert_fx",
                     "torch.ao.quantization.fx._lower_to_native_backend._lower_to_native_backend"):  # fmt: skip
        assert expected in names, expected
    assert any(n.endswith("MinMaxObserver.calculate_qparams") for n in FROM_QREF.values())
    assert any(n.endswith("FakeQuantize.calculate_qparams") for n in FROM_QREF.values())


def _qat_conv_bn():
    model, _ = prepared("conv_bn_relu", "fbgemm", True)
    return next(m for m in model.modules() if isinstance(m, nniqat.ConvBnReLU2d))


def _reference_linear():
    model, _ = prepared("linear", "fbgemm", False)
    return torch_reference_fx(copy.deepcopy(model)).fc


PROBES = {  # a direct call of each kind of forbidden function: the watcher must flag it
    "to_float": lambda: _qat_conv_bn().to_float(),
    "from_float": lambda: nnqr.Linear.from_float(
        nn.Linear(2, 2), {"qscheme": torch.per_tensor_affine, "dtype": torch.qint8, "scale": 0.1, "zero_point": 0}
    ),
    "from_reference": lambda: nnq.Linear.from_reference(_reference_linear(), 0.1, 0),
    "get_quantized_weight": lambda: _reference_linear().get_quantized_weight(),
    "convert_to_reference_fx": lambda: torch_reference_fx(copy.deepcopy(prepared("linear", "fbgemm")[0])),
    "fuse_conv_bn_weights": lambda: torch.nn.utils.fusion.fuse_conv_bn_eval(
        nn.Conv2d(2, 2, 1).eval(), nn.BatchNorm2d(2).eval()
    ),
}


@pytest.mark.parametrize("kind", list(PROBES))
def test_watcher_flags_each_kind_of_forbidden_call(kind):
    with Watcher() as w:
        PROBES[kind]()
    assert any(kind in call for call in w.calls), w.calls


def test_watcher_flags_torch_convert_fx():
    model, _ = prepared("conv_bn_relu", "fbgemm", True)
    with use_engine("fbgemm"), Watcher() as w:
        torch_convert_fx(copy.deepcopy(model))
    flagged = " ".join(w.calls)
    for name in ("quantize_fx.convert_fx", "_lower_to_native_backend", "to_float", "from_float",
                 "from_reference"):  # fmt: skip
        assert name in flagged, (name, w.calls)


def test_watcher_flags_calculate_qparams_only_when_qref_calls_it():
    obs = torch.ao.quantization.MinMaxObserver()
    obs(torch.randn(8, generator=torch.Generator().manual_seed(0)))
    fake_quant = torch.ao.quantization.FakeQuantize()
    # code compiled as if it were in qref/observers.py: what qref calling it directly looks like
    as_qref = compile("obs.calculate_qparams()", os.path.join(QREF_DIR, "observers.py"), "exec")
    with Watcher() as w:
        fake_quant(torch.randn(8))  # the fake-quant's own forward calls its observer: allowed
        obs.calculate_qparams()  # from a test: allowed
    assert w.calls == [] and w.seen > 0
    with Watcher() as w:
        exec(as_qref, {"obs": obs})
    assert len(w.calls) == 1 and "MinMaxObserver.calculate_qparams" in w.calls[0], w.calls


# --- qref converts without them ------------------------------------------------------

FAST = [n for n, z in ZOO.items() if z.fx_traceable and n != "mobilenet_v2_like"]


def zoo_sweep(full: bool) -> list[tuple[str, str, bool, str]]:
    """(model, setup, qat, engine): each engine converts with its own default mapping.

    ``full``: every zoo model x engine x {PTQ, QAT}. Otherwise (the default run, ~1/4 of the
    cost) every model PTQ and QAT, under engines taken in turn, so that each model meets two
    engines and each engine a quarter of the zoo; plus the dynamic and skip-entry setups.
    """
    available = engines()
    out = []
    turn = itertools.cycle(available)
    for model in FAST:
        for qat in (False, True):
            chosen = available if full else [next(turn)]
            out += [(model, engine, qat, engine) for engine in chosen]
    out += [(m, "dynamic_linear", False, "fbgemm") for m in ("mlp", "linear_relu")]
    out += [(m, "float16_linear", False, engine) for m in ("mlp", "linear_relu") for engine in ("fbgemm", "x86")]
    out += [("residual_add", "fbgemm_skip", qat, "fbgemm") for qat in (False, True)]
    out += [("conv_bn_relu", "fbgemm_skip_regex", qat, "fbgemm") for qat in (False, True)]
    return [c for c in out if not unsupported(ZOO[c[0]], SETUPS[c[1]], c[2]) and c[3] in available]


def _convert_watched(model_name, setup_name, qat, engine) -> Watcher:
    model, _ = prepared(model_name, setup_name, qat)
    setup = SETUPS[setup_name]
    mapping = setup.convert_mapping(setup.mapping(qat), model) if setup.convert_mapping else None
    with use_engine(engine), Watcher() as w:
        # convert_fx runs the reference conversion first, then lowers: both are watched
        convert_fx(model, qconfig_mapping=mapping)
    return w


@pytest.mark.parametrize(
    "full", [pytest.param(False, id="zoo"), pytest.param(True, id="zoo-full", marks=pytest.mark.slow)]
)
def test_qref_converts_the_zoo_without_torch_conversion_code(full):
    cases = zoo_sweep(full)
    assert {c[3] for c in cases} == set(engines()) and {c[0] for c in cases} == set(FAST)
    assert {c[2] for c in cases} == {False, True}
    for case in cases:
        w = _convert_watched(*case)
        assert w.seen > 100, case  # the hook was in place while qref converted
        assert w.calls == [], (case, sorted(set(w.calls)))


# --- qref's builders agree with torch's beyond the zoo ----------------------------------


class Activations2d(nn.Module):
    """Standalone BN(+ReLU), ELU, LeakyReLU, Hardswish, InstanceNorm, Dropout, PReLU, LayerNorm, Softmax."""

    def __init__(self):
        super().__init__()
        self.bn_relu = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.elu, self.leaky, self.hardswish = nn.ELU(alpha=0.7), nn.LeakyReLU(0.2), nn.Hardswish()
        self.instance_norm = nn.InstanceNorm2d(4, affine=True)
        self.dropout, self.prelu = nn.Dropout(0.3), nn.PReLU(4)
        self.bn = nn.BatchNorm2d(4)
        self.layer_norm = nn.LayerNorm([4, 6, 6])
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        x = self.conv(self.bn_relu(x))
        x = self.instance_norm(self.hardswish(self.leaky(self.elu(x))))
        return self.softmax(self.layer_norm(self.bn(self.prelu(self.dropout(x)))))


class Volumes3d(nn.Module):
    """BN3d+ReLU, Conv3d(+ReLU), InstanceNorm3d, standalone BN3d, ConvTranspose3d."""

    def __init__(self, transpose: bool):
        super().__init__()
        self.bn_relu = nn.Sequential(nn.BatchNorm3d(3), nn.ReLU())
        self.conv_relu = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU())
        self.conv = nn.Conv3d(4, 4, 1, bias=False)
        self.instance_norm = nn.InstanceNorm3d(4)
        self.bn = nn.BatchNorm3d(4)
        self.convt = nn.ConvTranspose3d(4, 2, 2, stride=2) if transpose else nn.Identity()

    def forward(self, x):
        x = self.instance_norm(self.conv(self.conv_relu(self.bn_relu(x))))
        return self.convt(self.bn(torch.sigmoid(x)))


class Signals1d(nn.Module):
    """Conv1d, Conv1d+ReLU, InstanceNorm1d, ConvTranspose1d (grouped)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.conv_relu = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1, groups=2), nn.ReLU())
        self.instance_norm = nn.InstanceNorm1d(6, affine=True)
        self.convt = nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2)

    def forward(self, x):
        return self.convt(self.instance_norm(self.conv_relu(self.conv(x))))


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(12, 8)
        self.bag = nn.EmbeddingBag(12, 8, mode="sum")
        self.fc = nn.Linear(8, 4)

    def forward(self, indices, offsets):
        return self.fc(self.embedding(indices).sum(1) + self.bag(indices.flatten(), offsets))


class OnednnFusions(nn.Module):
    """Linear+LeakyReLU, Linear+Tanh, Conv2d+add, Conv2d+add+ReLU: the onednn backend's fusions."""

    def __init__(self):
        super().__init__()
        self.fc_leaky = nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.1))
        self.fc_tanh = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.conv_a, self.conv_b, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.ReLU()

    def forward(self, x, image):
        y = self.conv_a(image) + image
        z = self.relu(self.conv_b(y) + y)
        return self.fc_tanh(self.fc_leaky(x)), z


class QatKinds(nn.Module):
    """Every QAT module kind: Conv{1,2,3}d with and without BN and ReLU, Linear(+ReLU, +BN)."""

    def __init__(self):
        super().__init__()
        convs = []
        for conv, bn in ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d)):
            convs.append(nn.ModuleList([
                nn.Sequential(conv(3, 4, 3, padding=1, bias=False), bn(4), nn.ReLU()),  # ConvBnReLU
                nn.Sequential(conv(4, 4, 1), bn(4, eps=1e-3)),  # ConvBn
                nn.Sequential(conv(4, 4, 3, padding=1, groups=2), nn.ReLU()),  # ConvReLU
                conv(4, 3, 1),  # Conv
            ]))  # fmt: skip
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(6, 8)
        self.fc_relu = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU())
        self.fc_bn = nn.Sequential(nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5))

    def forward(self, x1, x2, x3, v):
        outs = []
        for blocks, x in zip(self.convs, (x1, x2, x3)):
            for block in blocks:
                x = block(x)
            outs.append(x)
        return (*outs, self.fc_bn(self.fc_relu(self.fc(v))))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _embedding_mapping(qat: bool) -> QConfigMapping:
    base = get_default_qat_qconfig_mapping("fbgemm") if qat else get_default_qconfig_mapping("fbgemm")
    qconfig = default_embedding_qat_qconfig if qat else float_qparams_weight_only_qconfig
    return base.set_object_type(nn.Embedding, qconfig).set_object_type(nn.EmbeddingBag, qconfig)


def _onednn_mapping(qat: bool) -> QConfigMapping:
    """onednn's global qconfig only: fusing Linear+Tanh needs one qconfig for both parts (the
    default mapping gives Tanh fixed qparams)."""
    default = (get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping)("onednn")
    return QConfigMapping().set_global(default.global_qconfig)


def _embedding_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (3, 5), generator=g), torch.tensor([0, 4, 9])


def _per_channel_dynamic_mapping(qat: bool) -> QConfigMapping:
    from torch.ao.quantization import per_channel_dynamic_qconfig as q

    return QConfigMapping().set_object_type(nn.Linear, q).set_object_type(nn.ReLU, q)


# name -> (model builder, inputs(seed), prepare mapping(qat), backend_config, QAT too?, engines)
MODULE_CASES = {
    "activations2d": (Activations2d, lambda s: (_randn(2, 4, 6, 6, seed=s),),
                      lambda qat: get_default_qconfig_mapping("fbgemm"), None, False, ("fbgemm", "qnnpack")),
    "volumes3d": (lambda: Volumes3d(True), lambda s: (_randn(2, 3, 4, 4, 4, seed=s),),
                  lambda qat: get_default_qconfig_mapping("fbgemm"), None, False, ("fbgemm",)),
    "volumes3d_qnnpack": (lambda: Volumes3d(False), lambda s: (_randn(2, 3, 4, 4, 4, seed=s),),
                          lambda qat: get_default_qconfig_mapping("qnnpack"), None, False, ("qnnpack",)),
    "signals1d": (Signals1d, lambda s: (_randn(2, 4, 12, seed=s),),
                  lambda qat: get_default_qconfig_mapping("qnnpack"), None, False, ("qnnpack",)),
    "embeddings": (Embeddings, _embedding_inputs, _embedding_mapping, None, True, ("x86",)),
    "onednn_fusions": (OnednnFusions, lambda s: (_randn(3, 16, seed=s), _randn(2, 4, 6, 6, seed=s + 1)),
                       _onednn_mapping, get_onednn_backend_config(), True,
                       ("onednn",)),
    "dynamic": (lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                lambda s: (_randn(3, 16, seed=s),), SETUPS["dynamic_linear"].mapping, None, False, ("fbgemm",)),
    "dynamic_per_channel": (lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                            lambda s: (_randn(3, 16, seed=s),), _per_channel_dynamic_mapping, None, False,
                            ("qnnpack", "onednn")),
    "float16": (lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                lambda s: (_randn(3, 16, seed=s),), SETUPS["float16_linear"].mapping, None, False, ("fbgemm", "x86")),
    "qat_kinds": (QatKinds, lambda s: (_randn(2, 3, 8, seed=s), _randn(2, 3, 6, 6, seed=s + 1),
                                       _randn(2, 3, 4, 4, 4, seed=s + 2), _randn(4, 6, seed=s + 3)),
                  lambda qat: (get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping)("fbgemm"),
                  None, True, ("fbgemm",)),
}  # fmt: skip


# what each case must lower to (so that a case cannot pass by staying float)
EXPECTED = {
    "activations2d": {nniq.BNReLU2d, nnq.BatchNorm2d, nnq.Conv2d, nnq.Dropout, nnq.ELU, nnq.Hardswish,
                      nnq.InstanceNorm2d, nnq.LayerNorm, nnq.LeakyReLU, nnq.PReLU, nnq.Softmax},
    "volumes3d": {nniq.BNReLU3d, nnq.BatchNorm3d, nnq.Conv3d, nniq.ConvReLU3d, nnq.ConvTranspose3d,
                  nnq.InstanceNorm3d},
    "volumes3d_qnnpack": {nniq.BNReLU3d, nnq.BatchNorm3d, nnq.Conv3d, nniq.ConvReLU3d, nnq.InstanceNorm3d},
    "signals1d": {nnq.Conv1d, nniq.ConvReLU1d, nnq.ConvTranspose1d, nnq.InstanceNorm1d},
    "embeddings": {nnq.Embedding, nnq.EmbeddingBag, nnq.Linear},
    "onednn_fusions": {nniq.LinearLeakyReLU, nniq.LinearTanh, nniq.ConvAdd2d, nniq.ConvAddReLU2d},
    "dynamic": {nnqd.Linear, nniqd.LinearReLU},
    "dynamic_per_channel": {nnqd.Linear, nniqd.LinearReLU},
    "float16": {nnqd.Linear, nniqd.LinearReLU},
    "qat_kinds": {nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d,
                  nnq.Linear, nniq.LinearReLU},
}  # fmt: skip


def _prepare_module_case(name, qat):
    build, inputs, mapping, backend_config, _, _ = MODULE_CASES[name]
    torch.manual_seed(0)
    model = build()
    example = inputs(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if qat:
            model = prepare_qat_fx(model.train(), mapping(True), example, backend_config=backend_config)
        else:
            model = prepare_fx(model.eval(), mapping(False), example, backend_config=backend_config)
        with torch.no_grad():
            for seed in (1, 2, 3):
                model(*inputs(seed))
    return model.eval(), inputs, backend_config


def _module_cases():
    out = []
    for name, (*_, with_qat, case_engines) in MODULE_CASES.items():
        for qat in (False, True) if with_qat else (False,):
            out += [pytest.param(name, qat, e, id=f"{name}-{'qat' if qat else 'ptq'}-on-{e}")
                    for e in case_engines if e in engines()]  # fmt: skip
    return out


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _kinds(gm):
    return sorted(f"{type(m).__module__}.{type(m).__qualname__}" for m in gm.modules())


@pytest.mark.parametrize("name,qat,engine", _module_cases())
def test_builders_equal_torch_beyond_the_zoo(name, qat, engine):
    """Reference model (state dict, outputs) and lowered model (module classes, outputs) equal
    torch's bit for bit, converted by qref under the watcher."""
    model, inputs, backend_config = _prepare_module_case(name, qat)
    with use_engine(engine, threads=1):
        with Watcher() as w:
            ours_ref = convert_to_reference_fx(model, backend_config=backend_config)
            ours = convert_fx(model, backend_config=backend_config)
        assert w.calls == [] and w.seen > 100, sorted(set(w.calls))
        theirs_ref = torch_reference_fx(copy.deepcopy(model), backend_config=backend_config)
        theirs = torch_convert_fx(copy.deepcopy(model), backend_config=backend_config)
        ours_state, theirs_state = ours_ref.state_dict(), theirs_ref.state_dict()
        assert ours_state.keys() == theirs_state.keys()
        for key, value in theirs_state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours_state[key], value), key
            else:  # qscheme, dtype entries of reference modules
                assert ours_state[key] == value, key
        assert _kinds(ours) == _kinds(theirs)
        missing = EXPECTED[name] - {type(m) for m in ours.modules()}
        assert not missing, missing
        with torch.no_grad():
            for seed in (7, 8):
                batch = inputs(seed)
                assert _equal(ours_ref(*batch), theirs_ref(*batch))
                assert _equal(ours(*batch), theirs(*batch))


@pytest.mark.parametrize("backend_config", [get_native_backend_config, get_fbgemm_backend_config,
                                            get_qnnpack_backend_config, get_x86_backend_config,
                                            get_onednn_backend_config])  # fmt: skip
def test_every_qat_class_of_the_backends_has_a_float_form(backend_config):
    """qref's own QAT -> float table knows every QAT module torch's backends prepare."""
    missing = set(backend_patterns(backend_config()).qat_classes) - set(_QAT_TO_FLOAT)
    assert not missing, missing


def test_every_weighted_module_the_lowering_builds_is_compared_with_torch():
    """Each quantized class of lower.py's weighted tables is built in one of the cases above."""
    built = set(lower.STATIC.values()) | set(lower.DYNAMIC.values()) | set(lower.WEIGHT_ONLY.values())
    for table in (lower.STATIC_FUSED, lower.TWO_INPUT_FUSED, lower.DYNAMIC_FUSED):
        built |= {cls for _, cls in table.values()}
    untested = built - set().union(*EXPECTED.values())
    assert not untested, untested
