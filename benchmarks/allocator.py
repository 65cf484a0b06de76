"""How much of a compressed model's CPU time is the C allocator's? (issue 12)

glibc's malloc gives large freed blocks back to the OS and faults them in again, page by page,
at the next allocation; an eager PyTorch forward allocates every activation afresh, so a model
with more and wider intermediate tensors (a factorized one) pays more of it.
``rankcut.profile.keep_freed_memory()`` has glibc keep freed memory instead. This script times
dense and compressed models with glibc's defaults and with freed memory kept, each in a fresh
process (the setting is process-wide, and glibc adapts its thresholds as a process runs).

For each model and method: ``rc.plan(method=..., target=..., allow_slower=True)`` without data
(no timing in the plan, so both processes plan the same layers), the planned model built with
fresh weights, both fused (``rc.fuse(memory_format="auto")``), timed interleaved
(``compare_latency``, median of ``--repeats``) in ``--rounds`` rounds; printed: the dense and
compressed medians of the middle round and the speed-up of each round.

    .venv/bin/python benchmarks/allocator.py [--models resnet20_cifar] [--methods auto svd]
        [--target macs=2x] [--batch 32]
"""

import argparse
import json
import subprocess
import sys
import warnings

MODES = ("glibc", "kept")


def child(args) -> None:
    import torch

    import rankcut as rc
    from rankcut.profile import allocator, compare_latency, count_macs, keep_freed_memory
    from rankcut.surgery import structure

    if args.child == "kept" and not keep_freed_memory():
        raise SystemExit("the C library here is not glibc")
    from latency import load  # (benchmarks/latency.py: the same models and weights)

    torch.manual_seed(0)  # (random weights where none are shared: the same in both processes)

    for name in args.models:
        model, x1, source = load(name)
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
                "speedups": [a.median_ms / b.median_ms for a, b in rounds]}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar"])
    parser.add_argument("--methods", nargs="+", default=["auto", "svd", "tucker", "cp3"])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from _common import header

    print(f"{header()}; batch {args.batch}, {args.target}, guard off, no data; each allocator "
          "in a fresh process; ms: median of the middle round (dense / compressed, both "
          "fused); speed-up of each round", flush=True)
    rows = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--child", mode, *sys.argv[1:]],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {mode} process failed:\n{done.stderr}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["model"], r["method"], mode)] = r
    print(f"{'model':>15} {'method':>7} {'MACs x':>6} | {'glibc: dense / comp ms':>23} "
          f"{'speed-ups':>17} | {'kept: dense / comp ms':>22} {'speed-ups':>17}")
    for name in args.models:
        for method in args.methods:
            cells = []
            for mode in MODES:
                r = rows[(name, method, mode)]
                cells.append(f"{r['dense_ms']:>10.2f} / {r['small_ms']:>7.2f} ms "
                             f"{' '.join(f'{s:.2f}' for s in r['speedups']):>17}")
            macs_x = rows[(name, method, MODES[0])]["macs_x"]
            print(f"{name:>15} {method:>7} {macs_x:>5.2f}x | {cells[0]} | {cells[1]}")
    print(f"allocators: {rows[(args.models[0], args.methods[0], 'glibc')]['allocator']!r}, "
          f"{rows[(args.models[0], args.methods[0], 'kept')]['allocator']!r}")


if __name__ == "__main__":
    main()
