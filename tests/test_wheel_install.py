"""`qref check` from a built wheel in a fresh virtual environment, run from an unrelated directory.

The fresh environment gets qref only from the wheel; torch, torchao, hypothesis and pytest come from
the development environment through a plain path entry (a `.pth` line is not a site directory, so
the editable install of the checkout is *not* visible there).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("qref-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "qref_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return venv, workdir


def test_qref_comes_from_the_wheel(wheel_env):
    venv, workdir = wheel_env
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qref.properties, qref; print(qref.__file__)"],
                           cwd=workdir, check=True, capture_output=True, text=True).stdout
    assert str(venv) in where, where


def test_qref_check_runs_the_installed_suite(wheel_env):
    venv, workdir = wheel_env
    done = subprocess.run([str(venv / "bin" / "qref"), "check", "qref-pt2e", "--report", "r.json",
                           "--", "-k", "primitives or contract"],
                          cwd=workdir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "qref conformance" in done.stdout
    assert str(venv) in done.stdout  # the suite that ran is the installed one
    assert (workdir / "r.json").exists()


def test_unknown_converter_is_a_usage_error(wheel_env):
    venv, workdir = wheel_env
    done = subprocess.run([str(venv / "bin" / "qref"), "check", "nope"], cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
