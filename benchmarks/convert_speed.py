"""qref's converters vs the originals on the same prepared models, in one run.

pt2e: qref.convert_pt2e vs torchao's convert_pt2e; FX: qref.convert_fx vs
torch's convert_fx (lowered to fbgemm kernels). Prints, per model: graph size,
each converter's wall time, the ratio (original / qref, > 1 means qref is
faster) and whether the outputs are bit-identical; then a scaling series of
conv-bn-relu chains.

    python benchmarks/convert_speed.py            # whole zoo + chains of ~50/500/5000 nodes
    python benchmarks/convert_speed.py --quick    # a few models + chains of ~50/500 (the demo)

Timing notes: torchao and torch convert a deep copy (they mutate their input;
the copy is not timed); qref's time includes the copy it makes to leave its
input alone.
Each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _timing import best_time  # noqa: E402 (benchmarks/, the script's own folder)

from qref._quiet import import_torchao_quietly, silence_noise  # noqa: E402

import_torchao_quietly()
silence_noise()
# torch.ao's FX deprecation notice and quantizers' "skip annotate" remarks say nothing about speed.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import qref  # noqa: E402
from fixtures import fx_setups, zoo  # noqa: E402
from fixtures.prepare import inputs, prepare, supported  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as torchao_convert  # noqa: E402

QUICK_MODELS = [
    ("mobilenet_v2_like", "x86_ptq_pc"),
    ("conv_bn_relu", "x86_ptq_pc"),
    ("attention", "x86_ptq_pc"),
    ("conv1d_bn_relu", "qref_int8_sym"),
    ("conv_bn_relu", "x86_qat_pc"),
]


def _identical(a, b, args_list) -> bool:
    with torch.no_grad():
        return all(torch.equal(a(*args), b(*args)) for args in args_list)


def compare(name, prepared, args_list, repeat, original=torchao_convert, ours=qref.convert_pt2e):
    def run_original():
        model = copy.deepcopy(prepared)
        start = time.perf_counter()
        out = original(model)
        return time.perf_counter() - start, out

    t_ao = float("inf")
    for _ in range(repeat):
        elapsed, expected = run_original()
        t_ao = min(t_ao, elapsed)
    t_qref, got = best_time(lambda: ours(prepared), repeat)
    same = _identical(expected, got, args_list)
    nodes = len(prepared.graph.nodes)
    print(f"{name:<36} {nodes:>6} {t_ao:>10.3f} {t_qref:>10.3f} {t_ao / t_qref:>8.1f}x  {'yes' if same else 'NO'}")
    return t_ao, t_qref, same


def header(title, original="torchao"):
    print(f"\n{title}")
    print(f"{'model / setup':<36} {'nodes':>6} {original + ' s':>10} {'qref s':>10} {'ratio':>9}  identical")


def zoo_section(pairs, repeat):
    header("Zoo (prepared-graph nodes; ratio = torchao time / qref time)")
    results = []
    for model_name, setup_name in pairs:
        prepared = prepare(model_name, setup_name)
        args_list = [inputs(model_name, 0), inputs(model_name, 1, scale=50.0)]
        results.append(compare(f"{model_name} / {setup_name}", prepared, args_list, repeat))
    return results


FX_QUICK = ["conv_bn_relu", "mlp", "residual_add"]


def fx_section(model_names, repeat):
    """FX flow, fbgemm mapping, lowered models run under fbgemm with one thread (bit-exact)."""
    header("FX: qref.convert_fx vs torch convert_fx (fbgemm default mapping)", original="torch")
    results = []
    with qref.use_engine("fbgemm", threads=1):
        for name in model_names:
            model = zoo.ZOO[name]
            if fx_setups.unsupported(model, fx_setups.SETUPS["fbgemm"]):
                continue
            prepared, _ = fx_setups.prepare_fx_model(model, fx_setups.SETUPS["fbgemm"])
            args_list = [inputs(name, 0), inputs(name, 1, scale=4.0)]
            results.append(compare(f"{name} / fbgemm", prepared, args_list, repeat,
                                   original=torch_convert_fx, ours=qref.convert_fx))
    return results


def scaling_section(sizes, repeat):
    header("Scaling: conv-bn-relu chains, X86 PTQ (HistogramObserver activations)")
    rows = []
    for size in sizes:
        model = zoo.chain(size)
        prepared = prepare(model, "x86_ptq_pc", calibration_batches=2)
        args_list = [model.example_inputs(torch.Generator().manual_seed(1))]
        result = compare(f"chain ~{size} nodes", prepared, args_list, repeat)
        rows.append((len(prepared.graph.nodes), result))
    print(f"\n{'nodes':>6} {'qref us/node':>13} {'torchao us/node':>16}")
    for nodes, (t_ao, t_qref, _) in rows:
        print(f"{nodes:>6} {1e6 * t_qref / nodes:>13.1f} {1e6 * t_ao / nodes:>16.1f}")
    return [result for _, result in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few models and chains up to ~500 nodes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per converter (best is kept)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        pairs, sizes = QUICK_MODELS, (50, 500)
    else:
        pairs = [(m, "x86_ptq_pc" if supported(m, "x86_ptq_pc") else "qref_int8_sym") for m in zoo.ZOO]
        pairs += [("conv_bn_relu", "x86_qat_pc"), ("mobilenet_v2_like", "x86_qat_pc")]
        sizes = (50, 500, 5000)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeat {args.repeat}")
    results = zoo_section(pairs, args.repeat)
    results += scaling_section(sizes, args.repeat)
    results += fx_section(FX_QUICK if args.quick else list(zoo.ZOO), args.repeat)
    mismatches = sum(not same for _, _, same in results)
    slower = sum(q > ao for ao, q, _ in results)
    print(f"\n{len(results)} conversions: {mismatches} with different outputs, qref slower on {slower}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
