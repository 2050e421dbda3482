"""qref: a reference converter and verification suite for PyTorch quantization conversion.

The public names are imported on first use (PEP 562): ``import qref`` alone must not import
torch, because pytest imports ``qref.plugin`` (and so this package) in every session of every
project where qref is installed, and the plugin is inert unless asked for.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "convert_fx": ".fx",
    "convert_pt2e": ".pt2e",
    "convert_to_reference_fx": ".fx",
    "fold_conv_bn": ".fold",
    "use_engine": ".engines",
}

__all__ = sorted([*_EXPORTS, "engines"])
__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does this on demand
    from . import engines
    from .engines import use_engine
    from .fold import fold_conv_bn
    from .fx import convert_fx, convert_to_reference_fx
    from .pt2e import convert_pt2e


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableModule(types.ModuleType):
    """A module that can be called: ``qref.engines()`` lists the engines that run here, while
    ``qref.engines.use_engine``, ``qref.engines.has_vnni`` and the rest are the module's names."""

    def __call__(self, *args, **kwargs):
        return self.engines(*args, **kwargs)


class _Package(types.ModuleType):
    """``qref.engines`` is the module qref/engines.py, callable as its function ``engines()``,
    whichever was imported first (importing a submodule binds it on its package: the setter
    ignores that binding, the getter always hands out the callable module)."""

    @property
    def engines(self):
        module = importlib.import_module(".engines", __name__)
        if not isinstance(module, _CallableModule):
            module.__class__ = _CallableModule
        return module

    @engines.setter
    def engines(self, value):
        pass


sys.modules[__name__].__class__ = _Package
