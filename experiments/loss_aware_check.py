"""Loss-aware allocation on and off at deep compression, without fine-tuning (issue 11).

A pretrained CIFAR-10 model (../shared/data), ``rc.compress(method=..., target=...)`` with the
first ``--calib`` training images (un-augmented, as experiments/reproduce.py draws them: seed 0)
as calibration data, latency guard off, ``loss_aware`` on (the default) and off; each plan
applied sequentially (the default). Printed per plan: top-1 on CIFAR-10 test images 0..1016
and the mean KL divergence between the dense and the compressed model's outputs on the first
256 calibration images, once as applied (sequentially) and once with every layer fitted to the
dense model's inputs (``sequential=False``: what the planner's probes see); the ranks. Run from
the repository root:

    .venv/bin/python experiments/loss_aware_check.py [--model vgg11_bn_cifar --method tucker
        --targets params=32x params=45x params=64x]
"""

import argparse
import time

import torch

import rankcut as rc
from rankcut import data as D
from rankcut.models import create, pretrained_path
from rankcut.profile import count_params
from rankcut.select import CandidateCache, damage
from rankcut.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg11_bn_cifar")
    parser.add_argument("--method", default="tucker")
    parser.add_argument("--targets", nargs="+", default=["params=32x", "params=45x",
                                                         "params=64x"])
    parser.add_argument("--calib", type=int, default=1024, help="calibration training images")
    args = parser.parse_args()
    root = D.require_data_root()
    model = create(args.model, weights=pretrained_path(args.model, root)).eval()
    tf = D.transforms("cifar10", train=False, normalization=args.model)
    test = D.dataset("cifar10", "test", root=root, transform=tf)
    calib = D.calibration(D.dataset("cifar10", "train", root=root, transform=tf),
                          n=args.calib, seed=0)
    x = test[0][0].unsqueeze(0)
    cache = CandidateCache()  # the second plan of a target reuses the first's candidates
    print(f"{args.model} (dense {evaluate(model, test)['top1']:.2f}% on {len(test)} test "
          f"images), {args.method}, {args.calib} calibration images, latency guard off, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"{'target':>11} {'loss-aware':>10} {'params x':>8} {'top-1':>6} {'KL seq.':>8} "
          f"{'KL one-shot':>11} {'s':>5}  ranks", flush=True)
    for target in args.targets:
        for loss_aware in (True, False):
            start = time.perf_counter()
            result = rc.compress(model, x, method=args.method, target=target, calib_data=calib,
                                 plan_options={"allow_slower": True, "cache": cache,
                                               "loss_aware": loss_aware})
            seconds = time.perf_counter() - start
            one_shot = rc.apply(model, result.plan, calib_data=calib, sequential=False)
            kl = damage.output_damage(model, {"seq": result.model, "one": one_shot}, calib)
            ranks = " ".join(f"{n}:{'x'.join(map(str, lp.ranks))}"
                             for n, lp in result.plan.active.items())
            print(f"{target:>11} {'on' if loss_aware else 'off':>10} "
                  f"{count_params(model) / count_params(result.model):8.1f} "
                  f"{evaluate(result.model, test)['top1']:6.2f} "
                  f"{kl['seq']:8.3f} {kl['one']:11.3f} {seconds:5.0f}  {ranks}",
                  flush=True)


if __name__ == "__main__":
    main()
