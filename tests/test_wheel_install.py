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


def _oldest_python() -> Path | None:
    """An interpreter of the oldest Python that pyproject.toml admits (3.10), if this machine has one."""
    import shutil

    for candidate in (shutil.which("python3.10"), *sorted(Path("/root/.pyenv/versions").glob("3.10*/bin/python3.10"))):
        if candidate and subprocess.run([str(candidate), "--version"], capture_output=True).returncode == 0:
            return Path(candidate)
    return None


def test_plugin_loads_on_the_oldest_supported_python(tmp_path):
    """The pytest11 plugin is loaded by every pytest session where qref is installed: on Python 3.10
    (no tomllib) it must load, leave a plain session alone and read an expectations file."""
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.10", "test the interpreter requires-python names"
    python = _oldest_python()
    if python is None:
        pytest.skip("no Python 3.10 interpreter on this machine (requires-python >=3.10 is untested here)")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("qref-*.whl")
    venv = tmp_path / "venv310"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # qref without torch (the plugin must not need it at load), with pytest and what qref's
    # metadata asks for on 3.10 (tomli, packaging)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                    str(ROOT / "constraints.txt"), "pytest", "tomli", "packaging"], check=True, capture_output=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
    done = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plain.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    loaded = subprocess.run([str(py), "-c", "import sys, qref.plugin, qref.expectations as e; "
                             "from importlib.resources import files; "
                             "print(sys.version_info[:2], len(e.load(files('qref') / 'default_expectations.toml')))"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("(3, 10)")
