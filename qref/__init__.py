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
    "engines": ".engines",
    "fold_conv_bn": ".fold",
    "use_engine": ".engines",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does this on demand
    from .engines import engines, use_engine
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
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``qref.engines`` is the function, also after the submodule ``qref.engines`` is imported.

    Importing a submodule binds it as an attribute of its package; the eager ``from .engines
    import engines`` used to rebind the name right after.  Lazily, the submodule may be imported
    first (``from qref.engines import use_engine``), so this property keeps the name on the function.
    """

    @property
    def engines(self):
        from .engines import engines

        return engines

    @engines.setter
    def engines(self, value):  # the import system binding the submodule: keep the function
        pass


sys.modules[__name__].__class__ = _Package
