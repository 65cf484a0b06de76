"""Top-1 of the pretrained CIFAR-10 ResNet-20 / ResNet-56 after planning, without fine-tuning.

Test images 0..1016 of CIFAR-10 (the ones in ../shared/data), no fine-tuning: how much accuracy
each plan keeps on its own. Methods ending in "+data" plan and factorize with calibration
statistics from the first ``--calib`` training images; the others see no data. Run from the
repository root:

    .venv/bin/python experiments/plan_accuracy.py [--model resnet20_cifar] [--targets 1.5 2 3]
"""

import argparse
import time

import torch

import rankcut as rc
from rankcut.data import find_data_root, read_cifar10_bin
from rankcut.models import create
from rankcut.profile import count_macs

WEIGHTS = {"resnet20_cifar": "resnet20-12fca82f.th", "resnet56_cifar": "resnet56-4bfd9763.th"}
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@torch.no_grad()
def top1(model, images, labels):
    model.eval()
    correct = 0
    for i in range(0, len(images), 256):
        x = (images[i:i + 256].float() / 255 - MEAN) / STD
        correct += int((model(x).argmax(1) == labels[i:i + 256]).sum())
    return 100.0 * correct / len(images)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet20_cifar", choices=sorted(WEIGHTS))
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=["svd", "tucker", "auto", "auto+data"],
                        help="planner methods; '+data' plans and applies with calibration data")
    parser.add_argument("--calib", type=int, default=512, help="calibration training images")
    args = parser.parse_args()
    root = find_data_root()
    if root is None:
        raise SystemExit("needs the shared data: set $RANKCUT_DATA or place it at ../shared/data")
    images, labels = read_cifar10_bin(root, "test")
    train, _ = read_cifar10_bin(root, "train", limit=args.calib)
    calib = [(train[i:i + 128].float() / 255 - MEAN) / STD for i in range(0, len(train), 128)]
    model = create(args.model, weights=root / "weights/resnet_cifar10_akamaster" /
                   WEIGHTS[args.model]).eval()
    x = torch.rand(1, 3, 32, 32)
    print(f"{args.model}: {top1(model, images, labels):.2f}% top-1 on {len(images)} test images "
          f"(dense, {count_macs(model, x):,} MACs)")
    print(f"{'target':>8} {'method':>9} {'MACs ratio':>10} {'top-1 %':>8} {'plan s':>7}")
    for ratio in args.targets:
        for method in args.methods:
            start = time.perf_counter()
            base, _, data = method.partition("+")
            data = calib if data else None
            plan = rc.plan(model, x, method=base, target=f"macs={ratio}x", calib_data=data)
            small = rc.apply(model, plan, calib_data=data)
            seconds = time.perf_counter() - start
            achieved = count_macs(model, x) / count_macs(small, x)
            print(f"{ratio:>7}x {method:>9} {achieved:10.3f} {top1(small, images, labels):8.2f} "
                  f"{seconds:7.1f}")


if __name__ == "__main__":
    main()
