"""HistogramObserver's qparam search: torchao's vs qref's, on calibration-like activations.

The brief this project started from says torchao's convert_pt2e spends most of its time
in HistogramObserver's search for the L2-minimising range (``_non_linear_param_search``).
This times that search alone, torchao's against ``qref.qparams.histogram_range``, on
activation-like distributions (post-ReLU, heavy-tailed, with outliers) and on sizes a
calibration run produces (32K to 9.6M elements, fed to the observer in 4 batches as a
calibration loop does). Per case it prints how many candidate ranges the search evaluated
(quantization errors computed; counted on qref's walk), both times, the ratio
(torchao / qref, > 1 means qref is faster) and whether the two (min, max) are
bit-identical; it exits non-zero if any differ, so it doubles as a check.

    python benchmarks/histogram_search.py            # 10 distributions x 32K / 1.2M / 9.6M
    python benchmarks/histogram_search.py --quick    # 6 distributions x 32K / 1.2M

Each time is the best of --repeat runs; building the histograms is not timed. Both searches
work on tensors below torch's intra-op parallel threshold (torchao's 2048 elements, qref's
batches of candidate ranges x 2048 under 32768), so other load on the machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _timing import best_time  # noqa: E402 (benchmarks/, the script's own folder)

from qref._quiet import import_torchao_quietly, silence_noise  # noqa: E402

import_torchao_quietly()
silence_noise()

from qref.qparams import _candidate_ranges, _range_bounds, histogram_range  # noqa: E402
from torchao.quantization.pt2e import HistogramObserver  # noqa: E402


def _normal(n, g):
    return torch.randn(n, generator=g)


def _student_t(n, g, df=3):
    # z / sqrt(chi2_df / df), chi2 as a sum of squared normals: torch's gamma takes no generator
    chi2 = sum(torch.randn(n, generator=g) ** 2 for _ in range(df))
    return _normal(n, g) / torch.sqrt(chi2 / df)


def _outliers(n, g):
    x = _normal(n, g)
    x[n // 3], x[2 * n // 3] = 120.0, -80.0  # two far outliers, as a stray activation makes
    return x


def _mixture(n, g):
    # 99% N(0, 1), 1% N(0, 30^2): a few channels much louder than the rest
    scale = torch.where(torch.rand(n, generator=g) < 0.01, 30.0, 1.0)
    return scale * _normal(n, g)


DISTRIBUTIONS = {
    "gaussian": _normal,
    "relu(gaussian)": lambda n, g: torch.relu(_normal(n, g)),
    "relu6(2*gaussian)": lambda n, g: torch.clamp(2 * _normal(n, g), 0, 6),
    # Laplace(0, 1) as the difference of two unit exponentials
    "laplace": lambda n, g: (torch.empty(n).exponential_(generator=g)
                             - torch.empty(n).exponential_(generator=g)),
    "student-t df=3": _student_t,
    "log-normal s=1": lambda n, g: torch.empty(n).log_normal_(0.0, 1.0, generator=g),
    "log-normal s=2": lambda n, g: torch.empty(n).log_normal_(0.0, 2.0, generator=g),
    "cauchy": lambda n, g: torch.empty(n).cauchy_(generator=g),
    "gaussian+2 outliers": _outliers,
    "mixture 99/1": _mixture,
}
QUICK = ["gaussian", "relu(gaussian)", "laplace", "log-normal s=2", "cauchy", "gaussian+2 outliers"]
SIZES = (32 * 1024, 1_200_000, 9_600_000)
BATCHES = 4


def calibrated(name, n, seed):
    obs = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    x = DISTRIBUTIONS[name](n, torch.Generator().manual_seed(seed))
    for batch in x.chunk(BATCHES):
        obs(batch)
    return obs


def candidates_evaluated(obs, lo, hi):
    """How many quantization errors the search computed: the accepted candidates up to the
    result, plus the rejected one after it (if the walk did not run out). Read off qref's walk."""
    hist, bins = obs.histogram, obs.histogram.numel()
    walk = _candidate_ranges(torch.cumsum(hist, dim=0).tolist(), torch.sum(hist).item())

    def is_result(start, end):
        a, b = _range_bounds(obs.min_val, obs.max_val, bins, start, end)
        return torch.equal(a, lo) and torch.equal(b, hi)

    accepted = 0
    if not is_result(0, bins - 1):  # the full range is the result when the first candidate loses
        for accepted, (start, end) in enumerate(walk, 1):
            if is_result(start, end):
                break
    return accepted + (next(walk, None) is not None)


def case(name, n, seed, repeat):
    obs = calibrated(name, n, seed)
    t_ao, (ao_lo, ao_hi) = best_time(obs._non_linear_param_search, repeat)
    t_qref, (lo, hi) = best_time(
        lambda: histogram_range(obs.histogram, obs.min_val, obs.max_val, obs.dst_nbins), repeat)
    f32 = torch.float32  # compare as the float32 tensors the observer's qparams come from
    same = torch.equal(ao_lo.to(f32), lo.to(f32)) and torch.equal(ao_hi.to(f32), hi.to(f32))
    evaluated = candidates_evaluated(obs, lo, hi)
    print(f"{n:>10,} {name:<20} {evaluated:>6} {1e3 * t_ao:>11.1f} {1e3 * t_qref:>9.1f} "
          f"{t_ao / t_qref:>7.1f}x  {'yes' if same else 'NO'}")
    return t_ao, t_qref, same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 distributions, 32K and 1.2M elements")
    parser.add_argument("--repeat", type=int, default=1, help="runs per search (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, sizes = (QUICK, SIZES[:2]) if args.quick else (list(DISTRIBUTIONS), SIZES)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeat {args.repeat}, "
          f"{BATCHES} calibration batches per observer")
    print(f"{'elements':>10} {'distribution':<20} {'evals':>6} {'torchao ms':>11} {'qref ms':>9} "
          f"{'ratio':>8}  identical")
    results = []
    for n in sizes:
        for name in names:  # seeded by the distribution, so --quick's cases are the full run's
            results.append(case(name, n, list(DISTRIBUTIONS).index(name), args.repeat))
    t_ao = sum(r[0] for r in results)
    t_qref = sum(r[1] for r in results)
    mismatches = sum(not r[2] for r in results)
    print(f"\n{len(results)} searches: torchao {t_ao:.3f} s, qref {t_qref:.3f} s "
          f"({t_ao / t_qref:.1f}x); {mismatches} with different (min, max)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
