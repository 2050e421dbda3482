"""Which converter the property suite checks, and calling it so that misbehaviour is reported.

A converter is a callable with the contract of the function it replaces:

* pt2e: ``convert(model, use_reference_representation=False, fold_quantize=True)`` returning a
  ``torch.fx.GraphModule``;
* fx: ``convert(model, convert_custom_config=None, _remove_qconfig=True, qconfig_mapping=None,
  backend_config=None)`` returning an ``nn.Module``.

It is named by a built-in name (:data:`BUILTINS`), as ``module:attribute`` (importable from the
current directory and ``PYTHONPATH``), or by a name registered under the entry-point group
``qref.converters``.  :func:`resolve` validates the name at start-up and fails with a one-line
:class:`UsageError` that says what to fix.  Keyword arguments of the contract that a converter
does not accept are not passed (and not exercised): :attr:`Converter.accepted` says which are.

Nothing here imports torch until a converter is resolved or called.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "BUILTINS",
    "CONTRACTS",
    "DEFAULT_FOR_FLOW",
    "ENTRY_POINT_GROUP",
    "FLOWS",
    "Converter",
    "ConverterMisbehaved",
    "UsageError",
    "call_guarded",
    "global_state",
    "observe_calls",
    "resolve",
]

FLOWS = ("pt2e", "fx")
ENTRY_POINT_GROUP = "qref.converters"

# Keyword arguments of each flow's contract, in signature order.
CONTRACTS: dict[str, tuple[str, ...]] = {
    "pt2e": ("use_reference_representation", "fold_quantize"),
    "fx": ("convert_custom_config", "_remove_qconfig", "qconfig_mapping", "backend_config"),
}


class UsageError(Exception):
    """The converter cannot be used as named; the message is one line saying what to fix."""


class ConverterMisbehaved(Exception):
    """The converter raised, timed out, returned the wrong type, exited or changed global state.

    ``kind`` is one of ``"raised"``, ``"timeout"``, ``"wrong-type"``, ``"exited"`` (it called
    ``sys.exit``), ``"changed-global-state"`` (it left torch's process-wide settings changed; they
    are restored before this is raised).  A property that lets this propagate fails with a
    message that says which.
    """

    KINDS = ("raised", "timeout", "wrong-type", "exited", "changed-global-state")

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)  # the property's failure says "the converter <kind>: <message>"
        self.kind = kind
        self.message = message


# --- built-ins: name -> (flow, loader); loaders import lazily -----------------------------------


def _qref_pt2e() -> Callable:
    from qref.pt2e import convert_pt2e

    return convert_pt2e


def _torchao_pt2e() -> Callable:
    from qref import _torchao_patterns
    from qref._quiet import import_torchao_quietly

    import_torchao_quietly()
    # Memoises torchao's pattern exports (~25 s per QAT convert otherwise); converted graphs
    # are identical with and without it (tests/test_fixtures.py).
    _torchao_patterns.enable()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e


def _qref_fx() -> Callable:
    from qref.fx import convert_fx

    return convert_fx


def _torch_fx() -> Callable:
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx


BUILTINS: dict[str, tuple[str, Callable[[], Callable]]] = {
    "qref-pt2e": ("pt2e", _qref_pt2e),
    "torchao-pt2e": ("pt2e", _torchao_pt2e),
    "qref-fx": ("fx", _qref_fx),
    "torch-fx": ("fx", _torch_fx),
}
DEFAULT_FOR_FLOW = {"pt2e": "qref-pt2e", "fx": "qref-fx"}


@dataclass(frozen=True)
class Converter:
    """A resolved converter: what was named, its flow, the callable and the kwargs it accepts."""

    target: str
    flow: str
    fn: Callable
    accepted: frozenset[str]

    @property
    def not_exercised(self) -> tuple[str, ...]:
        """Contract keyword arguments the converter does not accept (so the suite cannot vary)."""
        return tuple(k for k in CONTRACTS[self.flow] if k not in self.accepted)

    def accepts(self, name: str) -> bool:
        return name in self.accepted

    def __call__(self, model, **kwargs):
        unknown = set(kwargs) - set(CONTRACTS[self.flow])
        if unknown:
            raise TypeError(
                f"{sorted(unknown)} are not keyword arguments of the {self.flow} converter contract"
            )
        return self.fn(model, **{k: v for k, v in kwargs.items() if k in self.accepted})

    def __str__(self) -> str:
        return f"{self.target} ({self.flow})"


# --- resolution ----------------------------------------------------------------------------------


def resolve(target: str, flow: str | None = None) -> Converter:
    """The converter named ``target``, checked against ``flow`` (inferred when ``None``).

    Raises :class:`UsageError` with a one-line message when the name cannot be used.
    """
    if flow is not None and flow not in FLOWS:
        raise UsageError(f"unknown flow {flow!r}: use one of {', '.join(FLOWS)}")
    if not target or not target.strip():
        raise UsageError(f"no converter named: give a built-in ({_builtin_names()}) or module:attribute")
    target = target.strip()

    if target in BUILTINS:
        builtin_flow, load = BUILTINS[target]
        if flow is not None and flow != builtin_flow:
            raise UsageError(
                f"converter {target!r} is {_a(builtin_flow)} converter, not {flow}: drop the flow, "
                f"or name a converter of the {flow} flow ({_builtin_names(flow)} or module:attribute)"
            )
        fn = load()
        return Converter(target, builtin_flow, fn, _accepted(fn, builtin_flow))

    if ":" in target:
        fn = _load_module_attribute(target)
    else:
        fn = _load_entry_point(target)

    if isinstance(fn, Converter):  # an entry point may register a ready Converter
        if flow is not None and flow != fn.flow:
            raise UsageError(f"converter {target!r} is {_a(fn.flow)} converter, not {flow}")
        return fn
    if not callable(fn):
        raise UsageError(
            f"{target!r} is a {type(fn).__name__}, not a callable: name a function "
            f"convert(model, ...) with the {flow or 'pt2e/fx'} converter contract"
        )
    _check_takes_model(target, fn)
    flow = _flow_of(target, fn, flow)
    return Converter(target, flow, fn, _accepted(fn, flow))


def _a(flow: str) -> str:
    return f"an {flow}" if flow == "fx" else f"a {flow}"


def _builtin_names(flow: str | None = None) -> str:
    return ", ".join(n for n, (f, _) in BUILTINS.items() if flow is None or f == flow)


def _load_module_attribute(target: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise UsageError(f"{target!r} is not module:attribute (e.g. mypkg.quant:convert)")
    # Like `python -m`: the current directory is importable, as is PYTHONPATH (already on sys.path).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import module {module_name!r} (from {target!r}): install it, or run from "
                f"its directory or add that to PYTHONPATH"
            ) from None
        raise UsageError(
            f"importing {module_name!r} failed: it needs module {exc.name!r}, which is not installed"
        ) from None
    except Exception as exc:  # the user's module is broken: say how, in one line
        raise UsageError(
            f"importing {module_name!r} raised {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"module {module_name!r} has no attribute {attr_path!r}: check the name after ':'"
            )
        obj = getattr(obj, part)
    return obj


def _load_entry_point(target: str) -> Any:
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == target]
    if not found:
        registered = sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise UsageError(
            f"unknown converter {target!r}: use a built-in ({_builtin_names()}), module:attribute, "
            f"or a name registered under the entry-point group {ENTRY_POINT_GROUP} "
            f"({', '.join(registered) if registered else 'none installed'})"
        )
    try:
        return found[0].load()
    except Exception as exc:
        raise UsageError(
            f"entry point {target!r} ({found[0].value}) failed to load: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _check_takes_model(target: str, fn: Callable) -> None:
    sig = _signature(fn)
    if sig is None:
        return
    try:
        sig.bind_partial(object())
    except TypeError:
        raise UsageError(
            f"{target!r} cannot be called as convert(model): its signature is {sig}"
        ) from None


def _accepted(fn: Callable, flow: str) -> frozenset[str]:
    sig = _signature(fn)
    if sig is None:
        return frozenset(CONTRACTS[flow])
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset(CONTRACTS[flow])
    keywords = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return frozenset(k for k in CONTRACTS[flow] if k in keywords)


def _flow_of(target: str, fn: Callable, flow: str | None) -> str:
    """The flow given, checked against what the callable says; else inferred from it."""
    declared = getattr(fn, "qref_flow", None)  # a converter may declare its flow
    if declared is not None and declared not in FLOWS:
        raise UsageError(f"{target!r} declares qref_flow={declared!r}; use one of {', '.join(FLOWS)}")
    sig = _signature(fn)
    names = set(sig.parameters) if sig is not None else set()
    by_signature = {f for f in FLOWS if names & set(CONTRACTS[f])}
    inferred = declared or (by_signature.pop() if len(by_signature) == 1 else None)
    if flow is None:
        if inferred is None:
            raise UsageError(
                f"cannot tell whether {target!r} is a pt2e or an fx converter: give the flow "
                f"(--flow pt2e|fx)"
            )
        return inferred
    if inferred is not None and inferred != flow:
        raise UsageError(
            f"{target!r} looks like {_a(inferred)} converter "
            f"({'declared' if declared else 'by its keyword arguments'}), not {flow}: fix the flow"
        )
    return flow


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def where_raised(exc: BaseException) -> str:
    """`` (at torch/ao/nn/.../batchnorm.py:39 in from_reference)``: the innermost frame of ``exc``
    (path below site-packages), so a report, and an expectation, can name the code that raised."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {frame.filename.split('site-packages/')[-1]}:{frame.lineno} in {frame.name})"


