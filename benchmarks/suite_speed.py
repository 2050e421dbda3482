"""Wall time of the property suite per converter, and examples per second per property.

Runs ``qref check CONVERTER --profile P --seed S`` for each converter (default: qref's and the
original converter of each flow, so every line has its peer from the same run) and reads the
per-test durations from the JSON report and Hypothesis' own statistics (passing examples per
test).  Targets (issue 4): the quick profile of the suite in under 3 minutes per converter,
``default`` under 15.

    python benchmarks/suite_speed.py [--profile quick] [--seed 0] [CONVERTER:FLOW ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = {"qref-pt2e": "torchao-pt2e", "qref-fx": "torch-fx"}
DEFAULT = ["qref-pt2e:pt2e", "torchao-pt2e:pt2e", "qref-fx:fx", "torch-fx:fx"]
_TEST = re.compile(r"^(\S+::\S+):\s*$")
_PASSING = re.compile(r"(\d+) passing\b")  # "20 passing, 0 failing, ..." (Hypothesis 6.1xx)


def run(converter: str, flow: str, profile: str, seed: int) -> dict:
    """One `qref check` run: wall time, exit status and per-test (seconds, examples)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [str(Path(sys.executable).with_name("qref")), "check", converter, "--flow", flow,
                   "--profile", profile, "--seed", str(seed), "--report", str(report),
                   "--", "-q", "--hypothesis-show-statistics"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - start
        data = json.loads(report.read_text()) if report.exists() else {"tests": []}
    examples, current = {}, None
    for line in done.stdout.splitlines():
        if (m := _TEST.match(line.strip())) is not None:
            current = m.group(1).split("properties/")[-1]
        elif current and (m := _PASSING.search(line)) is not None:
            examples[current] = examples.get(current, 0) + int(m.group(1))
    tests = {t["nodeid"].split("properties/")[-1]: (t.get("duration") or 0.0, t["status"]) for t in data["tests"]}
    return {"wall": wall, "status": done.returncode, "tests": tests, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converters", nargs="*", default=DEFAULT, help="CONVERTER:FLOW pairs")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for pair in args.converters:
        converter, flow = pair.rsplit(":", 1)
        results[converter] = r = run(converter, flow, args.profile, args.seed)
        print(f"\n== {converter} ({flow}), profile {args.profile}: {r['wall']:.1f} s wall, exit {r['status']}")
        print(f"{'property test':<72} {'s':>7} {'examples':>8} {'ex/s':>7}  status")
        for test, (seconds, status) in sorted(r["tests"].items(), key=lambda kv: -kv[1][0]):
            n = r["examples"].get(test)
            rate = f"{n / seconds:7.1f}" if n and seconds > 0 else "      -"
            print(f"{test[:72]:<72} {seconds:7.2f} {n if n is not None else '-':>8} {rate}  {status}")
    print("\nwall time per converter (ratio to its peer in this run):")
    for converter, r in results.items():
        peer = PEERS.get(converter)
        ratio = f"  {results[peer]['wall'] / r['wall']:.2f}x faster than {peer}" if peer in results else ""
        print(f"  {converter:<14} {r['wall']:7.1f} s{ratio}")


if __name__ == "__main__":
    main()
