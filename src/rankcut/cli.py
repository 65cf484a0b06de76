"""The ``rankcut`` command: analyze, compress, evaluate, benchmark, export, sweep, demo.

    rankcut compress --model resnet20_cifar --weights resnet20-12fca82f.th --data cifar10 \\
        --data-dir ../shared/data --method auto --target macs=2x --finetune-epochs 1 --distill \\
        --out out/

Every subcommand takes ``--config FILE.yaml`` (keys are the long flag names, ``-`` or ``_``);
flags given on the command line override the file. User errors (a missing file, an unknown model,
a bad rank or target, a plan that does not fit) print one line and exit with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------- arguments

def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="registry name (resnet20_cifar, vgg11_bn_cifar, ...), a torchvision "
                        "name (resnet18, ...) or package.module:function")
    g.add_argument("--weights", help="state dict to load (safetensors or torch file)")
    g.add_argument("--num-classes", type=int, help="number of outputs of the model")


def _data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="cifar10, cifar100, mnist, fashion_mnist or imagefolder")
    g.add_argument("--data-dir", help="data root (default $RANKCUT_DATA, else ../shared/data)")
    g.add_argument("--normalization",
                   help="input statistics: a model name, a dataset name, or 'none' (default: "
                        "what the model's weights expect, else the dataset's)")
    g.add_argument("--image-size", type=int, help="resize inputs to this side length")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples only")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    g.add_argument("--input-shape",
                   help="C,H,W of one input when no --data is given (e.g. 3,32,32)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default="auto",
                   help="auto, svd, spatial_svd, cp, cp3, tucker (default auto)")
    g.add_argument("--rank", help="rank rule: 64, vbmf, energy=0.95, params=0.25, ...")
    g.add_argument("--target", help="macs=2x, params=3x, latency=1.5x, or a fraction (macs=0.4)")
    g.add_argument("--calib", type=int, default=512,
                   help="calibration training examples for data-aware planning (0: none; "
                        "default 512 when --data is given)")
    g.add_argument("--rank-multiple", type=int, default=1, help="round ranks to a multiple")
    g.add_argument("--allow-slower", action="store_true",
                   help="allow layers measured slower than dense on this machine")
    g.add_argument("--exclude", nargs="+", help="layer names or glob patterns to leave dense")
    g.add_argument("--min-params", type=int, default=1024,
                   help="leave layers with fewer parameters dense (default 1024)")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--config", help="YAML file of flag values (command-line flags override it)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--threads", type=int, help="torch.set_num_threads")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankcut", description="Compress trained PyTorch models with low-rank "
        "factorizations, and measure what was gained.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("analyze", help="per-layer costs, spectra, sensitivities, suggested ranks")
    _model_args(p)
    _data_args(p)
    p.add_argument("--rules", nargs="+", default=["vbmf", "energy=0.95"],
                   help="rank rules to suggest ranks with")
    p.add_argument("--calib", type=int, default=256,
                   help="calibration examples for sensitivities (needs --data; 0: none)")
    p.add_argument("--out", required=True, help="output folder for the report and plots")
    _common(p)

    p = sub.add_parser("compress", help="plan, apply, optionally fine-tune; write the model, "
                                        "plan, report and plots")
    _model_args(p)
    _data_args(p)
    _plan_args(p)
    p.add_argument("--plan", help="apply this plan.json (e.g. hand-edited) instead of planning")
    p.add_argument("--schedule", default="one_shot", choices=["one_shot", "layerwise",
                                                              "multistage"])
    p.add_argument("--rounds", type=int, default=3, help="multistage rounds")
    p.add_argument("--steps-per-layer", type=int, help="layerwise fine-tuning steps per layer")
    p.add_argument("--min-accuracy", type=float,
                   help="multistage: stop when test top-1 (%%) falls below this")
    _finetune_args(p)
    p.add_argument("--no-latency", action="store_true", help="do not time the models")
    p.add_argument("--out", required=True, help="output folder")
    _common(p)

    p = sub.add_parser("evaluate", help="top-1/top-5/loss of a model or a compressed folder")
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument("--compressed", help="a folder written by 'rankcut compress'")
    _common(p)

    p = sub.add_parser("benchmark", help="latency of the original and the compressed model")
    _model_args(p)
    _data_args(p)
    p.add_argument("--compressed", required=True, help="a folder written by 'rankcut compress'")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--repeats", type=int, default=50)
    _common(p)

    p = sub.add_parser("export", help="write a compressed model as ONNX or TorchScript")
    _model_args(p)
    _data_args(p)
    p.add_argument("--compressed", help="a folder written by 'rankcut compress' (default: the "
                                        "model as given)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--output", required=True, help="file to write")
    _common(p)

    p = sub.add_parser("sweep", help="accuracy against compression across targets and methods")
    _model_args(p)
    _data_args(p, required=True)
    _plan_args(p)
    p.add_argument("--targets", nargs="+", default=["macs=1.5x", "macs=2x", "macs=3x"])
    p.add_argument("--methods", nargs="+", default=["svd", "tucker", "auto"])
    _finetune_args(p)
    p.add_argument("--out", required=True, help="output folder (sweep.json, sweep.md, "
                                                "sweep.png)")
    _common(p)

    p = sub.add_parser("demo", help="the embedded demo: train a small CNN on scikit-learn's "
                                    "digits, compress it, report (no download)")
    p.add_argument("--out", default="rankcut-demo", help="output folder (default rankcut-demo)")
    _common(p)
    return parser


def _finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (needs --data)")
    g.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning")
    g.add_argument("--finetune-steps", type=int, help="optimizer steps of fine-tuning")
    g.add_argument("--distill", action="store_true",
                   help="distil from the original model (knowledge distillation)")
    g.add_argument("--lr", type=float, help="learning rate (default: the optimizer's)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--checkpoint-dir", help="checkpoints here; rerun with --resume to continue")
    g.add_argument("--resume", action="store_true")


# ------------------------------------------------------------------------------------ config

def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become the subcommand's defaults, so flags on the
    command line override them (and a required flag the file gives is no longer required)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if a in sub.choices), None)
    if not known.config or command is None or "-h" in argv or "--help" in argv:
        return parser.parse_args(argv)
    import yaml

    path = Path(known.config)
    if not path.is_file():
        raise UserError(f"--config: {path} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config: {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config: {path} must hold a mapping of flag names to values")
    subparser = sub.choices[command]
    known_dests = {a.dest: a for a in subparser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known_dests:
            raise UserError(f"--config: unknown key {key!r} for 'rankcut {command}'; known: "
                            f"{', '.join(sorted(d.replace('_', '-') for d in known_dests))}")
        action = known_dests[dest]
        if action.type is not None and value is not None and not isinstance(value, list):
            value = action.type(value)
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    for action in subparser._actions:
        if action.dest in defaults:
            action.required = False
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ shared steps

class _Context:
    """What a subcommand works with: the model, data and inputs its flags describe."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        from .train.distributed import resolve_device

        self.device = resolve_device(getattr(args, "device", None))
        self.progress = not args.quiet and sys.stderr.isatty()
        self._read: dict[tuple, object] = {}  # (split, limit) -> the dataset as read, untransformed

    def model(self):
        from . import models

        a = self.args
        return models.create(a.model, weights=a.weights, num_classes=a.num_classes).eval()

    def normalization(self):
        from . import models

        a = self.args
        if a.normalization:
            return None if a.normalization.lower() == "none" else a.normalization
        try:
            models.normalization(a.model)
            return a.model
        except ValueError:
            return a.data  # the dataset's own statistics

    def dataset(self, split: str, train_transform: bool = False, limit=None):
        from . import data as D

        a = self.args
        if not a.data:
            raise UserError("--data: this needs a dataset (cifar10, cifar100, mnist, "
                            "fashion_mnist, imagefolder)")
        transform = D.transforms(a.data, train=train_transform,
                                 normalization=self.normalization(), size=a.image_size)
        key = (split, limit)  # read each split once; training, calibration and inputs share it
        if key not in self._read:
            self._read[key] = D.dataset(a.data, split, root=a.data_dir, limit=limit)
        return D.with_transform(self._read[key], transform)

    def test_data(self):
        return self.dataset("test", limit=self.args.eval_limit)

    def example_inputs(self):
        import torch

        a = self.args
        if a.data:
            x, _ = self.test_data()[0]
            return x.unsqueeze(0)
        if not a.input_shape:
            raise UserError("--input-shape: give C,H,W of one input (e.g. 3,32,32) or --data")
        try:
            shape = tuple(int(v) for v in a.input_shape.split(","))
        except ValueError:
            raise UserError(f"--input-shape: expected C,H,W integers, got "
                            f"{a.input_shape!r}") from None
        return torch.rand(1, *shape)

    def calib_data(self, n: int):
        from . import data as D

        if not self.args.data or not n:
            return None
        return D.calibration(self.dataset("train"), n=n, batch_size=min(128, n),
                             seed=self.args.seed)

    def compressed(self, folder):
        from .io import load

        if not Path(folder).is_dir():
            raise UserError(f"--compressed: {folder} is not a folder written by 'rankcut "
                            "compress'")
        return load(self.model(), folder).eval()

    def finetune_options(self) -> dict:
        a = self.args
        opts = {"optimizer": a.optimizer, "batch_size": a.batch_size, "progress": self.progress,
                "device": self.device, "seed": a.seed}
        if a.lr is not None:
            opts["lr"] = a.lr
        if a.checkpoint_dir:
            opts.update(checkpoint_dir=a.checkpoint_dir, resume=a.resume)
        return opts

    def plan_options(self) -> dict:
        a = self.args
        return {"rank_multiple": a.rank_multiple, "allow_slower": a.allow_slower,
                "exclude": a.exclude, "min_params": a.min_params}


