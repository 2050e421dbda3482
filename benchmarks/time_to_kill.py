"""Time from `qref check` start to the first failing verdict, for each mutant in tests/mutants.

Runs ``qref check MUTANT --profile quick --seed S -- -x -k CAUGHT_BY`` (the properties meant for
its bug class, stopping at the first failure, shrinking included as a user sees it) and prints
each mutant's seconds, then the distribution (min / median / max) and the ratio of the median to
the issue's target (10 s).  A mutant that survives is listed as such.

    python benchmarks/time_to_kill.py [--seed 0] [--profile quick] [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MEDIAN_S = 10.0


def time_to_kill(mutant, profile: str, seed: int) -> tuple[float, bool]:
    command = [str(Path(sys.executable).with_name("qref")), "check", mutant.target, "--flow", mutant.flow,
               "--profile", profile, "--seed", str(seed), "--", "-q", "-x", "-k", mutant.caught_by]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env)
        return time.perf_counter() - start, done.returncode == 1


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from tests.mutants import MUTANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="quick")
    args = parser.parse_args()
    chosen = [MUTANTS[n] for n in args.names] if args.names else list(MUTANTS.values())
    killed, survived = [], []
    for mutant in chosen:
        seconds, dead = time_to_kill(mutant, args.profile, args.seed)
        (killed if dead else survived).append((mutant.name, seconds))
        print(f"{mutant.name:40s} {seconds:7.1f} s  {'killed' if dead else 'SURVIVED'}", flush=True)
    if killed:
        times = sorted(s for _, s in killed)
        median = statistics.median(times)
        print(f"\n{len(killed)} killed: min {times[0]:.1f} s, median {median:.1f} s, max {times[-1]:.1f} s; "
              f"median / target ({TARGET_MEDIAN_S:g} s) = {median / TARGET_MEDIAN_S:.2f}")
    if survived:
        print(f"survived: {', '.join(n for n, _ in survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
