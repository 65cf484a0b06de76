"""How much of a compressed model's CPU time is the C allocator's? (issue 12)

glibc's malloc gives large freed blocks back to the OS and faults them in again, page by page,
at the next allocation; an eager PyTorch forward allocates every activation afresh, so a model
with more and wider intermediate tensors (a factorized one) pays more of it.
``rankcut.profile.keep_freed_memory()`` has glibc keep freed memory instead. This script times
dense and compressed models under each of ``--modes``, each in a fresh process (the setting is
process-wide, and glibc adapts its thresholds as a process runs):
- ``glibc``: its defaults, as the process left them after loading and planning (which may
  already have freed blocks that raised its thresholds: no clean slate);
- ``grown``: its defaults, after one block of ``--grown-mb`` MB was allocated and freed first:
  glibc then serves blocks up to that size from its heap and keeps up to twice it free (its
  own adjustment of the mmap and trim thresholds, which only rises, up to 32 MB), as in any
  process that freed such a block before (a planner's solver, a data loader): the same models
  time differently by what the process did before;
- ``kept``: :func:`rankcut.profile.keep_freed_memory`.

For each model and method: ``rc.plan(method=..., target=..., allow_slower=True)`` without data
(no timing in the plan, so both processes plan the same layers), the planned model built with
fresh weights, both fused (``rc.fuse(memory_format="auto")``), timed interleaved
(``compare_latency``, median of ``--repeats``) in ``--rounds`` rounds; printed: the dense and
compressed medians of the middle round, their page faults a pass (``Latency.page_faults``: memory
the OS mapped in afresh, 4 KB a fault) and the speed-up of each round.

    .venv/bin/python benchmarks/allocator.py [--models resnet20_cifar] [--methods auto svd]
        [--target macs=2x] [--batch 32] [--modes glibc grown kept] [--grown-mb 16]
"""

import argparse
import json
import subprocess
import sys
import warnings

MODES = ("glibc", "grown", "kept")


def child(args) -> None:
    import torch

    import rankcut as rc
    from rankcut.profile import allocator, compare_latency, count_macs, keep_freed_memory
    from rankcut.surgery import structure

    if args.child == "kept" and not keep_freed_memory():
        raise SystemExit("the C library here is not glibc")
    if args.child == "grown":  # (mapped afresh, being past glibc's 128 KB start; freed: unmapped)
        block = torch.empty(args.grown_mb << 20, dtype=torch.uint8).fill_(1)
        del block
    from latency import load  # (benchmarks/latency.py: the same models and weights)

    torch.manual_seed(0)  # (random weights where none are shared: the same in both processes)

    for name in args.models:
        model, x1, source = load(name, "cpu")
        x = x1.expand(args.batch, *x1.shape[1:]).contiguous()
        dense = rc.fuse(model, x, memory_format="auto")
        for method in args.methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = rc.plan(model, x, method=method, target=args.target, allow_slower=True)
            small = rc.fuse(structure(model, plan), x, memory_format="auto")
            rounds = [compare_latency(dense, small, x, repeats=args.repeats)
                      for _ in range(args.rounds)]
            mid = sorted(rounds, key=lambda r: r[0].median_ms / r[1].median_ms)[len(rounds) // 2]
            print(json.dumps({
                "model": name, "weights": source, "method": method, "allocator": allocator(),
                "macs_x": count_macs(model, x1) / count_macs(small, x1),
                "dense_ms": mid[0].median_ms, "small_ms": mid[1].median_ms,
                "faults": [mid[0].page_faults, mid[1].page_faults],
                "speedups": [a.median_ms / b.median_ms for a, b in rounds]}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar"])
    parser.add_argument("--methods", nargs="+", default=["auto", "svd", "tucker", "cp3"])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["glibc", "kept"], choices=MODES)
    parser.add_argument("--grown-mb", type=int, default=16,
                        help="the block the 'grown' process frees first (at most 31: glibc "
                             "adjusts its thresholds to blocks under 32 MB only)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.grown_mb <= 31:
        parser.error("--grown-mb: expected 1 to 31 (glibc's own thresholds follow freed blocks "
                     "under 32 MB only)")
    if args.child:
        return child(args)
    from _common import header

    print(f"{header()}; batch {args.batch}, {args.target}, guard off, no data; each allocator "
          "in a fresh process; ms: median of the middle round (dense / compressed, both "
          "fused), with their page faults a pass; speed-up of each round", flush=True)
    rows = {}
    for mode in args.modes:
        done = subprocess.run([sys.executable, __file__, "--child", mode, *sys.argv[1:]],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {mode} process failed:\n{done.stderr}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["model"], r["method"], mode)] = r
    print(f"{'model':>15} {'method':>7} {'MACs x':>6} | " + " | ".join(
        f"{mode + ': dense / comp ms':>23} {'faults a pass':>15} {'speed-ups':>17}"
        for mode in args.modes))
    for name in args.models:
        for method in args.methods:
            cells = []
            for mode in args.modes:
                r = rows[(name, method, mode)]
                faults = "-" if None in r["faults"] else \
                    f"{r['faults'][0]:,.0f} / {r['faults'][1]:,.0f}"
                cells.append(f"{r['dense_ms']:>10.2f} / {r['small_ms']:>7.2f} ms {faults:>15} "
                             f"{' '.join(f'{s:.2f}' for s in r['speedups']):>17}")
            macs_x = rows[(name, method, args.modes[0])]["macs_x"]
            print(f"{name:>15} {method:>7} {macs_x:>5.2f}x | " + " | ".join(cells))
    print("allocators: " + ", ".join(
        f"{mode}: {rows[(args.models[0], args.methods[0], mode)]['allocator']!r}"
        for mode in args.modes))


if __name__ == "__main__":
    main()
