"""The embedded demo: train a small CNN on scikit-learn's digits, compress it, report.

Everything runs on the CPU from data that ships with scikit-learn (no download):

1. the 1,797 8x8 handwritten digits of ``sklearn.datasets.load_digits``, split 80/20 into train
   and test sets (seeded);
2. a small CNN trained with :func:`rankcut.train.finetune`: the digits upsampled to 16x16 inside
   the model, three Conv2d/BatchNorm/ReLU blocks (1->64 and 64->64 channels at 16x16, max-pool,
   64->128 at 8x8), average-pooled to 2x2, a Linear classifier. The upsampling makes the two
   large convolutions (9.4M and 4.7M MACs) big enough that factorizations beat the dense layers
   at batch 1 on a CPU, so the latency guard leaves room to meet the target;
3. :func:`rankcut.compress` with ``method="auto"`` to a MACs target (default 3x fewer),
   calibration images for data-aware planning, and a short fine-tuning with the dense model as
   teacher. The planner's latency guard (on by default) times every factorization it picks
   against the dense layer at batch 1 on this CPU and vetoes the slower ones;
4. before/after: params, MACs, latency at batch 1 (:func:`rankcut.profile.compare_latency`),
   top-1 on the test set (:func:`rankcut.train.evaluate`), and the method chosen per layer;
5. into ``out_dir``: ``plan.json`` + ``model.safetensors`` (:func:`rankcut.save`; reload with
   ``rankcut.load(rankcut.demo.build_model(), out_dir)``), ``demo.json`` (the numbers printed,
   and the folder's mark as a demo output) and, through :mod:`rankcut.report`, ``report.json``,
   ``report.md`` and plots.

Deterministic given the seed, except for timings (and what the latency guard decides from them).

    python -m rankcut.demo [--out rankcut-demo] [--target macs=3x] [--seed 0] [--quiet]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from . import compress, methods, save
from .atomic import atomic_folder, output_folder_problem
from .layers import FactorizedLayer
from .profile import compare_latency, count_macs, count_params, layer_macs
from .report._common import factor_text
from .select import SlowerThanDense, parse_target
from .train import evaluate, finetune

# The model: digits upsampled to SIZE x SIZE; conv blocks of these widths, max-pooling after the
# blocks marked True. Sized so that factorized layers can beat dense ones at batch 1 on a CPU.
SIZE = 16
WIDTHS = (64, 64, 128)
POOLS = (False, True, False)
HEAD_POOL = 2  # the last feature map is average-pooled to HEAD_POOL x HEAD_POOL for the Linear
TEST_FRACTION = 0.2
CALIB_IMAGES = 128
TRAIN_OPTIONS = {"batch_size": 32, "lr": 0.05}
FINETUNE_OPTIONS = {"batch_size": 32, "lr": 0.01}
# ALS/HOOI sweeps for the planner's CP and Tucker candidates (and such layers, if chosen): fewer
# than the defaults keep planning with calibration data to a few seconds
PLAN_OPTIONS = {"options": {"cp": {"max_iter": 25}, "tucker": {"max_iter": 10}}}
INSTALL_HINT = "pip install rankcut[demo]"
# the demo's record (the numbers it prints), written beside the saved model; it marks a folder
# as an earlier demo output, which the demo may replace (not plan.json: every rankcut save has one)
RECORD = "demo.json"


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits as float tensors in [0, 1] of shape (N, 1, 8, 8), split into
    ``x_train``/``y_train`` and ``x_test``/``y_test`` by a permutation seeded with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the rankcut demo trains on scikit-learn's bundled digits; install it "
                          f"with: {INSTALL_HINT}") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(TEST_FRACTION * len(x))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def build_model(seed: int | None = None) -> nn.Sequential:
    """The demo's CNN (fresh weights, from ``seed`` when given): it takes (N, 1, 8, 8) digits in
    [0, 1] and returns 10 logits. Layers are named (``conv1``, ``bn1``, ..., ``fc``)."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["upsample"] = nn.Upsample(size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    channels = 1
    for i, (width, pool) in enumerate(zip(WIDTHS, POOLS, strict=True), 1):
        layers[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(width)
        layers[f"relu{i}"] = nn.ReLU()
        if pool:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        channels = width
    layers["avgpool"] = nn.AdaptiveAvgPool2d(HEAD_POOL)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels * HEAD_POOL**2, 10)
    return nn.Sequential(layers)


