"""Every property in properties/ is declared with ``@prop`` (properties/_support.py): one tier
decides its tier marker, its example budget and the models its case draws, and the catalogue
(docs/properties.md) gives it that tier."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROPERTIES = sorted((ROOT / "properties").glob("test_*.py"))

# Run in a fresh interpreter on the "default" profile, so the budgets are known whatever profile
# this process loaded, and the modules are imported as the suite imports them.
_DUMP = r"""
import importlib, json, sys
import properties.conftest  # registers the profiles
from hypothesis import settings
settings.load_profile("default")
from properties._support import declared

out = []
for name in sys.argv[1:]:
    module = importlib.import_module(f"properties.{name}")
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    for attr, test in vars(module).items():
        if not attr.startswith("test_") or not callable(test):
            continue
        marks = [*getattr(test, "pytestmark", []), *module_marks]
        d = declared(test)
        handle = getattr(test, "hypothesis", None)
        given = getattr(handle, "_given_kwargs", None) or {}
        out.append({
            "module": name, "name": attr, "hypothesis": handle is not None,
            "declared": None if d is None else {"flow": d.flow, "tier": d.tier, "specs": d.specs,
                                                "variants": d.variants},
            "parametrized": [len(m.args[1]) for m in marks if m.name == "parametrize"],
            "tiers": sorted({m.args[0] for m in marks if m.name == "qref_tier"}),
            "flows": sorted({m.args[0] for m in marks if m.name == "qref_flow"}),
            "max_examples": getattr(getattr(test, "_hypothesis_internal_use_settings", None), "max_examples", None),
            "case": repr(given["case"]) if "case" in given else None,
            "first_drawn": next(iter(given), None),
            "declared_case": repr(d.cases()) if d is not None and d.specs is not None else None,
        })
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def properties() -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _DUMP, *(p.stem for p in PROPERTIES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) > 40, found  # every property module was read
    return found


def test_every_hypothesis_property_is_declared_with_prop(properties):
    undeclared = [f"{p['module']}::{p['name']}" for p in properties if p["hypothesis"] and p["declared"] is None]
    assert not undeclared, f"not declared with @prop: {undeclared}"
    # plain tests (the strict-xfail pins) keep their module's markers and run once
    for p in properties:
        if not p["hypothesis"]:
            assert p["declared"] is None and p["max_examples"] is None and len(p["tiers"]) == 1, p


def test_marker_tier_budget_and_case_agree(properties):
    from properties._support import PROFILES, TIERS

    for p in (p for p in properties if p["declared"] is not None):
        d, where = p["declared"], f"{p['module']}::{p['name']}"
        assert p["tiers"] == [d["tier"]], f"{where}: tier markers {p['tiers']}, declared {d['tier']}"
        assert p["flows"] == ([d["flow"]] if d["flow"] else []), f"{where}: flow markers {p['flows']}"
        # variants (parametrizations) share the tier's budget, each at least 2 examples
        share = max(2, round(PROFILES["default"][d["tier"]] / d["variants"]))
        assert p["max_examples"] == share, (
            f"{where}: {p['max_examples']} examples on the default profile, its tier {d['tier']} has "
            f"{PROFILES['default'][d['tier']]} for {d['variants']} variant(s)")
        if d["variants"] > 1:
            assert d["variants"] in p["parametrized"], f"{where}: {d['variants']} variants, parametrized {p['parametrized']}"
        if d["specs"] is not None:  # it draws a case: of the declared specs, never below its tier
            assert TIERS.index(d["specs"]) >= TIERS.index(d["tier"]), where
            if p["case"] is not None:  # drawn by @given (else in the body, from subject.cases)
                assert p["case"] == p["declared_case"], f"{where}: draws {p['case']}, declares {p['declared_case']}"
                assert p["first_drawn"] == "case", f"{where}: the case is not drawn first"


