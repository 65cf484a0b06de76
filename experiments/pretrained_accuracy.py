"""Top-1 of the pretrained CIFAR-10 models in ../shared/data on test images 0..1016, read through
rankcut.data (dataset + transforms with each model's normalisation) and rankcut.models.create.
Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/pretrained_accuracy.py
"""

import argparse
import time

import torch

from rankcut import data
from rankcut.models import PRETRAINED, create, pretrained_path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None, help="data root (default $RANKCUT_DATA, "
                        "else ../shared/data)")
    args = parser.parse_args()
    root = data.require_data_root(args.root)
    print(f"{'model':<16} {'params':>10} {'top-1 %':>8} {'correct':>10} {'seconds':>8}")
    for name in PRETRAINED:
        start = time.perf_counter()
        ds = data.dataset("cifar10", "test", root=root,
                          transform=data.transforms("cifar10", train=False, normalization=name))
        model = create(name, weights=pretrained_path(name, root)).eval()
        correct = 0
        with torch.no_grad():
            for x, y in data.loader(ds, batch_size=256):
                correct += int((model(x).argmax(1) == y).sum())
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<16} {params:>10,} {100 * correct / len(ds):8.2f} "
              f"{f'{correct}/{len(ds)}':>10} {time.perf_counter() - start:8.1f}")


if __name__ == "__main__":
    main()
