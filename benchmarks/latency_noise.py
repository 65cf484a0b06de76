"""How much the latency table's times move between two builds, and what timing each primitive
for fewer runs (``rankcut.select.latency.RUNS_MS``) changes: the table's noise and the plans.

A torchvision model without weights (nothing is downloaded; times depend on the shapes), input
1x3x224x224, ``rc.plan(method="auto", target=...)`` with no calibration data and the default
latency guard, three times, each from its own empty cache folder holding only the candidates
the first plan scored (so the plans differ only in their timings): A at ``--reference`` ms of
runs per primitive, B at ``--runs-ms``, C at the reference again. Prints each plan's seconds,
then the relative difference of the primitives' times (median, 90th percentile, largest; the
median ratio) of C against A (the noise of two builds alike) and of B against A and C, and
whether the plans are the same. A also scores the candidates (CP-ALS before its timings), B and
C only time: B against C is the cleanest comparison.
Run from the repository root, alone on the machine:

    .venv/bin/python benchmarks/latency_noise.py [--models resnet18] [--runs-ms 5]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import rankcut as rc
from _common import header
from rankcut.select import latency


def _primitive_times(folder: Path) -> dict[str, float]:
    (path,) = folder.glob("latency-*.json")
    entries = json.loads(path.read_text())["entries"]
    return {k: v["1"] for k, v in entries.items()
            if k.startswith(latency.PRIMITIVE_KINDS) and "1" in v}


def _differences(x: dict, y: dict) -> str:
    """How far the times of ``x`` are from those of ``y``: the median, 90th percentile and
    largest relative difference, and the median ratio (a bias: one table slower overall)."""
    ratios = [x[k] / y[k] for k in x.keys() & y.keys()]
    r = sorted(abs(q - 1) for q in ratios)
    return (f"{len(r)} primitives: median {100 * statistics.median(r):.1f}%, 90th percentile "
            f"{100 * r[int(0.9 * (len(r) - 1))]:.1f}%, largest {100 * r[-1]:.0f}%; median "
            f"ratio {statistics.median(ratios):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--runs-ms", type=float, default=latency.RUNS_MS)
    parser.add_argument("--reference", type=float, default=25.0)
    args = parser.parse_args()
    print(f"{header()}; auto, {args.target}, no data, default latency guard, batch 1")
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.rand(1, 3, 224, 224)
        root = Path(tempfile.mkdtemp(prefix="rankcut-noise-"))
        try:
            _compare(name, model, x, root, args)
        finally:
            shutil.rmtree(root)


def _compare(name, model, x, root: Path, args) -> None:
    plans, tables = {}, {}
    for label, runs in (("A", args.reference), ("B", args.runs_ms), ("C", args.reference)):
        folder = root / label
        folder.mkdir()
        for f in (root / "A").glob("*") if label != "A" else ():
            if not f.name.startswith("latency-"):  # the scored candidates, not the table
                shutil.copy(f, folder)
        os.environ["RANKCUT_CACHE"] = str(folder)
        latency.RUNS_MS = runs
        start = time.perf_counter()
        plan = rc.plan(model, x, method="auto", target=args.target,
                       cache=rc.select.CandidateCache.cached())
        seconds = time.perf_counter() - start
        plans[label] = {n: (lp.method, tuple(lp.ranks), lp.form)
                        for n, lp in plan.active.items()}
        tables[label] = _primitive_times(folder)
        print(f"{name} {label}: {runs:g} ms of runs a primitive, plan {seconds:.1f} s "
              f"({'candidates scored' if label == 'A' else 'candidates read'}, "
              f"{plan.meta['latency']['timings_taken']} timings), "
              f"{plan.meta['predicted']['macs_ratio']:.2f}x fewer MACs", flush=True)
    a, b, c = tables["A"], tables["B"], tables["C"]
    print(f"{name} C against A ({args.reference:g} ms twice): {_differences(c, a)}")
    print(f"{name} B against A: {_differences(b, a)}")
    print(f"{name} B against C: {_differences(b, c)}")
    same = {f"{p}={q}": plans[p] == plans[q] for p, q in (("A", "C"), ("A", "B"), ("B", "C"))}
    print(f"{name} the same plan: " + ", ".join(f"{k} {v}" for k, v in same.items()))


if __name__ == "__main__":
    main()
