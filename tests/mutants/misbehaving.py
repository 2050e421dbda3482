"""pt2e converters that misbehave rather than compute wrongly: the suite must report each as a
failure of the property that ran it, and carry on."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import qref


def raises(model, use_reference_representation=False, fold_quantize=True):
    """Raises from inside the conversion."""
    raise RuntimeError("lowering pass exploded")


def hangs(model, use_reference_representation=False, fold_quantize=True):
    """Never returns (stopped by --timeout)."""
    while True:
        time.sleep(0.05)


def returns_wrong_type(model, use_reference_representation=False, fold_quantize=True):
    """Returns a plain nn.Module instead of a GraphModule."""
    return torch.nn.Identity()


def returns_nan(model, use_reference_representation=False, fold_quantize=True):
    """Returns a model whose output is NaN."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    output = next(n for n in converted.graph.nodes if n.op == "output")
    (result,) = output.args[0]
    with converted.graph.inserting_before(output):
        nan = converted.graph.call_function(torch.ops.aten.mul.Tensor, (result, float("nan")))
    output.args = ((nan,),)
    converted.recompile()
    return converted


def returns_unrunnable(model, use_reference_representation=False, fold_quantize=True):
    """Returns a graph that raises when called (a dangling shape mismatch)."""
    converted = qref.convert_pt2e(model, use_reference_representation, fold_quantize)
    output = next(n for n in converted.graph.nodes if n.op == "output")
    (result,) = output.args[0]
    with converted.graph.inserting_before(output):
        bad = converted.graph.call_function(torch.ops.aten.reshape.default, (result, [7, 11, 13]))
    output.args = ((bad,),)
    converted.recompile()
    return converted


# --- converters that harm the process they run in: counted calls, so the run gets going first ---

_CALLS: dict[str, int] = {}
CALLS_FILE = "QREF_MUTANT_CALLS"  # environment: a file that counts the calls of all the run's processes


def _call_number(name: str) -> int:
    """This call's number: in this process, or, with $QREF_MUTANT_CALLS, in the whole run (a
    crashed worker's replacement goes on counting, so the crash happens once)."""
    shared = os.environ.get(CALLS_FILE)
    if not shared:
        _CALLS[name] = _CALLS.get(name, 0) + 1
        return _CALLS[name]
    path = Path(f"{shared}.{name}")
    number = (int(path.read_text()) if path.exists() else 0) + 1
    path.write_text(str(number))
    return number


def segfaults_on_third_call(model, use_reference_representation=False, fold_quantize=True):
    """Converts correctly twice, then dies of SIGSEGV, as a buggy native lowering does."""
    if _call_number("segfaults_on_third_call") == 3:
        import ctypes

        ctypes.string_at(0)  # reads address 0: a real segmentation fault
    return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def exits_on_second_call(model, use_reference_representation=False, fold_quantize=True):
    """Converts correctly once, then calls sys.exit(0) (a CLI entry point used as a library)."""
    if _call_number("exits_on_second_call") == 2:
        sys.exit(0)
    return qref.convert_pt2e(model, use_reference_representation, fold_quantize)


def other_engine() -> str:
    """A quantized engine that runs here and is not the current one (qnnpack unless it is that)."""
    current = torch.backends.quantized.engine
    engines = [e for e in torch.backends.quantized.supported_engines if e not in (current, "none")]
    return "qnnpack" if "qnnpack" in engines else engines[0]


def changes_global_state(model, use_reference_representation=False, fold_quantize=True):
    """Converts correctly, but switches torch's quantized engine and pins one thread for the rest
    of the process (a lowering that configures the backend it targets and never puts it back)."""
    torch.backends.quantized.engine = other_engine()
    torch.set_num_threads(1)
    return qref.convert_pt2e(model, use_reference_representation, fold_quantize)
