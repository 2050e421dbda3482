"""Backends that run a converted pt2e model on real kernels (``qref check ... --backend NAME``).

A backend takes the converted q/dq graph a pt2e converter returned and lowers it to the kernels
it ships (``lower(converted, example_args) -> run``, where ``run(*args)`` returns the outputs);
the kernels family (``properties/test_backends.py``) compares what ``run`` returns with qref's
reference conversion of the same prepared model, in LSB of each output's scale, within the
backend's ``contract`` (a :class:`qref.compare.Tolerance` whose cause says what its kernels do).

Built-in: ``inductor`` (``torch.compile`` with freezing: onednn's quantized conv / linear
kernels on x86).  Others come as ``module:attr`` (a :class:`Backend`) or under the entry-point
group ``qref.backends``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable

from ..compare.tolerance import Tolerance

ENTRY_POINT_GROUP = "qref.backends"


@dataclass(frozen=True)
class KernelForm:
    """A documented way a backend's kernels depart from exact arithmetic, written as references of
    their own: ``forms(reference)`` rewrites qref's reference graph the way the kernels compute
    (``[]`` where the model has nothing it changes).  An output that leaves the contract is judged
    against those forms only where ``here()`` (e.g. on a CPU without VNNI), and passes only if it
    is within the contract of one of them."""

    name: str
    cause: str
    here: Callable[[], bool]
    forms: Callable

    def __post_init__(self) -> None:
        if not self.cause:
            raise ValueError(f"kernel form {self.name!r} needs a cause")


@dataclass(frozen=True)
class Backend:
    """A lowering and its contract: ``requires`` are the modules it imports, ``install`` says how
    to get them (the report's "not run: install ...")."""

    name: str
    lower: Callable
    contract: Tolerance
    requires: tuple[str, ...] = ()
    install: str = ""
    accepts: Callable | None = None  # QuantSetup -> whether the backend lowers its scheme (None: every one)
    scope: str = ""  # what ``accepts`` admits and why (the report's note)
    float_relative: float = 0.0  # float outputs: allowed difference / their largest magnitude
    float_cause: str = ""  # why (required when float_relative is set)
    kernel_forms: tuple[KernelForm, ...] = ()  # where its kernels depart from exact arithmetic, and how

    def __post_init__(self) -> None:
        if self.float_relative and not self.float_cause:
            raise ValueError(f"backend {self.name!r}: a float tolerance needs a cause")

    def missing(self) -> str | None:
        """Why it cannot run here ("not run: install ..."), or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not run: install {self.install or ' '.join(absent)}" if absent else None


class BackendError(ValueError):
    """A --backend that names nothing usable (a usage error)."""


def _inductor() -> Backend:
    from .inductor import CONTRACT, FLOAT_CAUSE, FLOAT_RELATIVE, KERNEL_FORMS, SCOPE, accepts, lower

    return Backend("inductor", lower, CONTRACT, accepts=accepts, scope=SCOPE, float_relative=FLOAT_RELATIVE,
                   float_cause=FLOAT_CAUSE, kernel_forms=KERNEL_FORMS)


BUILTINS: dict[str, Callable[[], Backend]] = {"inductor": _inductor}


def resolve(name: str) -> Backend:
    """The backend ``name``: a built-in, ``module:attr`` (a Backend), or an entry point."""
    if name in BUILTINS:
        return BUILTINS[name]()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise BackendError(f"--backend {name}: cannot import it ({error})") from None
    else:
        points = [e for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if e.name == name]
        if not points:
            raise BackendError(f"--backend {name}: not a built-in ({', '.join(BUILTINS)}), module:attr, "
                               f"or an entry point of {ENTRY_POINT_GROUP}")
        found = points[0].load()
    found = found() if callable(found) and not isinstance(found, Backend) else found
    if not isinstance(found, Backend):
        raise BackendError(f"--backend {name}: {type(found).__name__} is not a qref.backends.Backend")
    return found
