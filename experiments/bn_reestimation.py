"""What loss-aware allocation, sequential fitting and BatchNorm re-estimation give, without
fine-tuning (issue 11).

Pretrained CIFAR-10 ResNet-20 (../shared/data). ``rc.plan(method="auto", target=...)`` with the
first ``--calib`` training images (un-augmented) as calibration data, latency guard off;
``loss_aware`` off and on. Each plan is applied data-aware two ways: one-shot (every layer fitted
to the dense model's inputs, ``sequential=False``) and sequentially (each layer fitted, in forward
order, to the inputs the factorized layers before it give, the dense outputs as target; the
default). Each is evaluated as applied, and after ``rankcut.calibrate.reestimate_batchnorm`` on
the first 2048 training images with the training augmentation (random crop and flip, seeded);
the one-shot model also after re-estimation on the un-augmented calibration images. Top-1 on
CIFAR-10 test images 0..1016; the dense model's row shows what re-estimation alone does. Run
from the repository root:

    .venv/bin/python experiments/bn_reestimation.py [--targets 2 3 4]
"""

import argparse
import copy
import time

import torch

import rankcut as rc
from rankcut import data as D
from rankcut.calibrate import reestimate_batchnorm
from rankcut.data import read_cifar10_bin, require_data_root
from rankcut.models import create, normalizer, pretrained_path
from rankcut.profile import count_macs
from rankcut.train import evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--calib", type=int, default=1024, help="calibration training images")
    args = parser.parse_args()
    root = require_data_root()
    norm = normalizer("resnet20_cifar")
    images, labels = read_cifar10_bin(root, "test")
    train, _ = read_cifar10_bin(root, "train", limit=max(args.calib, 2048))
    calib = [norm(train[i:i + 128]) for i in range(0, args.calib, 128)]
    torch.manual_seed(0)
    augment = D.transforms("cifar10", train=True, normalization="resnet20_cifar")
    augmented = [augment(train[i:i + 128]) for i in range(0, 2048, 128)]
    model = create("resnet20_cifar", weights=pretrained_path("resnet20_cifar", root)).eval()
    x = torch.rand(1, 3, 32, 32)

    def top1(m):
        return evaluate(m, (images, labels), transform=norm)["top1"]

    def repaired(m, batches):
        m = copy.deepcopy(m)
        reestimate_batchnorm(m, batches)
        return top1(m)

    print(f"resnet20_cifar, {len(images)} test images, {args.calib} calibration images, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, latency guard off, no "
          "fine-tuning")
    print(f"{'target':>7} {'loss-aware':>10} {'MACs x':>7} {'one-shot':>9} {'+BN aug.':>9} "
          f"{'+BN plain':>9} {'sequential':>10} {'+BN aug.':>9} {'plan s':>7} {'seq. s':>7}")
    print(f"{'dense':>7} {'-':>10} {1:7.2f} {top1(model):9.2f} {repaired(model, augmented):9.2f} "
          f"{repaired(model, calib):9.2f} {'-':>10} {'-':>9} {'-':>7} {'-':>7}", flush=True)
    for ratio in args.targets:
        for loss_aware in (False, True):
            start = time.perf_counter()
            plan = rc.plan(model, x, method="auto", target=f"macs={ratio}x", calib_data=calib,
                           allow_slower=True, loss_aware=loss_aware)
            planned = time.perf_counter()
            one = rc.apply(model, plan, calib_data=calib, sequential=False)
            started = time.perf_counter()
            seq = rc.apply(model, plan, calib_data=calib)
            seconds = time.perf_counter() - started
            print(f"{ratio:>6}x {'on' if loss_aware else 'off':>10} "
                  f"{count_macs(model, x) / count_macs(one, x):7.2f} {top1(one):9.2f} "
                  f"{repaired(one, augmented):9.2f} {repaired(one, calib):9.2f} "
                  f"{top1(seq):10.2f} {repaired(seq, augmented):9.2f} {planned - start:7.1f} "
                  f"{seconds:7.1f}", flush=True)

if __name__ == "__main__":
    main()
