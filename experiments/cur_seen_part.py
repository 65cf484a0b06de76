"""Why CUR fails on seed 001's VGG-11 classifier, tested: CUR of the first classifier layer's
weight W against CUR of the part of W its inputs see.

At 32x32 inputs the adaptive 7x7 pool repeats each of the 512 features 49 times, so the first
classifier layer only ever sees inputs x = repeat(f) and computes W x = W_c f, with W_c (4096 x
512) W summed over each feature's 49 copies. W_seen = repeat(W_c / 49) (each block of copies
averaged) gives the same outputs on every such input; W - W_seen, almost all of W's norm on a
trained model, is never seen (the untrained initialisation). CUR keeps actual columns of W, so
its C carries that noise; if that is why it fails, CUR of W_seen (actual columns of W_c, one per
feature) keeps the accuracy. Both at the seed's per-layer rule ranks (``params=CRx``, the same
as the sweep's ``rule`` points), by DEIM; the second layer by the same CUR of its own weight in
both, the output layer dense (as in the seed). No fine-tuning.

    .venv/bin/python experiments/cur_seen_part.py experiments/configs/seed001_vgg11.yaml \\
        --run mnist-whole-params50x [--ratios 5 10 30] [--device cpu]

Needs the run's trained weights (classifier_sweep.py trains them). Prints a table and writes it
to ``runs/<config>/sweep/<run>-cur-seen-part.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from rankcut import data as D
from rankcut.decompose import cur
from rankcut.models import create
from rankcut.select.rules import layer_ranks
from rankcut.train import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classifier_sweep import _batches, part_inputs
from reproduce import datasets, settings_of


def seen_part(W: torch.Tensor, copies: int) -> torch.Tensor:
    """W_c (m x n/copies): W summed over each input's ``copies`` consecutive repeats."""
    return W.reshape(W.shape[0], -1, copies).sum(-1)


def cur_weight(W: torch.Tensor, rank: int) -> torch.Tensor:
    """C U R of W by DEIM at ``rank`` (clamped to the matrix), float64."""
    res = cur(W.double(), min(rank, *W.shape), method="deim")
    return res.to_matrix()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run", required=True)
    parser.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 30])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config_path = Path(args.config)
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: no such config file")
    config = yaml.safe_load(config_path.read_text())
    if not isinstance(config, dict) or args.run not in (config.get("runs") or {}):
        raise SystemExit(f"--run: {args.run!r} is not a run of {config_path}")
    if any(r <= 0 for r in args.ratios):
        raise SystemExit(f"--ratios: expected compression ratios > 0, got {args.ratios}")
    s = settings_of(config, args.run)
    weights = Path(s["weights"])
    if not weights.is_file():
        raise SystemExit(f"{weights}: missing; train it with experiments/classifier_sweep.py "
                         f"{config_path} --only {args.run}")
    root = D.require_data_root()
    model = create(s["model"], weights=weights, num_classes=s["num_classes"]).eval()
    model.to(args.device)
    part = getattr(model, "classifier", None)
    linears = [m for m in part.modules() if isinstance(m, torch.nn.Linear)] if isinstance(
        part, torch.nn.Sequential) else []
    if not isinstance(getattr(model, "avgpool", None), torch.nn.AdaptiveAvgPool2d) or len(
            linears) < 2:
        raise SystemExit(f"{s['model']}: expected torchvision's VGG layout (an adaptive "
                         "avgpool, then a classifier with two Linear layers or more)")
    fc1, fc2 = linears[:2]
    _, _, test = datasets(s, root)
    x, y = part_inputs(model, "classifier", _batches(test), args.device)
    oh, ow = torch.nn.modules.utils._pair(model.avgpool.output_size)
    copies = oh * ow  # the 1x1 feature map spread over the pool's 7x7 output
    if not torch.equal(x, x[:, ::copies].repeat_interleave(copies, dim=1)):
        raise SystemExit(f"the classifier's inputs are not {copies} repeats of each feature "
                         f"(image_size {s['image_size']}: a feature map larger than 1x1)")
    dense = evaluate(part, (x, y))["top1"]
    W1, W2 = fc1.weight.detach().clone(), fc2.weight.detach().clone()
    seen = seen_part(W1.double(), copies)
    share = float((seen / copies).pow(2).sum() * copies / W1.double().pow(2).sum())
    lines = [f"{s['model']} on {s['data']}, {len(y)} test images, dense top-1 {dense:.2f}%; "
             f"the seen part W_seen holds {100 * share:.1f}% of FC1's squared norm",
             "", "| CR (rule) | ranks FC1 / FC2 | CUR of W | CUR of W_seen | seconds |",
             "|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    out = Path(args.runs_dir) / config_path.stem / "sweep" / f"{args.run}-cur-seen-part.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    for ratio in args.ratios:
        (k1,), (k2,) = (layer_ranks(m, "cur", f"params={ratio}x") for m in (fc1, fc2))
        start = time.perf_counter()
        with torch.no_grad():
            fc2.weight.copy_(cur_weight(W2, k2))
            fc1.weight.copy_(cur_weight(W1, k1))
            plain = evaluate(part, (x, y))["top1"]
            # actual columns of W_c (one per feature), spread back over the copies
            approx = cur_weight(seen, k1).repeat_interleave(copies, dim=1) / copies
            fc1.weight.copy_(approx)
            projected = evaluate(part, (x, y))["top1"]
            fc1.weight.copy_(W1)
            fc2.weight.copy_(W2)
        row = (f"| {ratio:g} | {k1} / {k2} | {plain:.2f}% | {projected:.2f}% | "
               f"{time.perf_counter() - start:.0f} |")
        lines.append(row)
        print(row, flush=True)
        out.write_text("\n".join(lines) + "\n")  # each row as it comes
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
