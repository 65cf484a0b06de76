"""Do compressed models run faster than their originals? (issue 12's table)

For each model, target and batch: ``rc.plan(method="auto", target=...)`` without calibration
data on example inputs of that batch (``--guard on``: the default settings, which keep the plan
no slower than dense at that batch; ``off``: ``allow_slower=True``), one latency table per model
shared by its plans (built by the first, so later plans time little: ``plan s`` shows both). The
planned model is built with fresh weights (``rankcut.structure``: the time of a pass does not
depend on the values); it and the dense model go through ``rc.fuse(memory_format="auto")``
(BatchNorm folded, the faster memory format of each: what a deployment runs). They are then
timed against each other at that batch, interleaved, median of ``--repeats`` passes after
warm-up, ``--rounds`` times over (a cell: the median of the rounds' speed-ups, its efficiency,
and the rounds' lowest-highest; on a shared machine one reading of a cell can move 20-40%
from one process to the next, the rounds of one process far less):
- ``eager``: PyTorch, under no_grad, on this machine's torch threads;
- ``ort``: the ``rc.export`` ONNX files in ONNX Runtime (CPU, all graph optimisations, as many
  intra-op threads as torch has; ``rankcut.profile``'s ``engine="onnxruntime"``);
- ``compile``: both fused models through ``torch.compile`` (default mode, one compilation per
  model and batch, paid in the warm-up), then timed as ``eager``.
``--device cuda`` plans (its latency table timed there), fuses and times on the GPU (passes
synchronised; ``ort`` is CPU-only and refused there).
``--table-engine ort`` plans with an ONNX Runtime latency table (plans made for ORT deployment).
speed-up = dense time / compressed time; eff = speed-up / MAC reduction (1.0: the time falls as
fast as the MACs); ``pred`` = the planner's predicted time ratio (dense / planned) from its
table, to set beside the eager speed-up it predicts.

Models: the CIFAR-10 ResNet-20, ResNet-56 and VGG-11-BN at 32x32 (pretrained weights from
../shared/data when there, else random: the plan then differs, the timing method not), and
torchvision's ResNet-18, ResNet-50 and MobileNetV2 at 224x224 with random weights. Run from the
repository root, nothing else running:

    .venv/bin/python benchmarks/latency.py [--models resnet20_cifar] [--targets macs=2x]
        [--guard on off] [--batches 1 32] [--engines eager ort compile]
        [--table-engine eager|ort] [--device cpu|cuda] [--rounds 3] [--keep-freed-memory]
        [--json out.jsonl]

``--json``: one line per cell with the plan's ``meta["latency"]`` (the planner's own
whole-model checks, with their page faults), every round's (dense, compressed) ms per engine and
the memory format ``rc.fuse`` chose for each model (``formats``).
"""

import argparse
import json
import platform
import statistics
import time
import warnings

import torch

import rankcut as rc
from _common import commit, header
from rankcut._modes import available_device
from rankcut.data import find_data_root
from rankcut.models import PRETRAINED, create
from rankcut.profile import (
    allocator,
    compare_latency,
    count_macs,
    keep_freed_memory,
    with_batch,
)
from rankcut.select import LatencyTable, parse_target
from rankcut.surgery import structure

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2"]
TARGETS = ["macs=2x", "macs=4x", "latency=1.5x", "latency=2x"]


def load(name: str, device: str):
    """(model in eval mode, one 3xHxW input, where its weights came from), on ``device``."""
    if name in PRETRAINED:
        root = find_data_root()
        path = None if root is None else root / PRETRAINED[name]
        if path is not None and path.exists():
            model, x, source = create(name, weights=path), torch.rand(1, 3, 32, 32), "pretrained"
        else:
            model, x, source = create(name), torch.rand(1, 3, 32, 32), "random"
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        x, source = torch.rand(1, 3, 224, 224), "random"
    return model.eval().to(device), x.to(device), source


# benchmark engine: rankcut.profile engine (``compile``: eager timing of torch.compile'd models)
ENGINES = {"eager": "eager", "ort": "onnxruntime", "compile": "eager"}


def timings(dense, small, x, engines, warmup, repeats, rounds) -> dict:
    """{engine: [(dense ms, compressed ms) per round]} of the fused models on ``x``
    (``rankcut.profile.compare_latency``: interleaved medians, ``rounds`` times over; ``ort``:
    both exported to ONNX and run in ONNX Runtime on the CPU; ``compile``: both through
    ``torch.compile`` once, compiled in the first round's warm-up)."""
    out = {}
    for e in engines:
        a, b = dense, small
        if e == "compile":  # (dynamo's cache forgotten: the cells' models share forward code,
            torch._dynamo.reset()  # past its recompile limit it would run them eager, silently)
            a, b = torch.compile(dense), torch.compile(small)
        out[e] = [tuple(t.median_ms for t in compare_latency(
                      a, b, x, warmup=warmup, repeats=repeats, engine=ENGINES[e]))
                  for _ in range(rounds)]
    return out


