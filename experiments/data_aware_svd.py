"""Plain against data-aware (whitened) channel SVD on the pretrained CIFAR-10 ResNet-20.

Uniform ranks: every 3x3 conv but the first keeps a fraction of its MACs; no fine-tuning;
256 training images for calibration; top-1 on CIFAR-10 test images 0..1016 (the setting of
METHODS.md §5). Run from the repository root:

    .venv/bin/python experiments/data_aware_svd.py [--fractions 0.5 0.73]
"""

import argparse

from torch import nn

import rankcut as rc
from rankcut.data import find_data_root, read_cifar10_bin
from rankcut.models import create, normalizer
from rankcut.profile import top1_accuracy

RESNET20 = "weights/resnet_cifar10_akamaster/resnet20-12fca82f.th"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.73])
    parser.add_argument("--calib", type=int, default=256, help="calibration images")
    args = parser.parse_args()
    root = find_data_root()
    if root is None:
        raise SystemExit("needs the shared data: set $RANKCUT_DATA or place it at ../shared/data")
    model = create("resnet20_cifar", weights=root / RESNET20).eval()
    norm = normalizer("resnet20_cifar")
    train, _ = read_cifar10_bin(root, "train", limit=args.calib)
    batches = [norm(train[i:i + 64]) for i in range(0, len(train), 64)]
    images, labels = read_cifar10_bin(root, "test")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]
    def top1(m):
        return top1_accuracy(m, images, labels, transform=norm)

    print(f"dense: {top1(model):.2f}% top-1 on {len(images)} test images")
    print(f"{'MACs kept per layer':>20} {'plain SVD %':>12} {'data-aware SVD %':>17}")
    for fraction in args.fractions:
        plain, aware = rc.Plan(), rc.Plan()
        for name in names:
            (rank,) = rc.select.layer_ranks(model.get_submodule(name), "svd",
                                            f"macs={fraction}", input_hw=(32, 32))
            plain[name] = rc.LayerPlan("svd", (rank,))
            aware[name] = rc.LayerPlan("svd", (rank,), options={"data_aware": True})
        acc_plain = top1(rc.apply(model, plain))
        acc_aware = top1(rc.apply(model, aware, calib_data=batches))
        print(f"{fraction:>20} {acc_plain:12.2f} {acc_aware:17.2f}")


if __name__ == "__main__":
    main()
