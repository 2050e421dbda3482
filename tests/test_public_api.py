"""The public names the README promises, whatever the order they are first imported in."""

from __future__ import annotations

import subprocess
import sys

import pytest

FIRST_IMPORTS = {
    "package first": "import qref",
    "submodule first": "from qref.engines import use_engine",
    "module alias": "import qref.engines as e",
}


@pytest.mark.parametrize("first", FIRST_IMPORTS.values(), ids=list(FIRST_IMPORTS))
def test_engines_is_the_module_and_calling_it_lists_the_engines(first):
    script = f"""{first}
import sys
import qref
names = qref.engines()
assert isinstance(names, list) and all(isinstance(n, str) for n in names) and names, names
assert qref.engines.engines() == names
assert callable(qref.engines.known_deviation) and isinstance(qref.engines.has_vnni(), bool)
assert qref.engines.KERNEL_CONTRACTS and qref.engines.use_engine is qref.use_engine
from qref import engines
assert engines is qref.engines is sys.modules["qref.engines"]
print("ok", names)
"""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_importing_qref_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, qref; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_public_names_resolve():
    import qref

    for name in qref.__all__:
        assert getattr(qref, name) is not None, name
    assert set(qref.__all__) <= set(dir(qref))