def describe_error(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``, then what it wraps (``_root_cause``): one
    line that names the code that raised, for a report and for an expectation's pattern."""
    return f"{type(exc).__name__}: {_one_line(exc)}{where_raised(exc)}{_root_cause(exc)}"


def _root_cause(exc: BaseException) -> str:
    """``; from KeyError: ... (at ...)``: the exception a wrapper (a pass manager, a compiler)
    raised ``exc`` from, which says what went wrong; empty when nothing wraps it."""
    inner, seen = exc, {id(exc)}
    while (getattr(inner, "inner_exception", None) or inner.__cause__) is not None:
        inner = getattr(inner, "inner_exception", None) or inner.__cause__
        if id(inner) in seen:  # `raise e from e`: a cycle
            break
        seen.add(id(inner))
    if inner is exc:
        return ""
    return f"; from {type(inner).__name__}: {_one_line(inner)}{where_raised(inner)}"


# --- calling -------------------------------------------------------------------------------------


class _Timeout(BaseException):
    # BaseException, so that a converter's own `except Exception` cannot swallow it.
    pass


def _can_time_out() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_guarded(converter: Converter, model, *, timeout: float | None = None, **kwargs):
    """``converter(model, **kwargs)``; misbehaviour becomes :class:`ConverterMisbehaved`.

    ``timeout`` (seconds) is enforced with SIGALRM in the main thread; elsewhere (and on platforms
    without ``setitimer``) the call runs without a limit.  A timer already running (e.g.
    pytest-timeout's) is restored afterwards with its remaining time.

    A ``sys.exit()`` inside the converter is kind ``"exited"``.  The torch settings of
    :func:`global_state` are read as the call starts: whatever the converter changed is written
    back however the call ends, and, when it returned, is kind ``"changed-global-state"`` naming
    each change (``quantized engine fbgemm -> qnnpack, threads 2 -> 1``).  A crash of the process
    itself cannot be caught here: ``qref check`` runs the suite in a worker process that is
    replaced when it dies (:mod:`qref.isolation`).
    """
    if timeout is not None and timeout > 0 and _can_time_out():
        result = _call_with_alarm(converter, model, timeout, kwargs)
    else:
        result = _call(converter, model, kwargs)
    _check_type(converter, result)
    return result


def _call(converter: Converter, model, kwargs):
    before = global_state()
    observer = _observer
    if observer is not None:
        observer(True)
    try:
        result = converter(model, **kwargs)
    except (_Timeout, KeyboardInterrupt):
        _restore(before)
        raise
    except SystemExit as exc:
        # BaseException: `except Exception` misses it, and it would end the suite's process
        _restore(before)
        raise ConverterMisbehaved("exited", f"converter called {_exit_call(exc)}") from None
    except Exception as exc:
        _restore(before)
        raise ConverterMisbehaved(
            "raised", f"{converter.target} raised {describe_error(exc)}"
        ) from exc
    finally:
        if observer is not None:
            observer(False)
    changed = _restore(before)
    if changed:
        raise ConverterMisbehaved("changed-global-state", f"converter changed global state: {changed}")
    return result


def _exit_call(exc: SystemExit) -> str:
    return "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"


# --- process-global state a converter must leave as it found it --------------------------------
#
# (name in messages, read, write, format).  Properties compare kernels under a pinned engine and
# thread count, in float32, with grad mode as the property set it: a converter that changes these
# for the rest of the process changes what the following properties measure.  Each is read and,
# if changed, written back around every converter call (a few microseconds).


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _state_items():
    import torch

    return (
        ("quantized engine", lambda: torch.backends.quantized.engine,
         lambda v: setattr(torch.backends.quantized, "engine", v), str),
        ("threads", torch.get_num_threads, torch.set_num_threads, str),
        ("default dtype", torch.get_default_dtype, torch.set_default_dtype, str),
        ("grad mode", torch.is_grad_enabled, torch.set_grad_enabled, _on_off),
        ("deterministic algorithms",
         lambda: (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1]),
         lambda v: ("warn only" if v[1] else "on") if v[0] else "off"),
        ("float32 matmul precision", torch.get_float32_matmul_precision,
         torch.set_float32_matmul_precision, str),
        ("anomaly detection", lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
         lambda v: torch.set_anomaly_enabled(*v), lambda v: _on_off(v[0])),
    )  # fmt: skip


