"""``qref check CONVERTER``: run the installed property suite against a converter.

Exit status: 0 when every property holds (expected failures from the expectations file excepted),
1 when any fails or is left unrun, 2 for a usage error (one line on stderr saying what to fix).
Everything after ``--`` goes to pytest unchanged (``-x``, ``-k EXPR``, ``-n 2``, ...).

The suite runs in a pytest-xdist worker process (``-n 1`` unless the pytest arguments choose
``-n``/``--numprocesses``, ``-p no:xdist`` or ``--pdb``), with :mod:`qref.isolation`: a
converter that crashes the process fails the property that was running and a new worker runs
the rest.  Without pytest-xdist installed the suite runs in this process, and says so.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import sys
from pathlib import Path

from qref.plugin.options import OPTIONS

__all__ = ["main", "suite_dir", "pytest_args", "isolation_args"]

_DESCRIPTION = """\
Run qref's property suite against CONVERTER and print a conformance table
(property family x property -> passed / failed / expected failure / not run).

CONVERTER is one of
  qref-pt2e     qref.convert_pt2e                        (pt2e flow)
  torchao-pt2e  torchao.quantization.pt2e convert_pt2e   (pt2e flow)
  qref-fx       qref.convert_fx                          (fx flow)
  torch-fx      torch.ao.quantization.quantize_fx.convert_fx (fx flow)
  module:attr   a callable importable from the current directory or PYTHONPATH
  NAME          a callable registered under the entry-point group qref.converters

A pt2e converter is called as convert(model, use_reference_representation=False,
fold_quantize=True) and must return a torch.fx.GraphModule; an fx converter as
convert(model, convert_custom_config=None, _remove_qconfig=True,
qconfig_mapping=None, backend_config=None) and must return an nn.Module. Keyword
arguments it does not accept are not exercised (the report says which).
"""

_EPILOG = """\
exit status: 0 every property holds (expected failures excepted), 1 some property
fails or was not run, 2 usage error.

The suite runs in a pytest-xdist worker process (-n 1): a converter that crashes it
(segfault, abort, os._exit) fails the property that was running, and a new worker
runs the rest.  `-- -n 0` runs it in this process instead.

examples:
  qref check torchao-pt2e
  qref check mypkg.lowering:convert --flow pt2e --report conformance.json --artifacts repro/
  qref check torch-fx --profile thorough -- -n 4 -k equivalence
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qref",
        description="qref: verification and reference suite for PyTorch quantization conversion.",
        epilog="Run `qref check --help` for the options of the check command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    check = commands.add_parser(
        "check",
        help="run the property suite against a converter and report conformance",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="qref check CONVERTER [options] [-- PYTEST_ARGS...]",
    )
    check.add_argument("converter", metavar="CONVERTER", help="the converter to check (see above)")
    for option in OPTIONS:  # declared once, in the plugin
        if option.in_cli:
            check.add_argument(f"--{option.name}", dest=option.dest, **option.kwargs(cli=True))
    check.add_argument("-v", "--verbose", action="store_true",
                       help="pytest's own output (session header, letters, warnings, tracebacks) "
                       "instead of qref's console")
    return parser


def suite_dir() -> Path:
    """The directory of the installed property suite (the package ``qref.properties``)."""
    spec = importlib.util.find_spec("qref.properties")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package qref.properties is not installed: reinstall qref")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def default_expectations() -> str:
    return str(importlib.resources.files("qref").joinpath("default_expectations.toml"))