def _say(*parts) -> None:
    print(*parts, flush=True)


def _epochs_steps(args):
    return args.finetune_epochs, args.finetune_steps


def _evaluate(ctx, model, data):
    from .train import evaluate

    return evaluate(model.to(ctx.device), data, device=ctx.device,
                    batch_size=ctx.args.batch_size)


# ------------------------------------------------------------------------------- subcommands

def cmd_compress(args) -> int:
    from . import report as R
    from .compress import compress
    from .io import load_plan, save

    ctx = _Context(args)
    if not (args.plan or args.rank or args.target):
        raise UserError("compress: give --target, --rank, or --plan")
    model = ctx.model()
    x = ctx.example_inputs()
    plan = load_plan(args.plan) if args.plan else None
    epochs, steps = _epochs_steps(args)
    tune = epochs is not None or steps is not None or args.steps_per_layer
    train = ctx.dataset("train", train_transform=True) if tune else None
    test = ctx.test_data() if args.data else None
    calib = ctx.calib_data(args.calib) if plan is None or args.calib else None
    _say(f"rankcut compress: {args.model}, method {args.method}, "
         f"{'plan ' + args.plan if plan else 'target ' + str(args.target or args.rank)}, "
         f"schedule {args.schedule}")
    result = compress(
        model, x, method=args.method, rank=args.rank, target=args.target,
        schedule=args.schedule, plan=plan, calib_data=calib, train_data=train, epochs=epochs,
        steps=steps, steps_per_layer=args.steps_per_layer, rounds=args.rounds,
        val_data=test if args.min_accuracy is not None else None,
        min_accuracy=args.min_accuracy, distill=args.distill,
        plan_options=ctx.plan_options(), finetune_options=ctx.finetune_options(),
        progress=ctx.progress)
    out = Path(args.out)
    small = result.model.cpu().eval()
    save(small, out, plan=result.plan)
    accuracy = None
    if test is not None:
        accuracy = {"original": _evaluate(ctx, model, test), "compressed": _evaluate(ctx, small,
                                                                                     test)}
    rep = R.compare(model.cpu(), small.cpu(), x, plan=result.plan, accuracy=accuracy,
                    latency=not args.no_latency,
                    meta={"model": args.model, "command": "rankcut " + " ".join(sys.argv[1:]),
                          "schedule": args.schedule, "stages": result.stages,
                          "met_target": result.met_target})
    rep.write_json(out / "report.json")
    rep.write_markdown(out / "report.md")
    plots = R.write_plots(rep, out)
    _say(rep.summary() if hasattr(rep, "summary") else rep.to_markdown().split("\n\n")[0])
    _say(f"wrote {out}/: plan.json, model.safetensors, report.json, report.md, "
         f"{', '.join(Path(p).name for p in plots)}")
    return 0


