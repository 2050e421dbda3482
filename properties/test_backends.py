"""Property family 4 (kernels), pt2e: a converted model lowered by a real backend.

``qref check CONVERTER --backend NAME`` (``inductor``, ``module:attr`` or an entry point of
``qref.backends``, see ``qref.backends``): the converter's q/dq graph is lowered by the backend
and run; each output must stay within the backend's contract of qref's reference conversion of
the same prepared model, in LSB of that output's scale.  Where a backend's kernels depart from
exact arithmetic in a documented way here (its ``kernel_forms``: inductor's int16 pairs on a CPU
without VNNI), an output outside the contract is judged against the reference written that way.  A lowered program shows only its
outputs, so a layer's error is seen through the layers after it (the contract allows for each
requantization on the way).  Without ``--backend`` the family is reported "not run".
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from qref.compare import compare_outputs
from qref.converters import describe_error

from ._support import prop, subject  # noqa: F401 (subject: fixture)

pytestmark = [pytest.mark.qref_family("kernels"), pytest.mark.qref_flow("pt2e")]

NO_BACKEND = "not run: choose a backend with --backend inductor (or module:attr, see qref.backends)"


def pytest_generate_tests(metafunc):  # noqa: D103 - the backends this run lowers with (--qref-backend)
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("qref_backend", None) or [None]
        metafunc.parametrize("backend", chosen, ids=[b or "none" for b in chosen])


def _backend(name):
    if name is None:
        pytest.skip(NO_BACKEND)
    from qref.backends import BackendError, resolve

    try:
        backend = resolve(name)
    except BackendError as error:
        pytest.fail(str(error), pytrace=False)
    missing = backend.missing()
    if missing:
        pytest.skip(missing)
    return backend


@prop("pt2e", "patterns", specs="models", data=st.data())  # the case is drawn for the backend's scheme
def test_lowered_within_backend_contract(subject, backend, data):
    lowering = _backend(backend)
    subject.drew(backend=backend)  # data: only the case (a replay passes it)
    where = (lambda case: lowering.accepts(case.setup)) if lowering.accepts else None
    case = data.draw(subject.cases(where=where), label="case")
    if lowering.scope:
        subject.record.note(f"{lowering.name}: {lowering.scope}")
    reference = subject.reference(case)
    converted = subject.convert(case)
    try:
        run = lowering.lower(converted, case.inputs[0])
    except Exception as error:  # noqa: BLE001 - the converter's graph and the backend, together
        subject.fail(case, f"{lowering.name} cannot lower the converted model: {describe_error(error)}")
    tolerance = subject.tolerance(lowering.contract)
    result = compare_outputs(reference, run, case.inputs, tolerance, float_relative=lowering.float_relative)
    if not result.ok:
        result = _kernel_form_judgement(subject.record, lowering, reference, run, case, tolerance) or result
    subject.record.lsb(result.max_lsb)
    if not result.ok:
        subject.fail(case, f"lowered by {lowering.name}, an output leaves the backend's contract:\n"
                     f"{result.message()}", comparison=result)


def _kernel_form_judgement(record, lowering, reference, run, case, tolerance):
    """The comparison with the first of the backend's kernel forms (here) the output is within the
    contract of, noted with its cause; None if none explains it."""
    for kernel_form in lowering.kernel_forms:
        if not kernel_form.here():
            continue
        for form in kernel_form.forms(reference):
            if not _departs(form, reference, case.inputs):
                continue  # the form computes what the reference does here: it explains nothing
            again = compare_outputs(form, run, case.inputs, tolerance, float_relative=lowering.float_relative)
            if again.ok:
                record.note(f"{lowering.name}, {kernel_form.name}: {kernel_form.cause}")
                return again
    return None


def _departs(form, reference, batches) -> bool:
    """Whether ``form`` computes anything other than ``reference`` on ``batches``."""
    import torch

    def flat(out):
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return any(not torch.equal(a, b) for args in batches
               for a, b in zip(flat(form(*args)), flat(reference(*args))))
