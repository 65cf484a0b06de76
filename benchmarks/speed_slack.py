"""What ``speed_slack`` trades: top-1 without fine-tuning against measured speed-up.

For each model, target, calibration setting and slack: ``rc.plan(method="auto", target=...,
speed_slack=...)`` with the guard on, on example inputs of ``--batch`` (one latency table per
model, shared by its plans), applied (with the calibration data when given: the first 1024
CIFAR-10 training images, un-augmented), top-1 on CIFAR-10 test images 0..1016; then the planned
model (fresh weights) and the dense model, both through ``rc.fuse(memory_format="auto")``, timed
against each other at that batch, interleaved, median of 20 passes, ``--rounds`` times over, in
PyTorch eager and in ONNX Runtime (as ``benchmarks/latency.py`` does: a cell is the rounds'
median speed-up, its efficiency and the rounds' range). A target the guard refuses (measured
slower than dense) prints its reason. The slacks of one target and calibration setting share
one ``CandidateCache``: the first plan scores the candidates, the others reuse them. ``pred``
is the planner's predicted speed-up; ``damage`` the predicted damage (Σ error², loss-weighted
with data) before and after the slack was spent. Run from the repository root, nothing else running:

    .venv/bin/python benchmarks/speed_slack.py [--models resnet20_cifar vgg11_bn_cifar]
        [--targets macs=2x macs=3x] [--slacks 0 0.1 0.25] [--calib none data] [--batch 32]
        [--rounds 3]
"""

import argparse
import time
import warnings

import rankcut as rc
from _common import cifar_test_and_calib, header
from latency import cell, load, timings
from rankcut.models import normalizer
from rankcut.profile import count_macs, with_batch
from rankcut.select import LatencyTable, parse_target
from rankcut.select.budget import TargetUnreachable
from rankcut.surgery import structure
from rankcut.train import evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar", "vgg11_bn_cifar"])
    parser.add_argument("--targets", nargs="+", default=["macs=2x", "macs=3x"])
    parser.add_argument("--slacks", nargs="+", type=float, default=[0.0, 0.1, 0.25])
    parser.add_argument("--calib", nargs="+", default=["none", "data"], choices=["none", "data"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds of each plan (a cell: the rounds' median speed-up)")
    args = parser.parse_args()
    for target in args.targets:
        parse_target(target)
    _, images, labels, train = cifar_test_and_calib(1024)
    print(f"{header()}, "
          f"{LatencyTable().setting['device']}; batch {args.batch}; CIFAR-10 test images "
          f"0..{len(images) - 1}; no fine-tuning", flush=True)
    print(f"{'model':>15} {'target':>8} {'calib':>5} {'slack':>5} {'top-1 %':>7} {'MACs x':>6} "
          f"{'plan s':>6} {'damage':>13} {'pred':>5} {'eager':>24} {'ort':>24}", flush=True)
    for name in args.models:
        model, x1, source = load(name, "cpu")
        if source != "pretrained":
            raise SystemExit(f"{name}: needs its pretrained weights in the shared data")
        norm = normalizer(name)
        calib = [norm(train[i:i + 128]) for i in range(0, len(train), 128)]
        macs, table = count_macs(model, x1), LatencyTable()
        cache = rc.select.CandidateCache(max_entries=4)  # the slacks of a setting share scores
        x = with_batch(x1, args.batch)[0]
        dense = rc.fuse(model, x, memory_format="auto")
        for target in args.targets:
            for setting in args.calib:
                data = calib if setting == "data" else None
                for slack in args.slacks:
                    start = time.perf_counter()
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            plan = rc.plan(model, x, method="auto", target=target,
                                           calib_data=data, speed_slack=slack,
                                           latency_table=table, cache=cache)
                    except TargetUnreachable as err:  # (the guard's refusal: slower than dense)
                        print(f"{name:>15} {target:>8} {setting:>5} {slack:>5.2f}  no plan: "
                              f"{str(err).split(': ', 1)[-1][:160]}", flush=True)
                        continue
                    plan_s = time.perf_counter() - start
                    top1 = evaluate(rc.apply(model, plan, calib_data=data), (images, labels),
                                    transform=norm)["top1"]
                    small = rc.fuse(structure(model, plan), x, memory_format="auto")
                    times = timings(dense, small, x, ["eager", "ort"], 5, 20, args.rounds)
                    reduction = macs / count_macs(small, x1)
                    lat = plan.meta["latency"]
                    speed = lat.get("speed")
                    damage = "-" if not speed else \
                        f"{speed['damage_before']:.3f}>{speed['damage']:.3f}"
                    print(f"{name:>15} {target:>8} {setting:>5} {slack:>5.2f} {top1:>7.2f} "
                          f"{reduction:>6.2f} {plan_s:>6.0f} {damage:>13} "
                          f"{1 / lat['predicted_ratio'][str(args.batch)]:>5.2f} "
                          + " ".join(f"{cell(times[e], reduction):>24}" for e in ("eager", "ort")),
                          flush=True)


if __name__ == "__main__":
    main()