def cell(pairs, reduction) -> str:
    """The median speed-up over the rounds, its efficiency, and the rounds' range when more
    than one: "1.25x (0.62) 1.18-1.36"."""
    ups = sorted(a / b for a, b in pairs)
    up = statistics.median(ups)
    spread = f" {ups[0]:.2f}-{ups[-1]:.2f}" if len(ups) > 1 else ""
    return f"{up:.2f}x ({up / reduction:.2f}){spread}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*PRETRAINED, *TORCHVISION],
                        choices=[*PRETRAINED, *TORCHVISION])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--guard", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--engines", nargs="+", default=["eager", "ort"],
                        choices=list(ENGINES))
    parser.add_argument("--device", default="cpu",
                        help="where to plan and time (cpu, cuda, cuda:N; ort runs on the CPU "
                             "and is refused elsewhere)")
    parser.add_argument("--table-engine", default="eager", choices=["eager", "ort"],
                        help="what the planner's latency table times (ort: plans made for "
                             "ONNX Runtime)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="time each cell this many times over (each: --repeats interleaved "
                             "passes after --warmup); the median speed-up is shown, with the "
                             "rounds' range")
    parser.add_argument("--json", help="append one JSON line per result to this file")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="rankcut.profile.keep_freed_memory() first: glibc keeps freed "
                             "memory (no page faults for activations); planned and timed so")
    args = parser.parse_args()
    if min(args.rounds, args.repeats) < 1 or args.warmup < 0:
        parser.error("--rounds and --repeats must be at least 1, --warmup at least 0")
    if args.device != "cpu" and "ort" in [*args.engines, args.table_engine]:
        parser.error(f"ort runs on the CPU: drop it from --engines / --table-engine with "
                     f"--device {args.device}")
    try:
        device = available_device(args.device)
    except ValueError as err:
        parser.error(f"--device: {err}")
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory: the C library here is not glibc")
    for target in args.targets:
        parse_target(target)
    print(f"{header()}, {platform.processor() or ''}"
          f", {LatencyTable(device).setting['device']}, allocator: {allocator()}; planned with a "
          f"{args.table_engine} latency "
          f"table; speed-up = dense / compressed (both fused), "
          f"eff = speed-up / MAC reduction", flush=True)
    head = " ".join(f"{e:>24}" for e in args.engines)
    for name in args.models:
        model, x1, source = load(name, device)
        macs = count_macs(model, x1)
        table, fused = LatencyTable(device, engine=ENGINES[args.table_engine]), {}
        print(f"\n{name} ({source} weights, input {tuple(x1.shape[1:])}), {macs:,} MACs",
              flush=True)
        print(f"{'target':>12} {'guard':>5} {'batch':>5} {'MACs x':>7} {'plan s':>7} "
              f"{'pred':>6} {head}", flush=True)
        for target in args.targets:
            for guard in args.guard:
                for batch in args.batches:
                    x = with_batch(x1, batch)[0]
                    start = time.perf_counter()
                    try:
                        with warnings.catch_warnings(record=True) as said:
                            warnings.simplefilter("always")
                            plan = rc.plan(model, x, method="auto", target=target,
                                           allow_slower=guard == "off", latency_table=table)
                    except ValueError as err:
                        print(f"{target:>12} {guard:>5} {batch:>5}  no plan: {err}", flush=True)
                        continue
                    plan_s = time.perf_counter() - start
                    lat = plan.meta.get("latency") or {}
                    pred = lat.get("predicted_ratio", {}).get(str(batch))
                    if batch not in fused:  # the faster format at this batch, chosen once
                        fused[batch] = rc.fuse(model, x, memory_format="auto")
                    dense = fused[batch]
                    small = rc.fuse(structure(model, plan).to(device), x, memory_format="auto")
                    reduction = macs / count_macs(small, x1)
                    times = timings(dense, small, x, args.engines, args.warmup, args.repeats,
                                    args.rounds)
                    cells = [cell(times[e], reduction) for e in args.engines]
                    pred_s = "-" if pred is None else f"{1 / pred:.2f}x"
                    print(f"{target:>12} {guard:>5} {batch:>5} {reduction:>6.2f}x {plan_s:>7.1f} "
                          f"{pred_s:>6} " + " ".join(f"{c:>24}" for c in cells), flush=True)
                    for w in said:
                        if str(w.message).startswith("target: "):
                            text = str(w.message).removeprefix("target: ").split(". ")[0]
                            print(f"{'':>20}(warned: {text})", flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps({
                                "model": name, "target": target, "guard": guard,
                                "batch": batch, "table_engine": args.table_engine,
                                "device": LatencyTable(device).setting["device"],
                                "macs_reduction": reduction, "plan_s": plan_s,
                                "formats": [m.rankcut_fuse.get("memory_format")
                                            for m in (dense, small)],
                                "latency": lat, "ms": times, "commit": commit(),
                                "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
