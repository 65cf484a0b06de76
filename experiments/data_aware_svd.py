"""Plain against data-aware channel SVD (whitened) or Tucker-2 on the pretrained CIFAR-10
ResNet-20.

Uniform ranks: every 3x3 conv but the first keeps a fraction of its MACs; no fine-tuning;
256 training images for calibration; top-1 on CIFAR-10 test images 0..1016 (the setting of
METHODS.md §5). With ``--method tucker`` also the mean relative output error of the layers
on the calibration statistics. Run from the repository root:

    .venv/bin/python experiments/data_aware_svd.py [--method tucker] [--fractions 0.5 0.73]
"""

import argparse

import torch
from torch import nn

import rankcut as rc
from rankcut.calibrate import input_second_moments
from rankcut.curves import output_error
from rankcut.data import read_cifar10_bin, require_data_root
from rankcut.models import create, normalizer, pretrained_path
from rankcut.train import evaluate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["svd", "tucker"], default="svd")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.73])
    parser.add_argument("--calib", type=int, default=256, help="calibration images")
    args = parser.parse_args()
    root = require_data_root()
    model = create("resnet20_cifar", weights=pretrained_path("resnet20_cifar", root)).eval()
    norm = normalizer("resnet20_cifar")
    train, _ = read_cifar10_bin(root, "train", limit=args.calib)
    batches = [norm(train[i:i + 64]) for i in range(0, len(train), 64)]
    images, labels = read_cifar10_bin(root, "test")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]

    def top1(m):
        return evaluate(m, (images, labels), transform=norm)["top1"]

    method = args.method
    label = {"svd": "SVD", "tucker": "Tucker-2"}[method]
    covs = input_second_moments(model, names, batches)

    def mean_output_error(compressed):  # over the layers, on the calibration statistics
        with torch.no_grad():
            errs = [output_error(model.get_submodule(n), compressed.get_submodule(n)
                                 .dense_weight(), covs[n]) for n in names]
        return sum(errs) / len(errs)

    print(f"dense: {top1(model):.2f}% top-1 on {len(images)} test images")
    cols = [f"plain {label} %", f"data-aware {label} %", "plain out err", "data-aware out err"]
    print(f"{'MACs kept per layer':>20}" + "".join(f" {c}" for c in cols))
    for fraction in args.fractions:
        plain, aware = rc.Plan(), rc.Plan()
        for name in names:
            ranks = rc.select.layer_ranks(model.get_submodule(name), method,
                                          f"macs={fraction}", input_hw=(32, 32))
            plain[name] = rc.LayerPlan(method, ranks)
            aware[name] = rc.LayerPlan(method, ranks, options={"data_aware": True})
        # each layer fitted to the dense model's own inputs (the setting of METHODS.md §5), not
        # sequentially to those of the layers compressed before it (rc.apply's default with data)
        small = [rc.apply(model, plain),
                 rc.apply(model, aware, calib_data=batches, sequential=False)]
        values = [top1(m) for m in small] + [mean_output_error(m) for m in small]
        print(f"{fraction:>20}" + "".join(f" {v:>{len(c)}.{2 if '%' in c else 4}f}"
                                          for c, v in zip(cols, values, strict=True)))


if __name__ == "__main__":
    main()
