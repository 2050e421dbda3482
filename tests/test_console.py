"""qref check's console (qref.plugin.console): header, progress, table, short failures; no pytest noise."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

FAKECONV = """
import torch

def good(model, use_reference_representation=False, fold_quantize=True):
    return torch.fx.symbolic_trace(torch.nn.Identity())
"""

SUITE = '''
import time
import warnings

import pytest
from hypothesis import given, settings, strategies as st
from qref.tally import compared

pytestmark = [pytest.mark.qref_family("equivalence"), pytest.mark.qref_flow("pt2e"), pytest.mark.qref_tier("ops")]

@settings(max_examples=8, database=None)
@given(st.integers(0, 9))
def test_holds(n):
    warnings.warn("a torchao FutureWarning", FutureWarning)
    compared()

def test_diverges(qref_record):
    compared()
    qref_record.reproducer("print('repro')", {})
    pytest.fail("candidate vs reference:\\nfirst divergence: quantize point 'conv2d'\\nmodel: ModelSpec(...)",
                pytrace=False)
'''


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    pytester.makepyfile(fakeconv=FAKECONV, test_props=SUITE)
    return pytester


def test_console_shows_header_progress_table_and_short_failures(suite):
    result = suite.runpytest("-p", "qref.plugin.console", "--qref-converter", "fakeconv:good",
                             "--qref-artifacts", "arts", "-p", "no:randomly")
    assert result.ret == 1  # exit codes unchanged
    out = result.stdout.str()
    assert "test session starts" not in out and "rootdir" not in out  # pytest's header
    assert "warnings summary" not in out and "FutureWarning" not in out
    assert "Traceback" not in out and "short test summary" not in out
    result.stdout.fnmatch_lines([
        "qref: converter fakeconv:good -> *",
        "qref: torch *quantized engines*",
        "passed*holds*8/8 compared*s",
        "failed*diverges*1/1 compared*s",
        "*qref conformance: fakeconv:good (pt2e)*",
        "*equivalence*diverges*failed: candidate vs reference:*",
        "*failures*",
        "failed: equivalence/diverges",
        "    candidate vs reference:",
        "    first divergence: quantize point 'conv2d'",
        "    reproducer: */repro.py (run it to see the verdict again)",
        "qref verdict: 1 failed (*s)",
    ])
    assert not any(line.strip() in (".F", "F.", ".", "F") for line in out.splitlines())  # no result letters
    assert "1 failed, 1 passed" not in out  # pytest's count line: the verdict line says it


def test_console_leaves_out_xdist_status_lines(suite):
    result = suite.runpytest_subprocess("-p", "qref.plugin.console", "--qref-converter", "fakeconv:good",
                                        "-p", "no:randomly", "-n", "1")
    out = result.stdout.str()
    assert result.ret == 1 and "qref verdict: 1 failed" in out, out
    assert "bringing up nodes" not in out and "[gw0]" not in out, out


def test_without_the_console_pytest_output_is_unchanged(suite):
    result = suite.runpytest("--qref-converter", "fakeconv:good", "-p", "no:randomly")
    out = result.stdout.str()
    assert "test session starts" in out and "qref verdict" not in out


def test_progress_is_redrawn_in_place_on_a_terminal(suite):
    suite.makepyfile(test_slow='''
        import time
        import pytest
        from hypothesis import given, settings, strategies as st
        from qref.tally import compared

        @pytest.mark.qref_family("equivalence")
        @pytest.mark.qref_flow("pt2e")
        @settings(max_examples=12, database=None, deadline=None)
        @given(st.integers(0, 9))
        def test_slow(n):
            time.sleep(0.25)
            compared()
        ''')
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="160", PYTHONPATH=os.pathsep.join(
        [str(suite.path), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "qref.plugin.console", "-p", "no:cacheprovider",
                                "--qref-converter", "fakeconv:good", "test_slow.py"],
                               cwd=suite.path, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=120)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, text
    assert "\r" in text and "compared so far" in text, textwrap.shorten(text, 2000)
    assert "[....................] [0/1] slow" in text  # a progress bar: none of one property done yet