def default_artifacts_dir() -> Path:
    """Where ``qref check`` writes reproducers unless ``--artifacts`` says (created only when a
    property fails): a new directory under the system's temporary directory."""
    import tempfile
    import time

    return Path(tempfile.gettempdir()) / f"qref-reproducers-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def pytest_args(options: argparse.Namespace, flow: str, suite: Path, passthrough: list[str]) -> list[str]:
    """pytest's command line for a check: the suite, isolated from the current directory's config."""
    args = [
        str(suite),
        # Run the suite as installed, whatever directory we are in: no ini file of the user's
        # project (-c os.devnull), the suite's own rootdir, no conftest above it, no cache writes.
        "-c", os.devnull,
        "--rootdir", str(suite.parent),
        "--confcutdir", str(suite),
        "-p", "no:cacheprovider",
        # pytest marks the plugin's distribution (all of qref) for assertion rewriting and warns
        # that the package is already imported: by this command, before pytest starts.  Modules
        # imported later (the suite's helpers) are still rewritten.
        "-W", "ignore:Module already imported so cannot be rewritten; qref:pytest.PytestAssertRewriteWarning",
        "-ra",
        # torch's tracing loggers emit DEBUG records; a failure's captured log shows warnings up
        "-o", "log_level=WARNING",
        "--qref-converter", options.converter,
        "--qref-flow", flow,
        "--qref-expectations", options.qref_expectations or default_expectations(),
    ]  # fmt: skip
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        args += ["-p", "qref.plugin"]  # the pytest11 entry point is not loaded then
    if not options.verbose:
        args += ["-p", "qref.plugin.console"]
        if getattr(options, "qref_artifacts", None) is None:  # each failure names a reproducer to run
            args += ["--qref-artifacts", str(default_artifacts_dir())]
    for option in OPTIONS:
        value = getattr(options, option.dest, None)
        if not option.in_cli or option.name in ("flow", "expectations") or value is None or value is False:
            continue  # (0 is a seed)
        for one in value if option.repeat else [value]:
            args += [f"--qref-{option.name}"] + ([] if option.flag else [str(one)])
    return args + passthrough


# pytest options whose value is the next argument (so that e.g. `-k -n` is not read as -n)
_TAKES_VALUE = {"-k", "-m", "-p", "-c", "-o", "-W", "--rootdir", "--confcutdir", "--maxfail",
                "--deselect", "--ignore", "--basetemp", "--dist", "--max-worker-restart", "--tx"}


def _passthrough_options(passthrough: list[str]) -> tuple[set[str], list[str]]:
    """The option names among pytest arguments (values skipped) and the plugins given with -p."""
    names: set[str] = set()
    plugins: list[str] = []
    args = iter(passthrough)
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            names.add(name)
            if not eq and name in _TAKES_VALUE:
                value = next(args, "")
            if name == "--numprocesses":
                names.add("-n")
        else:
            name, value = arg[:2], arg[2:]
            names.add(name)
            if not value and name in _TAKES_VALUE | {"-n"}:
                value = next(args, "")
        if name == "-p":
            plugins.append(value)
    return names, plugins


def isolation_args(passthrough: list[str]) -> tuple[list[str], str | None]:
    """pytest arguments that run the suite in a worker process that a crash cannot take down,
    and a note for the user when that is not possible (``None``: isolated)."""
    names, plugins = _passthrough_options(passthrough)
    if "no:xdist" in plugins:
        return [], "the suite runs in this process (-p no:xdist): a converter that crashes it ends the run"
    if importlib.util.find_spec("xdist") is None:
        return [], ("pytest-xdist is not installed, so the suite runs in this process: a converter that "
                    "crashes it ends the run without a report (pip install pytest-xdist)")
    args = ["-p", "qref.isolation"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") and "xdist.plugin" not in plugins:
        args = ["-p", "xdist.plugin", *args]
    if "-n" in names:
        return args, None  # the user's choice of workers (-n 0: in this process)
    if names & {"--pdb", "--trace"}:
        return args, None  # a debugger needs the tests in this process
    return [*args, "-n", "1"], None


def _usage_error(message: str) -> int:
    print(f"qref check: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    else:
        passthrough = []
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command != "check":
        parser.print_help()
        return 2
    if options.qref_timeout is not None and options.qref_timeout <= 0:
        return _usage_error(f"--timeout must be a positive number of seconds, not {options.qref_timeout:g}")
    if options.qref_expectations and not Path(options.qref_expectations).is_file():
        return _usage_error(f"expectations file {options.qref_expectations!r} does not exist")

    # Validate the converter before anything runs: a typo should cost a second, not a suite.
    from qref.converters import UsageError, resolve

    try:
        converter = resolve(options.converter, options.qref_flow)
    except UsageError as exc:
        return _usage_error(str(exc))
    try:
        suite = suite_dir()
    except FileNotFoundError as exc:
        return _usage_error(str(exc))

    import pytest

    isolation, note = isolation_args(passthrough)
    if note is not None:
        print(f"qref check: {note}", file=sys.stderr)
    # before the user's arguments, which come last and so win
    status = pytest.main(pytest_args(options, converter.flow, suite, isolation + passthrough))
    if status == pytest.ExitCode.OK:
        return 0
    if status == pytest.ExitCode.USAGE_ERROR:
        return 2
    if status == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("qref check: no property was run (check the -k/-m filters after --)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
