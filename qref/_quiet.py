"""Import torchao without its harmless import-time noise.

torchao logs ``Failed to load .../_C_*.so`` through the ``torchao`` logger when
its optional CUDA/cutlass extensions cannot be loaded on a CPU-only machine,
and importing it makes torch's pytree module log
``<enum 'KernelPreference'> is an Enum subclass ...`` through the
``torch.utils._pytree`` logger.  Neither says anything about the user's
models, so :func:`import_torchao_quietly` raises those loggers' levels for the
duration of the import and restores them afterwards.

This module must not import anything else from qref.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Iterator

__all__ = ["import_torchao_quietly", "quiet_loggers", "silence_noise"]

# Loggers that are noisy while torchao is being imported.
_NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(
    names: tuple[str, ...] = _NOISY_IMPORT_LOGGERS, level: int = logging.ERROR
) -> Iterator[None]:
    """Raise the level of the named loggers to ``level``; restore on exit."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            # Never lower a level the user set higher than ours.
            if lg.getEffectiveLevel() < level:
                lg.setLevel(level)
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def import_torchao_quietly(*submodules: str) -> ModuleType:
    """Import ``torchao`` and ``torchao.quantization.pt2e`` (and ``submodules``) quietly.

    ``submodules`` are further modules to import under the same silence, e.g.
    ``"torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"`` (which
    pulls in torch._inductor and its ``torch.jit.script_method``
    DeprecationWarnings).  Idempotent: once everything is imported this is a
    few dictionary lookups.  Returns the ``torchao`` module.  Import errors
    propagate unchanged.
    """
    names = ("torchao", "torchao.quantization.pt2e", *submodules)
    if all(n in sys.modules for n in names):
        return sys.modules["torchao"]
    with quiet_loggers(), warnings.catch_warnings():
        # torch.utils.mkldnn (reached via torch._inductor) uses
        # torch.jit.script_method, deprecated in torch 2.13
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, message=r".*torch\.jit\.script_method.*"
        )
        for n in names:
            importlib.import_module(n)
    return sys.modules["torchao"]


def silence_noise() -> None:
    """Install warnings filters for known, harmless torch/torchao warnings.

    Idempotent (re-adding a filter replaces it) and cheap, so call it where the
    noise happens: ``warnings.catch_warnings`` blocks (pytest wraps every test
    in one) drop filters added inside them.  Covers the ``FutureWarning``
    torch's pytree emits about ``isinstance(treespec, LeafSpec)`` when
    exported modules are deep-copied.
    """
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r".*isinstance\(treespec, LeafSpec\).*"
    )
