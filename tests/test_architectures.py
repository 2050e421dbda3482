"""The real-architecture tier (qref.strategies.architectures, properties/test_architectures.py).

Every family at its smallest drawn size exports, prepares and converts with qref's pt2e reference;
the property runs against qref-pt2e at the default profile and compares examples; without the
``models`` extra, and at the quick profile, the properties say why they did not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROPERTIES = ROOT / "properties" / "test_architectures.py"


def _smallest(family: str):
    from hypothesis import find, settings

    from qref.strategies.architectures import architecture_specs

    return find(architecture_specs([family]), lambda spec: True, settings=settings(database=None))


def _families():
    from qref.strategies.architectures import FAMILIES

    return FAMILIES


@pytest.mark.parametrize("family", _families())
def test_smallest_of_each_family_exports_prepares_and_converts(family):
    pytest.importorskip("transformers", reason="not run: install qref[models]")
    import torch

    import qref
    from qref.strategies.cases import Case
    from qref.strategies.setups import QuantSetup

    spec = _smallest(family)
    assert eval(repr(spec), {"ArchitectureSpec": type(spec)}) == spec  # repr rebuilds it
    x = spec.example_inputs(0)
    model = spec.build()
    assert not model.training
    with torch.no_grad():
        expected = model(*x)
        assert torch.equal(expected, spec.build()(*x))  # seeded: the same weights every build
    assert x[0].dtype == (torch.int64 if spec.text else torch.float32)
    setup = QuantSetup("pt2e", kind="qref", per_channel=True, act_dtype="int8", observer="minmax")
    case = Case(spec, setup, (x, spec.example_inputs(1)), (x,), ("example",))
    converted = qref.convert_pt2e(case.prepared())
    with torch.no_grad():
        out = converted(*x)
    assert out.shape == expected.shape
    if spec.text:
        assert out.shape == (*spec.input_shape, dict(spec.config).get("hidden_size", dict(spec.config).get("dim")))
    else:
        assert out.shape == (spec.input_shape[0], dict(spec.config)["num_labels"])
    quantizes = [n for n in converted.graph.nodes if "quantize_per" in str(n.target)]
    assert quantizes, f"{family}: qref's quantizer quantized nothing"


def _pytest(tmp_path: Path, *args: str, hide_transformers: bool = False):
    report = tmp_path / "report.json"
    path = [str(ROOT)]
    if hide_transformers:
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
        path.insert(0, str(blocker))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "pytest", str(PROPERTIES), "-q", "-p", "no:cacheprovider", "-n", "0",
               "--hypothesis-seed=0", "--qref-report", str(report), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout[-6000:] + done.stderr[-3000:]
    return done.returncode, (json.loads(report.read_text()) if report.exists() else {}), output


def test_architecture_property_compares_examples_against_qref_pt2e(tmp_path):
    pytest.importorskip("transformers", reason="not run: install qref[models]")
    status, report, output = _pytest(tmp_path, "--qref-converter", "qref-pt2e", "--qref-profile", "default",
                                     "-k", "test_architecture_matches_reference")
    assert status == 0, output
    (test,) = report["tests"]
    assert test["status"] == "passed", output
    assert test["compared"] >= 1, output
    assert report["all_hold"] is True


def test_without_the_models_extra_the_properties_say_install_it(tmp_path):
    status, report, output = _pytest(tmp_path, "--qref-converter", "qref-pt2e", "--qref-profile", "default",
                                     hide_transformers=True)
    assert status == 0, output  # a missing optional extra is no failure of the converter ...
    (test,) = report["tests"]  # (the fx property is deselected: another flow)
    assert test["status"] == "skipped" and test["reason"] == "not run: install qref[models]", output
    (row,) = report["properties"]
    assert row["reason"] == "not run: install qref[models]"
    assert "not run: install qref[models]" in output  # ... but the table says it was not run
    assert "skipped: not run" not in output


def test_quick_profile_leaves_them_out_visibly(tmp_path):
    status, report, output = _pytest(tmp_path, "--qref-converter", "qref-fx", "--qref-profile", "quick")
    assert status == 0, output
    (test,) = report["tests"]
    assert test["status"] == "skipped", output
    assert test["reason"].startswith("not run at the quick profile"), output
    assert "use --profile default" in output
