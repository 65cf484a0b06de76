"""The example report of docs/reports.md: the pretrained CIFAR-10 ResNet-20 planned to 2x fewer
MACs with Tucker-2 (no data, no latency guard, no fine-tuning), compared with the original on the
first 1000 CIFAR-10 test images, 8 of them as the example input (latency at batch 1 and 8).
Prints the report's Markdown. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/report_example.py
"""

import torch

import rankcut as rc
from rankcut.data import read_cifar10_bin, require_data_root
from rankcut.models import create, normalizer, pretrained_path
from rankcut.report import compare


def main():
    root = require_data_root()
    model = create("resnet20_cifar",
                   weights=pretrained_path("resnet20_cifar", root)).eval()
    norm = normalizer("resnet20_cifar")
    images, labels = read_cifar10_bin(root, "test", limit=1000)
    x = norm(images[:8])
    plan = rc.plan(model, x, method="tucker", target="macs=2x", allow_slower=True)
    small = rc.apply(model, plan)
    print(compare(model, small, x, plan=plan, data=(images, labels), transform=norm)
          .to_markdown())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
