"""Seed 000's transfer scenario: compress a pretrained CIFAR-10 backbone, freeze it, train a new
head on another dataset.

The pretrained CIFAR-10 ResNet (../shared/data) is compressed with ``rc.plan(method="auto",
target=...)`` (512 CIFAR-10 training images as calibration data, no fine-tuning); then
``rc.transfer`` replaces its 10-way CIFAR classifier with a fresh Linear for the new dataset,
freezes everything else (BatchNorm statistics included) and trains the head. The same is done to
the dense backbone for comparison. MNIST / Fashion-MNIST digits are turned into 3-channel 32x32
inputs with the backbone's normalisation. Top-1 on the new dataset's test split (first
``--test-limit`` images). Run from the repository root:

    .venv/bin/python experiments/transfer.py [--model resnet56_cifar] [--data fashion_mnist]
        [--target macs=2x] [--train-limit 10000] [--epochs 2]
"""

import argparse
import time

import torch

import rankcut as rc
from rankcut import data as D
from rankcut.models import create, pretrained_path
from rankcut.profile import count_macs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56_cifar",
                        choices=["resnet20_cifar", "resnet56_cifar"])
    parser.add_argument("--data", default="fashion_mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    root = D.require_data_root()
    model = create(args.model, weights=pretrained_path(args.model, root)).eval()
    x = torch.rand(1, 3, 32, 32)
    cifar = D.dataset("cifar10", "train", root=root, limit=2048,
                      transform=D.transforms("cifar10", train=False, normalization=args.model))
    calib = D.calibration(cifar, n=512, seed=0)
    start = time.perf_counter()
    plan = rc.plan(model, x, method="auto", target=args.target, calib_data=calib)
    small = rc.apply(model, plan, calib_data=calib)
    ratio = count_macs(model, x) / count_macs(small, x)
    print(f"{args.model}: compressed to {args.target} ({ratio:.2f}x fewer MACs) in "
          f"{time.perf_counter() - start:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def digits(split, limit):  # grey 28x28 -> the backbone's 3-channel 32x32 inputs
        t = D.transforms(args.data, train=False, normalization=args.model, size=32)
        return D.dataset(args.data, split, root=root, transform=t, limit=limit)

    train, test = digits("train", args.train_limit), digits("test", args.test_limit)
    print(f"| backbone | head trained on | top-1 % on {args.data} test ({len(test)}) | "
          f"minutes |\n|---|---|---:|---:|")
    for name, backbone in [("dense", model), (f"auto {args.target}", small)]:
        start = time.perf_counter()
        result = rc.transfer(backbone, train, num_classes=10, epochs=args.epochs, lr=args.lr,
                             batch_size=128, progress=False)
        top1 = rc.train.evaluate(result.model, test)["top1"]
        print(f"| {name} | {len(train)} {args.data} images, {args.epochs} epochs | {top1:.2f} | "
              f"{(time.perf_counter() - start) / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