def test_properties_take_no_tier_but_the_declared_one():
    """No budget, marker or @given of its own, and no case strategy with a tier of its own: the
    tier is said once, in @prop (module-level pytestmark may carry family, flow and the tier of
    plain tests)."""
    banned = re.compile(r"^@(given|budget|settings)\(|^@pytest\.mark\.qref_(tier|flow)\(|\btier=\"|"
                        r"model_specs\([^)]*\"(ops|patterns|models)\"", re.M)
    for path in PROPERTIES:
        hits = [m.group(0) for m in banned.finditer(path.read_text())]
        assert not hits, f"{path.name}: {hits}"


def _catalogue() -> dict[str, str]:
    """Property name -> tier, from docs/properties.md (rows naming one property per tier)."""
    tiers: dict[str, str] = {}
    section = None
    for line in (ROOT / "docs" / "properties.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0]
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("property", "---") or set(cells[0]) <= {"-"}:
            continue
        names = []
        for part in re.split(r",\s*(?![^()]*\))", cells[0]):
            name, _, flows = part.partition(" (")
            if "/" in name or "*" in name:
                names.append(None)  # fx_single_op/_pattern/...: not one name
                continue
            names.append([name] + ([f"fx_{name}"] if "fx" in flows else []))
        if section == "primitives":
            row = ["primitives"] * len(names)
        else:
            row = [t.strip() for t in cells[1].split(",")]
            row = row if len(row) == len(names) else row * len(names) if len(row) == 1 else [None] * len(names)
        for group, tier in zip(names, row):
            for name in group or ():
                if tier in ("primitives", "ops", "patterns", "models", "architectures"):
                    tiers[name] = tier
    return tiers


def test_the_catalogue_gives_each_property_its_declared_tier(properties):
    catalogue = _catalogue()
    assert len(catalogue) > 30, catalogue
    declared = {p["name"].removeprefix("test_"): p["declared"]["tier"] for p in properties if p["declared"]}
    assert set(catalogue) <= set(declared), f"catalogued but not found: {set(catalogue) - set(declared)}"
    assert set(declared) <= set(catalogue), f"not in docs/properties.md: {set(declared) - set(catalogue)}"
    wrong = {name: (tier, declared[name]) for name, tier in catalogue.items() if declared[name] != tier}
    assert not wrong, f"catalogue tier vs declared tier: {wrong}"


# --- the decorator itself -----------------------------------------------------------------------


def test_prop_applies_one_tier_to_marker_budget_and_case():
    from hypothesis import strategies as st

    from properties._support import budget, declared, prop
    from qref.strategies import cases

    @prop("fx", "patterns", qat=False, flag=st.booleans())
    def test_x(case, flag):
        pass

    marks = {m.name: m.args for m in test_x.pytestmark}
    assert marks == {"qref_tier": ("patterns",), "qref_flow": ("fx",)}
    assert test_x._hypothesis_internal_use_settings.max_examples == budget("patterns").max_examples
    d = declared(test_x)
    assert (d.flow, d.tier, d.specs) == ("fx", "patterns", "patterns")
    assert repr(d.cases()) == repr(cases("fx", tier="patterns", qat=False, engine=None))
    assert set(test_x.hypothesis._given_kwargs) == {"case", "flag"}


@pytest.mark.parametrize("args, kwargs, says", [
    (("pt2e", "ops"), {"specs": "ops", "case": None}, "no case="),
    (("pt2e", "patterns"), {"specs": "ops"}, "not below the property's tier"),
    (("pt2e", "medium"), {}, "tier must be one of"),
    (("torchscript", "ops"), {}, "flow must be one of"),
])
def test_prop_refuses_a_second_tier(args, kwargs, says):
    from properties._support import prop

    with pytest.raises((TypeError, ValueError), match=says):
        prop(*args, **kwargs)


def test_prop_refuses_case_options_for_a_property_without_a_case():
    from hypothesis import strategies as st

    from properties._support import prop

    with pytest.raises(TypeError, match="draws no case"):
        @prop(None, "primitives", qat=True, x=st.integers())
        def test_y(x):
            pass
