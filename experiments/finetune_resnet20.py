"""Compress the pretrained CIFAR-10 ResNet-20 to 2x fewer MACs and win the accuracy back with one
epoch of distillation, on the CPU.

Pretrained weights and CIFAR-10 from ../shared/data ($RANKCUT_DATA); planning with
``method="auto"`` and 512 training images as calibration data; then ``--epochs`` epochs of SGD
(cosine, lr ``--lr``) on the 50,000 training images (random crop + flip), with the original model
as teacher (KL at T=4 mixed half and half with the label loss). Top-1 on CIFAR-10 test images
0..1016 before and after. Run from the repository root:

    .venv/bin/python experiments/finetune_resnet20.py [--target macs=2x] [--epochs 1]
        [--allow-slower] [--log out.jsonl] [--save-plan plan.json | --plan plan.json]
"""

import argparse
import time
from pathlib import Path

import torch

import rankcut as rc
from rankcut import data as D
from rankcut.models import create, pretrained_path
from rankcut.profile import compare_latency, count_macs, count_params
from rankcut.train import evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--allow-slower", action="store_true",
                        help="plan without the latency guard")
    parser.add_argument("--log", help="JSON-lines training log")
    parser.add_argument("--save-plan", help="write the plan here (JSON)")
    parser.add_argument("--plan", help="apply this plan (JSON) instead of planning")
    args = parser.parse_args()
    root = D.require_data_root()
    norm = "resnet20_cifar"
    train = D.dataset("cifar10", "train", root=root,
                      transform=D.transforms("cifar10", train=True, normalization=norm))
    plain = D.with_transform(train, D.transforms("cifar10", train=False, normalization=norm))
    test = D.dataset("cifar10", "test", root=root,
                     transform=D.transforms("cifar10", train=False, normalization=norm))
    calib = D.calibration(plain, n=args.calib, seed=0)
    model = create("resnet20_cifar", weights=pretrained_path("resnet20_cifar", root)).eval()
    x = torch.rand(1, 3, 32, 32)
    dense = evaluate(model, test)
    print(f"resnet20_cifar dense: {dense['top1']:.2f}% top-1 on {dense['n']} test images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    if args.plan:
        plan = rc.load_plan(args.plan)
    else:
        try:
            plan = rc.plan(model, x, method=args.method, target=args.target, calib_data=calib,
                           allow_slower=args.allow_slower)
        except ValueError as err:  # e.g. the latency guard's refusal: say why, no traceback
            raise SystemExit(f"plan: {err}") from None
    if args.save_plan:
        Path(args.save_plan).write_text(plan.to_json())
    small = rc.apply(model, plan, calib_data=calib)
    planned = time.perf_counter() - start
    before = evaluate(small, test)
    print(f"planned + applied in {planned:.0f} s: {before['top1']:.2f}% top-1 before fine-tuning",
          flush=True)

    start = time.perf_counter()
    result = rc.train.finetune(small, train, epochs=args.epochs, lr=args.lr,
                               batch_size=args.batch_size, teacher=model, log=args.log,
                               progress=False)
    tuned = time.perf_counter() - start
    after = evaluate(small, test)
    d, s = compare_latency(model, small, x, repeats=100)
    print(f"fine-tuned {args.epochs} epoch(s), {result.steps} steps, in {tuned / 60:.1f} min")
    print("| model | params | MACs | top-1 % | latency ms (batch 1) |\n|---|---:|---:|---:|---:|")
    print(f"| dense | {count_params(model):,} | {count_macs(model, x):,} | {dense['top1']:.2f} "
          f"| {d.median_ms:.2f} |")
    print(f"| {args.method} {args.target}{' (no latency guard)' if args.allow_slower else ''}, "
          f"before fine-tuning | {count_params(small):,} | {count_macs(small, x):,} | "
          f"{before['top1']:.2f} | {s.median_ms:.2f} |")
    print(f"| the same, after {args.epochs} epoch(s) distillation | | | {after['top1']:.2f} | |")
    methods = {}
    for lp in plan.active.values():
        key = lp.method + (f"/{lp.form}" if lp.form else "")
        methods[key] = methods.get(key, 0) + 1
    print(f"layers: {methods}; kept dense: {len(plan) - len(plan.active)}")


if __name__ == "__main__":
    main()