_STATE_ITEMS = None


def global_state() -> dict:
    """The process-global torch settings a converter must not change, by name."""
    global _STATE_ITEMS
    if _STATE_ITEMS is None:
        _STATE_ITEMS = _state_items()
    return {name: read() for name, read, _, _ in _STATE_ITEMS}


def _restore(before: dict) -> str:
    """Write back what changed since ``before``; say what (``""``: nothing changed)."""
    changes = []
    for name, read, write, show in _STATE_ITEMS:
        now = read()
        if now != before[name]:
            changes.append(f"{name} {show(before[name])} -> {show(now)}")
            try:
                write(before[name])
            except Exception as exc:  # noqa: BLE001 - say so rather than hide it
                changes[-1] += f" (not restored: {type(exc).__name__}: {_one_line(exc)})"
    return ", ".join(changes)


_observer: Callable[[bool], None] | None = None


def observe_calls(observer: Callable[[bool], None] | None) -> Callable[[bool], None] | None:
    """Have ``observer(True)`` called as each converter call starts and ``observer(False)`` as it
    ends (``None``: stop); returns the previous observer.  ``qref.isolation`` uses it to tell a
    crash inside the converter from one elsewhere."""
    global _observer
    previous, _observer = _observer, observer
    return previous


def _call_with_alarm(converter: Converter, model, timeout: float, kwargs):
    def on_alarm(signum, frame):
        raise _Timeout()

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return _call(converter, model, kwargs)
    except _Timeout:
        raise ConverterMisbehaved(
            "timeout", f"{converter.target} did not return within {timeout:g} s"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def _check_type(converter: Converter, result) -> None:
    import torch

    expected = torch.fx.GraphModule if converter.flow == "pt2e" else torch.nn.Module
    if not isinstance(result, expected):
        raise ConverterMisbehaved(
            "wrong-type",
            f"{converter.target} returned {type(result).__module__}.{type(result).__qualname__}, "
            f"expected {expected.__module__}.{expected.__qualname__}",
        )
