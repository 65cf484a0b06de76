"""How much accuracy each way of choosing ranks keeps, without fine-tuning.

Pretrained CIFAR-10 ResNet-20 / ResNet-56 (../shared/data), top-1 on CIFAR-10 test images 0..1016,
no fine-tuning, at whole-model MACs targets. Rows:
- ``svd uniform`` / ``tucker uniform``: every eligible layer keeps the same fraction of its MACs,
  the fraction solved so the whole model meets the target;
- ``tucker vbmf``: Tucker-2 at EVBMF ranks (Kim et al. 2016); its ratio is its own;
- ``svd planned`` / ``tucker planned``: one method, ranks allocated by ``rc.plan``;
- ``auto``: ``rc.plan(method="auto")``, no data;
- ``auto+data``: the same with ``--calib`` training images as calibration data (output-norm
  errors, data-aware SVD layers).
The planned rows run with the planner's latency guard (no layer timed slower than dense on this
machine at batch 1) unless ``--allow-slower``. ``speed-up`` is the dense model's median latency
over the compressed one's at batch 1 (interleaved runs, this machine).
Run from the repository root:

    .venv/bin/python benchmarks/planning.py [--model resnet20_cifar] [--targets 1.5 2 3]
        [--allow-slower]
"""

import argparse
import time

import torch

import rankcut as rc
from rankcut.data import find_data_root, read_cifar10_bin
from rankcut.models import create, normalizer
from rankcut.profile import compare_latency, count_macs, layer_macs, top1_accuracy

WEIGHTS = {"resnet20_cifar": "resnet20-12fca82f.th", "resnet56_cifar": "resnet56-4bfd9763.th"}
ROWS = ["svd uniform", "tucker uniform", "svd planned", "tucker planned", "auto", "auto+data"]


def uniform_fraction(model, x, ratio):
    """The per-layer MACs fraction that brings the whole model to 1/ratio of its MACs."""
    eligible = [n for n, r in rc.target_layers(model).items() if r is None]
    per_layer = layer_macs(model, x)
    planned = sum(per_layer[n] for n in eligible)
    total = count_macs(model, x)
    return (total / ratio - (total - planned)) / planned


def make_plan(model, x, row, ratio, calib, allow_slower):
    method, _, how = row.partition(" ")
    if row == "tucker vbmf":
        return rc.plan(model, x, method="tucker", rank="vbmf", allow_slower=True), None
    if how == "uniform":  # the baseline: no guard, whatever the speed
        fraction = uniform_fraction(model, x, ratio)
        return rc.plan(model, x, method=method, rank=f"macs={fraction:.6f}",
                       allow_slower=True), None
    data = calib if row == "auto+data" else None
    method = "auto" if row.startswith("auto") else method
    return rc.plan(model, x, method=method, target=f"macs={ratio}x", calib_data=data,
                   allow_slower=allow_slower), data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar", choices=sorted(WEIGHTS))
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--rows", nargs="+", default=[*ROWS, "tucker vbmf"], metavar="ROW")
    parser.add_argument("--calib", type=int, default=512, help="calibration training images")
    parser.add_argument("--allow-slower", action="store_true",
                        help="plan without the latency guard")
    args = parser.parse_args()
    root = find_data_root()
    if root is None:
        raise SystemExit("needs the shared data: set $RANKCUT_DATA or place it at ../shared/data")
    norm = normalizer(args.model)
    images, labels = read_cifar10_bin(root, "test")
    train, _ = read_cifar10_bin(root, "train", limit=args.calib)
    calib = [norm(train[i:i + 128]) for i in range(0, len(train), 128)]
    model = create(args.model, weights=root / "weights/resnet_cifar10_akamaster" /
                   WEIGHTS[args.model]).eval()
    x = torch.rand(1, 3, 32, 32)
    dense_macs = count_macs(model, x)
    print(f"{args.model}: {top1_accuracy(model, images, labels, transform=norm):.2f}% top-1 on "
          f"{len(images)} test images, {dense_macs:,} MACs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, no fine-tuning, latency guard "
          f"{'off' if args.allow_slower else 'on'}")
    print(f"{'target':>7} {'row':>15} {'MACs ratio':>10} {'top-1 %':>8} {'speed-up':>8} "
          f"{'plan s':>7}")
    for i, ratio in enumerate(args.targets):
        for row in args.rows:
            if row == "tucker vbmf" and i > 0:
                continue  # independent of the target: one row
            start = time.perf_counter()
            plan, data = make_plan(model, x, row, ratio, calib, args.allow_slower)
            small = rc.apply(model, plan, calib_data=data)
            seconds = time.perf_counter() - start
            achieved = dense_macs / count_macs(small, x)
            label = "-" if row == "tucker vbmf" else f"{ratio}x"
            dense_t, small_t = compare_latency(model, small, x, repeats=50)
            print(f"{label:>7} {row:>15} {achieved:10.3f} "
                  f"{top1_accuracy(small, images, labels, transform=norm):8.2f} "
                  f"{dense_t.median_ms / small_t.median_ms:8.2f} {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
