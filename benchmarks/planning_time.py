"""How long ``rc.plan`` takes on ImageNet-sized torchvision models (issue 11's planning-time rows)
and on rankcut's CIFAR models (issue 12's VGG-11-BN row).

torchvision models, or rankcut.models ones (``vgg11_bn_cifar``, with ``--size 32``), built
without weights (nothing is downloaded; planning time depends on the layer shapes, not on the
values), input 1x3x224x224 (``--size``), ``rc.plan(method="auto", target=...)``
with no calibration data, the default latency guard on unless ``--allow-slower``. Prints the
seconds per model and what the plan achieved. Each model is planned from an empty cache folder
(a temporary ``$RANKCUT_CACHE``): first with nothing cached (every layer timed, every candidate
scored), then, with the guard, again from the latency table the first plan left there, and last
from that table and the candidates the second plan left there (``CandidateCache.cached()``, as
the command line plans: a user's later plan of the same model on the machine). Run from the
repository root, one heavy job at a time:

    .venv/bin/python benchmarks/planning_time.py [--models resnet18 resnet50]
        [--target macs=2x] [--allow-slower]
"""

import argparse
import time

import torch
import torchvision

import rankcut as rc
from _common import empty_latency_cache, header
from rankcut.models import REGISTRY, create


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--target", default="macs=2x")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--allow-slower", action="store_true")
    args = parser.parse_args()
    print(f"{header()}; auto, {args.target}, no data, latency guard "
          f"{'off' if args.allow_slower else 'on'}, input 1x3x{args.size}x{args.size}")
    for name in args.models:
        torch.manual_seed(0)
        model = (create(name) if name in REGISTRY
                 else getattr(torchvision.models, name)(weights=None)).eval()
        x = torch.rand(1, 3, args.size, args.size)
        empty_latency_cache()
        rows = [("nothing cached", "write"), ("candidates cached", "read")] if args.allow_slower \
            else [("nothing cached", None), ("latency table cached", "write"),
                  ("table and candidates cached", "read")]
        for label, candidates in rows:
            cache = rc.select.CandidateCache.cached() if candidates else None
            start = time.perf_counter()
            try:
                plan = rc.plan(model, x, method="auto", target=args.target,
                               allow_slower=args.allow_slower, cache=cache)
            except ValueError as err:  # the guard refused the target: the work was done
                print(f"{name:>16}: {time.perf_counter() - start:7.1f} s, {label}: no plan "
                      f"({str(err)[:200]}...)", flush=True)
                continue
            seconds = time.perf_counter() - start
            predicted = plan.meta["predicted"]
            if candidates == "read" and cache.disk_hits != 1:
                raise SystemExit(f"{name}: the candidates were not read from the cache folder")
            timed = f", {label}" + ("" if args.allow_slower else
                                    f": {plan.meta['latency']['timings_taken']} timings taken")
            print(f"{name:>16}: {seconds:7.1f} s, {len(plan.active)} layers factorized, "
                  f"{predicted['macs_ratio']:.2f}x fewer MACs, {predicted['params_ratio']:.2f}x "
                  f"fewer params (predicted){timed}", flush=True)

if __name__ == "__main__":
    main()
