"""Property family 2 (equivalence) on real architectures: transformers' models, built from configs.

The model-tier properties of ``test_equivalence`` on networks qref draws layer by layer; these on
the networks people quantize: MobileNetV2, MobileNetV1, ResNet, ConvNeXt, ViT, BERT and DistilBERT
(``qref.strategies.architectures``), built in code from ``transformers`` configs with random seeded
weights (nothing is downloaded) at drawn small sizes, converted by the candidate and by qref's
reference and compared exactly at every quantize point.  Text models take int64 token ids (drawn
from the vocabulary) and keep their embedding lookup float.

They need the ``models`` extra (``pip install qref[models]``): without ``transformers`` they are
reported "not run: install qref[models]".  They are not run at the ``quick`` profile (a real
architecture costs seconds per example, MobileNetV2 the most); ``default`` and ``thorough`` run
them (3 and 30 examples).
"""

from __future__ import annotations

import pytest
from hypothesis import reject, settings
from hypothesis import strategies as st

from qref.strategies.architectures import (
    FAMILIES, FX_TRACEABLE, MODELS_EXTRA_MISSING, fx_trace_error, models_available,
)

from ._support import prop, subject  # noqa: F401 (subject: fixture)
from .test_equivalence import _fx_matches_reference, _pt2e_matches_reference

pytestmark = pytest.mark.qref_family("equivalence")

QUICK_PROFILE_SKIP = "not run at the quick profile: real architectures take minutes; use --profile default"

@pytest.fixture(autouse=True)
def architectures_available():
    """Skip (visibly, with the reason in the report) where these properties cannot or should not run."""
    if not models_available():
        pytest.skip(MODELS_EXTRA_MISSING)
    if settings.get_current_profile_name() == "quick":
        pytest.skip(QUICK_PROFILE_SKIP)


@prop("pt2e", "architectures", fold_quantize=st.booleans())
def test_architecture_matches_reference(subject, case, fold_quantize):
    """PTQ and QAT, X86InductorQuantizer and QrefQuantizer setups (every one that quantizes the
    family: all do), exactly as ``test_model_matches_reference``."""
    _pt2e_matches_reference(subject, case, fold_quantize)


@prop("fx", "architectures", kinds=FX_TRACEABLE + tuple(f for f in FAMILIES if f not in FX_TRACEABLE))
def test_fx_architecture_matches_reference(subject, case):
    """Lowered on the setup's engine, exactly at every lowered module and op, as
    ``test_fx_model_matches_reference``.  Only MobileNetV2/V1 without ``tf_padding`` trace with
    torch.fx (prepare_fx's tracer); any other example is "not compared: does not trace with
    torch.fx" and drawn again."""
    if fx_trace_error(case.spec) is not None:
        subject.not_compared("does not trace with torch.fx")
        reject()
    _fx_matches_reference(subject, case)