def _say(*parts, end="\n") -> None:
    print(*parts, end=end, flush=True)


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _times(before: float, after: float, lower: str, higher: str) -> str:
    """"3.06x fewer": the factor as the reports write it (a near tie keeps three decimals)."""
    if after == before:
        return "unchanged"
    if after < before:
        return f"{factor_text(before / after)} {lower}"
    return f"{factor_text(after / before)} {higher}"


def _layer_rows(original: nn.Module, small: nn.Module, plan, x1) -> list[dict]:
    """One row per eligible or skipped layer of the plan: method, ranks, MACs before/after."""
    macs_o, macs_c = layer_macs(original, x1), layer_macs(small, x1)
    rows = []
    for name, lp in plan.layers.items():
        after = sum(v for k, v in macs_c.items() if k == name or k.startswith(name + "."))
        module = small.get_submodule(name)
        if isinstance(module, FactorizedLayer):
            how = lp.method if lp.form is None else f"{lp.method} ({lp.form})"
            if lp.options.get("data_aware"):
                how += " (data-aware)"
            ranks = "x".join(str(r) for r in lp.ranks)
        else:
            how, ranks = "dense", ""
        predicted = lp.predicted or {}
        rows.append({"layer": name, "method": how, "ranks": ranks,
                     "macs": [macs_o.get(name, 0), after],
                     "latency_ratio": predicted.get("latency_ratio"), "reason": lp.reason or ""})
    return rows


def _report(original, small, x1, plan, test, accuracy, meta, out: Path):
    """report.json, report.md and plots through rankcut.report; (report, files) or (None, [])
    when rankcut.report is not available."""
    if importlib.util.find_spec(f"{__package__}.report") is None:
        return None, []
    from . import report as reporting

    rep = reporting.compare(original, small, x1, plan=plan, data=test, accuracy=accuracy,
                            meta=meta)
    files = [rep.write_json(out / "report.json"), rep.write_markdown(out / "report.md")]
    files += list(reporting.write_plots(rep, out) or [])
    return rep, [Path(f) for f in files]