def cmd_evaluate(args) -> int:
    ctx = _Context(args)
    model = ctx.compressed(args.compressed) if args.compressed else ctx.model()
    m = _evaluate(ctx, model, ctx.test_data())
    _say(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
         f"on {m['n']} {args.data} test examples")
    return 0


def cmd_benchmark(args) -> int:
    import torch

    from .profile import compare_latency

    ctx = _Context(args)
    model = ctx.model().to(ctx.device)
    small = ctx.compressed(args.compressed).to(ctx.device)
    x = ctx.example_inputs()
    _say(f"latency on {ctx.device}, {torch.get_num_threads()} threads, median of "
         f"{args.repeats} interleaved runs:")
    _say(f"{'batch':>6} {'original ms':>12} {'compressed ms':>14} {'speed-up':>9}")
    for batch in args.batches:
        xb = x.expand(batch, *x.shape[1:]).contiguous().to(ctx.device)
        a, b = compare_latency(model, small, xb, repeats=args.repeats)
        _say(f"{batch:>6} {a.median_ms:12.3f} {b.median_ms:14.3f} "
             f"{a.median_ms / b.median_ms:8.2f}x")
    return 0


def cmd_export(args) -> int:
    from .export import export

    ctx = _Context(args)
    model = ctx.compressed(args.compressed) if args.compressed else ctx.model()
    path = export(model, args.output, example_inputs=ctx.example_inputs(), format=args.format)
    _say(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from . import report as R
    from .compress import compress

    ctx = _Context(args)
    model = ctx.model()
    x = ctx.example_inputs()
    test = ctx.test_data()
    epochs, steps = _epochs_steps(args)
    train = ctx.dataset("train", train_transform=True) if epochs or steps else None
    calib = ctx.calib_data(args.calib)
    dense = _evaluate(ctx, model, test)
    from .profile import count_macs, count_params

    base = {"params": count_params(model), "macs": count_macs(model, x)}
    points = []
    _say(f"{'method':>12} {'target':>10} {'params x':>9} {'MACs x':>7} {'top-1 %':>8}")
    _say(f"{'dense':>12} {'-':>10} {1:9.2f} {1:7.2f} {dense['top1']:8.2f}")
    for method in args.methods:
        for target in args.targets:
            result = compress(model, x, method=method, rank=args.rank, target=target,
                              calib_data=calib, train_data=train, epochs=epochs, steps=steps,
                              distill=args.distill, plan_options=ctx.plan_options(),
                              finetune_options=ctx.finetune_options(), progress=ctx.progress)
            small = result.model.cpu().eval()
            m = _evaluate(ctx, small, test)
            point = {"method": method, "target": target, "top1": m["top1"], "top5": m["top5"],
                     "params_ratio": base["params"] / count_params(small),
                     "macs_ratio": base["macs"] / count_macs(small, x)}
            points.append(point)
            _say(f"{method:>12} {target:>10} {point['params_ratio']:9.2f} "
                 f"{point['macs_ratio']:7.2f} {m['top1']:8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "rankcut.sweep", "version": 1, "model": args.model, "data": args.data,
           "dense": dense, "points": points}
    (out / "sweep.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# Sweep: {args.model} on {args.data} ({dense['n']} test examples)", "",
             f"Dense top-1: {dense['top1']:.2f}%", "",
             "| method | target | params (x fewer) | MACs (x fewer) | top-1 % |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {p['method']} | {p['target']} | {p['params_ratio']:.2f} | "
              f"{p['macs_ratio']:.2f} | {p['top1']:.2f} |" for p in points]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    R.plot_sweep([{**p, "ratio": p["macs_ratio"]} for p in points], out / "sweep.png",
                 baseline=dense["top1"], title=f"{args.model} on {args.data}")
    _say(f"wrote {out}/: sweep.json, sweep.md, sweep.png")
    return 0


def cmd_analyze(args) -> int:
    from . import report as R

    ctx = _Context(args)
    model = ctx.model()
    x = ctx.example_inputs()
    calib = ctx.calib_data(args.calib)
    result = R.analyze(model, x, rank_rules=tuple(args.rules), calib_data=calib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "analysis.md").write_text(result.to_markdown())
    plots = result.write_plots(out) if hasattr(result, "write_plots") else []
    _say(result.to_markdown())
    _say(f"wrote {out}/: analysis.json, analysis.md"
         + "".join(f", {Path(p).name}" for p in plots))
    return 0


def cmd_demo(args) -> int:
    from . import demo

    _Context(args)
    demo.run(args.out, seed=args.seed, progress=not args.quiet)
    return 0


COMMANDS = {"analyze": cmd_analyze, "compress": cmd_compress, "evaluate": cmd_evaluate,
            "benchmark": cmd_benchmark, "export": cmd_export, "sweep": cmd_sweep,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = _with_config(parser, argv)
        return COMMANDS[args.command](args)
    except (UserError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"rankcut: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # e.g. a model run on inputs of the wrong shape
        if debug:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"rankcut: error: {type(err).__name__}: {first} (--debug shows the traceback)",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rankcut: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
