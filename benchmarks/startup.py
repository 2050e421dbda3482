"""Where a `qref check` process spends its time before the first example is compared.

Times, in one fresh process, the steps every worker pays once: importing torch, importing
torchao's pt2e (which imports torch._dynamo), the first and a second ``torch.export.export``, the
first and a second ``prepare_pt2e``, then one conversion by each converter; and, in a second
process, a whole ``qref check`` that selects no property (interpreter, plugin, isolated worker,
collection).  The first-time steps are fixed costs: a quick run that kills a mutant in its first
examples spends most of its time here.

    python benchmarks/startup.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_STEPS = r'''
import time
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
from qref._quiet import import_torchao_quietly
import_torchao_quietly("torchao.quantization.pt2e.quantize_pt2e"); mark("import torchao pt2e (torch._dynamo)")
import torchao.quantization.pt2e.quantize_pt2e as pt2e
import qref
from qref.quantizers import QrefQuantizer
mark("import qref")
x = torch.randn(2, 3, 6, 6)
def model(c): return torch.nn.Sequential(torch.nn.Conv2d(3, c, 3)).eval()
first = torch.export.export(model(4), (x,)).module(); mark("first torch.export.export")
second = torch.export.export(model(5), (x,)).module(); mark("second torch.export.export")
first = pt2e.prepare_pt2e(first, QrefQuantizer()); first(x); mark("first prepare_pt2e + calibration")
second = pt2e.prepare_pt2e(second, QrefQuantizer()); second(x); mark("second prepare_pt2e + calibration")
qref.convert_pt2e(first); mark("qref.convert_pt2e")
pt2e.convert_pt2e(second); mark("torchao convert_pt2e")
for (_, a), (name, b) in zip(marks, marks[1:]):
    print(f"  {name:40s} {b - a:6.2f} s")
'''


def main() -> int:
    print("one worker's first steps (a fresh interpreter):")
    subprocess.run([sys.executable, "-c", _STEPS], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    qref_cli = [str(Path(sys.executable).with_name("qref")), "check", "qref-pt2e", "--profile", "quick",
                "--", "-q", "-k", "no_property_has_this_name"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(qref_cli, cwd=tmp, capture_output=True)
        print(f"a whole `qref check` that runs no property: {time.perf_counter() - start:6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
