"""Sequential fitting with and without dense stand-ins for slow CP layers: time and top-1.

``rc.apply`` with calibration data fits the layers one at a time, each to the inputs the layers
before it (already factorized) give it: every layer's fit runs the calibration data through
the partly factorized model. A CP layer with a quarter of the dense conv's parameters or more
runs slower than that conv (its depthwise stages), so those passes run it as its dense
equivalent (``rankcut.surgery.STAND_IN_CP_FRACTION``). This times ``rc.apply`` on a pretrained
CIFAR-10 ResNet at seed 000's CP rank rule (``params=P``), the calibration images the first N
training images, with the stand-ins (the default) and without them (the fraction set to
infinity), and prints each model's top-1 on the CIFAR-10 test images (no fine-tuning). Run one
at a time, nothing else running:

    .venv/bin/python benchmarks/sequential_apply.py [--models resnet20_cifar resnet56_cifar]
        [--rank params=0.5] [--calib 512]
"""

from __future__ import annotations

import argparse
import time

import rankcut as rc
import rankcut.surgery as surgery
from _common import cifar_test_and_calib, header
from rankcut.models import create, normalizer, pretrained_path
from rankcut.train import evaluate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar"])
    parser.add_argument("--rank", default="params=0.5", help="the CP rank rule")
    parser.add_argument("--calib", type=int, default=512, help="calibration images")
    args = parser.parse_args()
    root, images, labels, train = cifar_test_and_calib(args.calib)
    print(f"{header()}; CP {args.rank}, {args.calib} calibration images; CIFAR-10 test images "
          f"0..{len(images) - 1}; no fine-tuning", flush=True)
    print(f"{'model':>16} {'stand-ins':>9} {'apply s':>8} {'top-1 %':>8}", flush=True)
    default = surgery.STAND_IN_CP_FRACTION
    for name in args.models:
        norm = normalizer(name)
        calib = [norm(train[i:i + 128]) for i in range(0, len(train), 128)]
        model = create(name, weights=pretrained_path(name, root)).eval()
        plan = rc.plan(model, calib[0][:1], method="cp", rank=args.rank, calib_data=calib,
                       allow_slower=True)
        for fraction, label in ((default, "on"), (float("inf"), "off")):
            surgery.STAND_IN_CP_FRACTION = fraction
            start = time.perf_counter()
            small = rc.apply(model, plan, calib_data=calib)
            took = time.perf_counter() - start
            top1 = evaluate(small, (images, labels), transform=norm)["top1"]
            print(f"{name:>16} {label:>9} {took:8.1f} {top1:8.2f}", flush=True)
        surgery.STAND_IN_CP_FRACTION = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
