"""How much accuracy each way of choosing ranks keeps, without fine-tuning (issue 11's table).

Pretrained CIFAR-10 ResNet-20, ResNet-56 and VGG-11-BN (../shared/data), top-1 on CIFAR-10 test
images 0..1016, no fine-tuning, at whole-model targets (default: 1.5x / 2x / 3x / 4x fewer MACs
and 4x / 8x / 16x fewer params). Rows:
- ``tucker uniform``: Tucker-2 on every eligible layer at the same fraction of its MACs (or
  params), the fraction solved so that the whole model meets the target;
- ``tucker vbmf``: Tucker-2 at EVBMF ranks (Kim et al. 2016); its ratio is its own (one row);
- ``auto``: ``rc.plan(method="auto", target=...)`` with no data;
- ``auto+data``: the same with the first ``--calib`` CIFAR-10 training images (un-augmented) as
  calibration data: output-norm scoring, loss-aware allocation, and ``rc.apply`` fitting the
  layers sequentially (each to the inputs the factorized layers before it give, the dense
  outputs as target), BatchNorm statistics as trained;
- ``auto+synthetic``: the same with no data at all: 128 calibration inputs synthesised from the
  model's BatchNorm statistics (``rankcut.data.synthetic_calibration``, once per model, when
  the row first comes up; its seconds are printed there, not counted in ``plan s``).
The ``auto`` rows run with the latency guard off and on (``--guard``); the uniform and
VBMF rows ignore speed. ``plan s`` is ``rc.plan``, ``apply s`` is ``rc.apply`` (with data: the
sequential fitting). Last, per model, the rank correlation between the planner's predicted network
damage (``meta["predicted"]["damage"]`` of the ``auto+data`` plans: those of the synthetic row
are damage on other inputs) and the top-1 they lose.
The guarded plans of each model start from an empty latency cache (a temporary
``$RANKCUT_CACHE``) and share it, as a user's plans on one machine do: the first guarded plan of
a model pays for its timing.
``--plan-only`` times the planning alone (no apply, no accuracy). Run from the repository
root, one heavy job at a time:

    .venv/bin/python benchmarks/planning.py [--models resnet20_cifar] [--targets macs=3x]
        [--rows auto auto+data] [--guard off on] [--calib 1024] [--json out.jsonl]
        [--plan-only] [--batch 32] [--share-candidates]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

import rankcut as rc
from _common import cifar_test_and_calib, commit, empty_latency_cache, header
from rankcut.data import synthetic_calibration
from rankcut.models import PRETRAINED, create, normalizer, pretrained_path
from rankcut.profile import count_macs, count_params, layer_macs
from rankcut.select import parse_target
from rankcut.train import evaluate

ROWS = ["tucker uniform", "tucker vbmf", "auto", "auto+data", "auto+synthetic"]
SYNTHETIC = 128  # inputs synthesised for the auto+synthetic row
TARGETS = ["macs=1.5x", "macs=2x", "macs=3x", "macs=4x", "params=4x", "params=8x",
           "params=16x"]


def uniform_fraction(model, x, kind, keep):
    """The per-layer fraction of ``kind`` that brings the whole model to ``keep`` of it."""
    eligible = [n for n, r in rc.target_layers(model).items() if r is None]
    if kind == "macs":
        per_layer, total = layer_macs(model, x), count_macs(model, x)
    else:
        per_layer = {n: sum(p.numel() for p in model.get_submodule(n).parameters())
                     for n in eligible}
        total = count_params(model)
    planned = sum(per_layer[n] for n in eligible)
    return (total * keep - (total - planned)) / planned


def make_plan(model, x, row, target, calib, guard, rank_multiple=None, synthetic=None,
              cache=None):
    """The row's plan and the calibration data to apply it with (``synthetic``: the
    ``auto+synthetic`` row's)."""
    if row == "tucker vbmf":
        return rc.plan(model, x, method="tucker", rank="vbmf", allow_slower=True), None
    if row == "tucker uniform":
        kind, keep = parse_target(target)
        fraction = uniform_fraction(model, x, kind, keep)
        if fraction <= 0:
            raise ValueError(f"the eligible layers cannot shrink enough for {target}")
        return rc.plan(model, x, method="tucker", rank=f"{kind}={fraction:.6f}",
                       allow_slower=True), None
    data = {"auto+data": calib, "auto+synthetic": synthetic}.get(row)
    extra = {} if rank_multiple is None else {"rank_multiple": rank_multiple}
    return rc.plan(model, x, method="auto", target=target, calib_data=data,
                   allow_slower=not guard, cache=cache, **extra), data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PRETRAINED),
                        choices=sorted(PRETRAINED))
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, metavar="ROW")
    parser.add_argument("--guard", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--calib", type=int, default=1024, help="calibration training images")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch of the example inputs (the batch the latency guard keeps "
                             "the plan no slower than dense at)")
    parser.add_argument("--rank-multiple", type=int,
                        help="rc.plan's rank_multiple for the auto rows (default: its own)")
    parser.add_argument("--json", help="append one JSON line per result to this file")
    parser.add_argument("--plan-only", action="store_true",
                        help="time rc.plan only: no apply, no accuracy")
    parser.add_argument("--share-candidates", action="store_true",
                        help="the auto rows of a model share one rc.select.CandidateCache (in "
                             "memory), as a sweep of targets does: each setting's first plan "
                             "scores the candidates, later ones reuse them (plan s then "
                             "counts the reuse)")
    parser.add_argument("--summarise", metavar="JSONL",
                        help="only print the damage rank correlation of a --json file's rows")
    args = parser.parse_args()
    if args.summarise:
        rows = [json.loads(line) for line in Path(args.summarise).read_text().splitlines()]
        for name in dict.fromkeys(r["model"] for r in rows):
            damage_correlation([(r["damage"], r["top1"]) for r in rows
                                if r["model"] == name and r["damage"] is not None
                                and r["row"] == "auto+data"], name)
        return
    for target in args.targets:
        parse_target(target)
    root, images, labels, train = cifar_test_and_calib(args.calib)
    x = torch.rand(args.batch, 3, 32, 32)
    print(f"{header()}; CIFAR-10 test images "
          f"0..{len(images) - 1}; calibration: the first {args.calib} training images; no "
          "fine-tuning", flush=True)
    for name in args.models:
        empty_latency_cache()  # each model's first guarded plan times its layers (ResNet-56's
        # layers have ResNet-20's shapes: a shared cache would hand it ResNet-20's timings)
        norm = normalizer(name)
        calib = [norm(train[i:i + 128]) for i in range(0, len(train), 128)]
        model = create(name, weights=pretrained_path(name, root)).eval()
        macs, params = count_macs(model, x), count_params(model)
        dense = evaluate(model, (images, labels), transform=norm)["top1"]
        print(f"\n{name}: {dense:.2f}% top-1, {macs // len(x):,} MACs per image, {params:,} params",
              flush=True)
        scored, synthetic = [], None
        cache = rc.select.CandidateCache(max_entries=8) if args.share_candidates else None
        print(f"{'target':>10} {'row':>15} {'guard':>5} {'MACs x':>7} {'params x':>8} "
              f"{'top-1 %':>8} {'plan s':>7} {'apply s':>7}", flush=True)
        for i, target in enumerate(args.targets):
            for row in args.rows:
                if row == "tucker vbmf" and i > 0:
                    continue  # independent of the target: one row
                guards = args.guard if row.startswith("auto") else ["-"]
                for guard in guards:
                    label = "-" if row == "tucker vbmf" else target
                    start = time.perf_counter()
                    if row == "auto+synthetic" and synthetic is None:
                        synthetic = synthetic_calibration(model, x, n=SYNTHETIC, seed=0)
                        print(f"  (synthetic calibration: {SYNTHETIC} inputs in "
                              f"{time.perf_counter() - start:.1f} s)", flush=True)
                        start = time.perf_counter()
                    try:
                        plan, data = make_plan(model, x, row, target, calib, guard == "on",
                                               args.rank_multiple, synthetic, cache)
                    except ValueError as err:
                        print(f"{label:>10} {row:>15} {guard:>5}  not reachable: {err}",
                              flush=True)
                        continue
                    planned = time.perf_counter()
                    if args.plan_only:
                        predicted = plan.meta["predicted"]
                        print(f"{label:>10} {row:>15} {guard:>5} {predicted['macs_ratio']:7.2f} "
                              f"{predicted['params_ratio']:8.2f} {'-':>8} "
                              f"{planned - start:7.1f} {'-':>7}  (ratios predicted)", flush=True)
                        continue
                    small = rc.apply(model, plan, calib_data=data)
                    applied = time.perf_counter()
                    result = {"model": name, "target": label, "row": row, "guard": guard,
                              "macs_ratio": macs / count_macs(small, x),
                              "params_ratio": params / count_params(small),
                              "top1": evaluate(small, (images, labels), transform=norm)["top1"],
                              "plan_s": planned - start, "apply_s": applied - planned,
                              "damage": plan.meta.get("predicted", {}).get("damage"),
                              "dense_top1": dense, "commit": commit()}
                    print(f"{label:>10} {row:>15} {guard:>5} {result['macs_ratio']:7.2f} "
                          f"{result['params_ratio']:8.2f} {result['top1']:8.2f} "
                          f"{result['plan_s']:7.1f} {result['apply_s']:7.1f}", flush=True)
                    if args.json:
                        with Path(args.json).open("a") as f:
                            f.write(json.dumps(result) + "\n")
                    if result["damage"] is not None and row == "auto+data":
                        scored.append((result["damage"], result["top1"]))  # on the same data
        damage_correlation(scored, name)


def damage_correlation(scored, name):
    """Does the predicted network damage order the plans as the top-1 they lose does?"""
    if len(scored) >= 3:
        rho = spearmanr([d for d, _ in scored], [-a for _, a in scored]).statistic
        print(f"{name}: rank correlation (Spearman) of the predicted damage with the top-1 "
              f"lost, over {len(scored)} loss-aware plans: {rho:.3f}", flush=True)


if __name__ == "__main__":
    main()