def run(out_dir="rankcut-demo", *, target: str = "macs=3x", method: str = "auto",
        epochs: int = 3, finetune_epochs: int = 1, seed: int = 0, progress: bool = True,
        allow_slower: bool = False, device=None) -> dict:
    """Train the demo CNN on the digits, compress it to ``target`` with ``method``, measure,
    print a before/after table and write plan, weights and report into ``out_dir``.

    ``epochs``: training of the dense CNN; ``finetune_epochs``: fine-tuning (distillation from the
    dense CNN) after compression. ``allow_slower``: let the planner keep factorizations measured
    slower than dense on this CPU (otherwise, when the latency guard leaves no way to meet the
    target, the demo says so and plans again with it). ``progress``: progress bars.
    ``device``: where the CNN trains and is fine-tuned (default: CUDA when available, as
    :func:`rankcut.train.finetune`); it is measured on the CPU.

    Returns a dict: ``out_dir``, ``files`` (paths written), ``top1`` / ``params`` / ``macs`` /
    ``latency_ms`` (each ``[dense, compressed]``), ``layers`` (method per layer),
    ``allow_slower`` (whether it was needed), ``seconds`` per stage, and the objects ``plan``,
    ``original`` and ``compressed`` (the models) and ``data`` (the tensors of :func:`load_data`).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected an int >= 1, got {epochs!r}")
    if (isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int)
            or finetune_epochs < 0):
        raise ValueError(f"finetune_epochs: expected an int >= 0, got {finetune_epochs!r}")
    if target is not None:  # (a bad target or method found now, not after the training)
        parse_target(target)
    if method != "auto":
        methods.resolve(method)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out_dir)
    data = load_data(seed)
    train = (data["x_train"], data["y_train"])
    test = (data["x_test"], data["y_test"])
    x1 = data["x_test"][:1]
    calib = [data["x_train"][:CALIB_IMAGES]]
    threads = torch.get_num_threads()

    model = build_model(seed)
    n_params = count_params(model)
    _say(f"rankcut demo: scikit-learn digits ({len(train[0]):,} train / {len(test[0]):,} test "
         f"images, 8x8, upsampled to {SIZE}x{SIZE} in the model), seed {seed}, "
         f"{_plural(threads, 'thread')}")
    _say(f"[1/4] training a CNN: {len(WIDTHS)} Conv2d/BatchNorm/ReLU blocks + Linear, "
         f"{n_params:,} params, {_plural(epochs, 'epoch')}")
    t = time.perf_counter()
    finetune(model, train, epochs=epochs, seed=seed, progress=progress, device=device,
             **TRAIN_OPTIONS)
    model.cpu().eval()
    before = evaluate(model, test)
    seconds["train"] = time.perf_counter() - t
    _say(f"      {seconds['train']:.1f} s; test top-1 {before['top1']:.2f}%")

    tuning = (f"{_plural(finetune_epochs, 'epoch')} of fine-tuning distilled from the dense CNN"
              if finetune_epochs else "no fine-tuning")
    _say(f"[2/4] compressing: method {method}, target {target}, {CALIB_IMAGES} calibration "
         f"images, {tuning}")
    t = time.perf_counter()
    kwargs = dict(method=method, target=target, calib_data=calib, train_data=train,
                  epochs=finetune_epochs or None, distill=True,
                  finetune_options={**FINETUNE_OPTIONS, "seed": seed, "device": device},
                  progress=progress)
    needed_slower = allow_slower
    try:
        result = compress(model, x1, plan_options={**PLAN_OPTIONS, "allow_slower": allow_slower},
                          **kwargs)
    except SlowerThanDense as err:
        if allow_slower:
            raise
        _say(f"      note: {err}.\n      The latency guard leaves no way to reach {target} on this "
             "machine; planning again with allow_slower=True (some factorized layers may then "
             "be slower than dense at batch 1).")
        needed_slower = True
        result = compress(model, x1, plan_options={**PLAN_OPTIONS, "allow_slower": True},
                          **kwargs)
    small, plan = result.model.cpu().eval(), result.plan
    model.cpu()  # (fine-tuning on a GPU moved the teacher there too)
    after = evaluate(small, test)
    seconds["compress"] = time.perf_counter() - t
    _say(f"      {seconds['compress']:.1f} s; test top-1 {after['top1']:.2f}%")

    _say(f"[3/4] measuring (latency at batch 1, the two models timed interleaved) and writing "
         f"{out}/")
    t = time.perf_counter()
    accuracy = {"original": before, "compressed": after}
    meta = {"demo": "rankcut.demo", "data": "sklearn digits", "seed": seed, "target": target,
            "method": method, "epochs": epochs, "finetune_epochs": finetune_epochs,
            "allow_slower": needed_slower}
    params = [n_params, count_params(small)]
    macs = [count_macs(model, x1), count_macs(small, x1)]
    top1 = [before["top1"], after["top1"]]
    layers = _layer_rows(model, small, plan, x1)
    with atomic_folder(out) as tmp:  # the folder holds this run's files only, all or none
        save(small, tmp, plan=plan)
        rep, written = _report(model, small, x1, plan, test, accuracy, meta, tmp)
        if rep is not None and rep.latency:  # the report timed both models at batch 1
            entry = rep.latency[0]
            lat = [entry["original"]["median_ms"], entry["compressed"]["median_ms"]]
        else:
            lo, lc = compare_latency(model, small, x1, warmup=10, repeats=100)
            lat = [lo.median_ms, lc.median_ms]
        record = {**meta, "test_images": len(test[0]), "top1": top1, "params": params,
                  "macs": macs, "latency_ms": lat, "layers": layers,
                  "seconds": {**seconds, "measure": time.perf_counter() - t}}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    files = [out / f.name for f in (tmp / "plan.json", tmp / "model.safetensors", tmp / RECORD,
                                    *written)]
    seconds["measure"] = time.perf_counter() - t
    _say(f"      {seconds['measure']:.1f} s")
    _say("[4/4] results\n")
    _print_summary(params, macs, lat, top1, len(test[0]), layers)
    guard = plan.meta.get("latency")
    if guard is None:
        _say("(latency guard off: allow_slower=True; the plan was not timed)")
    else:
        vetoed = ", ".join(f"{name} {_plural(len(v), 'candidate')}"
                           for name, v in guard["vetoed"].items())
        ratio = guard["predicted_ratio"][str(guard["batch"])]
        held = guard.get("ratio", ratio) <= 1  # (timed whole, the measurement decides)
        times = f"predicted {ratio:.2f}" + (f", measured {guard['ratio']:.2f}"
                                             if "ratio" in guard else "")
        _say(f"time vs dense: the planner's latency table timed each layer's candidates at "
             f"batch {guard['batch']} on this CPU\n({_plural(guard['table']['threads'], 'thread')}"
             f", {guard['table']['memory_format']}) and "
             + ("kept the plan no slower than dense" if held else
                "could not keep the plan no slower than dense without losing accuracy")
             + f" ({times} of its time)" + (f"; vetoed: {vetoed}" if vetoed else ""))
    seconds["total"] = time.perf_counter() - start
    _say(f"\nwrote {out}/: {', '.join(f.name for f in files)}")
    if rep is None:
        _say("(rankcut.report is not available: no report.json, report.md or plots)")
    _say(f"reload: rankcut.load(rankcut.demo.build_model(), {str(out)!r})")
    _say(f"total {seconds['total']:.1f} s")
    return {"out_dir": out, "files": files, "top1": top1, "params": params, "macs": macs,
            "latency_ms": lat, "layers": layers, "allow_slower": needed_slower,
            "seconds": seconds, "plan": plan, "original": model, "compressed": small,
            "data": data}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print_summary(params, macs, lat, top1, n_test, layers) -> None:
    rows = [
        ("params", _count(params[0]), _count(params[1]), _times(*params, "fewer", "more")),
        ("MACs per image", _count(macs[0]), _count(macs[1]), _times(*macs, "fewer", "more")),
        ("latency, batch 1", f"{lat[0]:.3f} ms", f"{lat[1]:.3f} ms",
         _times(*lat, "faster", "slower")),
        (f"top-1, {n_test} test images", f"{top1[0]:.2f}%", f"{top1[1]:.2f}%",
         f"{top1[1] - top1[0]:+.2f} points"),
    ]
    w = max(len(r[0]) for r in rows)
    _say(f"{'':{w}}  {'dense':>10}  {'compressed':>10}  change")
    for name, a, b, change in rows:
        _say(f"{name:{w}}  {a:>10}  {b:>10}  {change}")
    _say("")
    m = max(len(r["method"]) for r in layers)
    _say(f"{'layer':6} {'method':{m}} {'ranks':>5} {'MACs before':>11} {'after':>10} "
         f"{'time vs dense':>13}  why")
    for r in layers:
        ratio = "" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}x"
        _say(f"{r['layer']:6} {r['method']:{m}} {r['ranks']:>5} {_count(r['macs'][0]):>11} "
             f"{_count(r['macs'][1]):>10} {ratio:>13}  {r['reason']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rankcut.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="rankcut-demo",
                        help="output folder (default rankcut-demo)")
    parser.add_argument("--target", default="macs=3x",
                        help="compression target, e.g. macs=3x, params=4x (default macs=3x)")
    parser.add_argument("--method", default="auto",
                        help=f"auto or a method or form of rankcut.methods: "
                             f"{', '.join(methods.aliases())} (default auto)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="training epochs of the dense CNN (default 3)")
    parser.add_argument("--finetune-epochs", type=int, default=1,
                        help="fine-tuning epochs after compression (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-slower", action="store_true",
                        help="keep factorizations measured slower than dense on this CPU")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --out folder that is not an "
                             "earlier demo output, and everything in it")
    args = parser.parse_args(argv)
    problem = output_folder_problem(args.out, RECORD, args.overwrite)
    if problem is not None:  # the folder is replaced whole at the end
        parser.error(f"--out: {problem}")
    here, out = Path.cwd().resolve(), Path(args.out).resolve()
    if out == here or out in here.parents:  # (replaced whole: the folder the shell stands in)
        parser.error(f"--out: {args.out} is the current folder or holds it; give a folder "
                     "of its own")
    try:
        run(args.out, target=args.target, method=args.method, epochs=args.epochs,
            finetune_epochs=args.finetune_epochs, seed=args.seed, progress=not args.quiet,
            allow_slower=args.allow_slower)
    except ValueError as err:  # (a bad --target, --method or --epochs: one line, exit 2)
        parser.error((str(err).strip().splitlines() or [type(err).__name__])[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
