"""Seconds per fine-tuning step in channels_last (finetune's memory_format="auto") against the
contiguous layout (memory_format=None): a committed compressed model of results/ distilled from
its pretrained dense model on CIFAR-10 (batch 128, crop and flip), the two layouts interleaved
(after an untimed step of each; which goes first alternates from round to round).

    .venv/bin/python benchmarks/train_layout.py [--model resnet20_cifar]
        [--compressed results/resnet20_cifar-macs3.6x] [--steps 8] [--rounds 2] [--threads N]
"""

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rankcut as rc
from _common import commit
from rankcut import data as D
from rankcut.models import create, pretrained_path
from rankcut.train import finetune


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--compressed", default="results/resnet20_cifar-macs3.6x")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = D.require_data_root()
    dense = create(args.model, weights=pretrained_path(args.model, root)).eval()
    small = rc.load(create(args.model), args.compressed).float()
    train = D.dataset("cifar10", "train", root=root, transform=D.transforms(
        "cifar10", train=True, normalization=args.model))
    print(f"{args.model} from {args.compressed}, distilled, batch 128, {args.steps} steps a "
          f"run; {torch.get_num_threads()} threads, {platform.machine()}, commit {commit()}, "
          f"{time.strftime('%Y-%m-%d')}")
    def run(layout, steps):
        finetune(copy.deepcopy(small), train, steps=steps, batch_size=128, teacher=dense,
                 lr=1e-4, memory_format=layout, progress=False)

    # one untimed step of each first: the process's first run paid its one-off costs, and
    # that was always channels_last's (0.2-0.5 s a run here); then the two alternate which
    # goes first from round to round
    for layout in ("auto", None):
        run(layout, 1)
    seconds = {"auto": [], None: []}
    for i in range(args.rounds):
        for layout in (("auto", None) if i % 2 == 0 else (None, "auto")):
            start = time.perf_counter()
            run(layout, args.steps)
            seconds[layout].append((time.perf_counter() - start) / args.steps)
    for layout, s in seconds.items():
        print(f"memory_format={layout!r:7}: " + ", ".join(f"{v:.2f}" for v in s) + " s/step")
    print(f"speed-up of channels_last: {min(seconds[None]) / min(seconds['auto']):.2f}x "
          "(best run of each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
