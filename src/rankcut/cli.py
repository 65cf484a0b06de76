"""The ``rankcut`` command: analyze, compress, evaluate, benchmark, export, sweep, demo.

    rankcut compress --model resnet20_cifar --weights resnet20-12fca82f.th --data cifar10 \\
        --data-dir ../shared/data --method auto --target macs=2x --finetune-epochs 1 --distill \\
        --out out/

Every subcommand takes ``--config FILE.yaml`` (keys are the long flag names, ``-`` or ``_``);
flags given on the command line override the file. The compression flags take their defaults
from :data:`rankcut.defaults.COMPRESS`, as the API does. User errors (a missing file, an unknown
model, a bad rank or target, a number out of range, a plan that does not fit, an output path
that cannot be written) print one line and exit with code 2; any other failure (in a model's
own code, or a bug) prints one line naming its type and exits with code 1; ``--debug`` shows
the traceback instead. Every flag and every output path is checked before any work is done, and
an output folder is written whole into a temporary sibling and renamed into place at the end,
so it never holds files of two runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .defaults import COMPRESS

EXIT_USAGE = 2
EXIT_ERROR = 1  # anything else: the one line names its type (--debug: the traceback)
# the file that marks an existing folder as an earlier output of the subcommand (which may then
# be replaced whole); any other non-empty folder needs --overwrite. Not plan.json: every rankcut
# save holds one, and a transfer --out naming a compress output (or the reverse) replaced it.
# The demo's is rankcut.demo.RECORD (tests check they agree; not imported: the demo needs torch)
OUTPUT_MARKERS = {"compress": "report.json", "sweep": "sweep.json", "analyze": "analysis.json",
                  "demo": "demo.json", "transfer": "transfer.json"}


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------- arguments

def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="registry name (resnet20_cifar, vgg11_bn_cifar, ...), a torchvision "
                        "name (resnet18, ...) or package.module:function")
    g.add_argument("--weights", help="state dict to load (safetensors or torch file)")
    g.add_argument("--num-classes", type=int, help="number of outputs of the model (>= 1)")


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
    g.add_argument("--batch-size", type=int, default=COMPRESS["batch_size"],
                   help=f"batch size (default {COMPRESS['batch_size']})")
    g.add_argument("--input-shape",
                   help="C,H,W of one input when no --data is given (e.g. 3,32,32)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default=COMPRESS["method"],
                   help=f"auto or a method of rankcut.methods, or a form of one: "
                        f"{', '.join(m for m in _known_methods() if m != 'auto')} (default "
                        f"{COMPRESS['method']})")
    g.add_argument("--rank", help="rank rule: 64, vbmf, energy=0.95, params=0.25, ...")
    g.add_argument("--solver-option", nargs="+", action="extend", metavar="METHOD.KEY=VALUE",
                   help="a solver option of a method, e.g. cur.solver=rx (CUR's algorithm: "
                        "deim (default), rx, leverage, linear_time, cx), cp.solver=als_qr, "
                        "cp.max_iter=100; values are read as YAML scalars; added to a "
                        "config file's list, a later value of a key winning")
    g.add_argument("--target", help="macs=2x, params=3x, latency=1.5x, or a fraction (macs=0.4)")
    g.add_argument("--calib", type=int, default=COMPRESS["calib"],
                   help="calibration training examples for data-aware planning (0: none; "
                        f"default {COMPRESS['calib']} when --data is given)")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="fit each layer to the inputs the factorized layers before it give it, "
                        "the dense outputs as target (default: on with calibration data)")
    g.add_argument("--rank-multiple", type=int, default=COMPRESS["rank_multiple"],
                   help=f"round ranks to a multiple (default {COMPRESS['rank_multiple']})")
    g.add_argument("--allow-slower", action=argparse.BooleanOptionalAction,
                   default=COMPRESS["allow_slower"],
                   help="do not keep the plan no slower than dense on this machine (no timing)")
    g.add_argument("--speed-slack", type=float, default=COMPRESS["speed_slack"],
                   help="with a params/MACs target, the share of extra predicted damage the "
                        "plan may take on to run faster by the latency table (default "
                        f"{COMPRESS['speed_slack']}; 0: the most accurate plan no slower than "
                        "dense)")
    g.add_argument("--latency-batch", type=int,
                   help="the batch the plan is timed and kept no slower than dense at "
                        "(default 1)")
    g.add_argument("--latency-table",
                   help="JSON latency table of this machine: loaded when it exists, extended "
                        "and saved (planning again then times nothing it has timed; default: "
                        "the machine's cached table, ~/.cache/rankcut or $RANKCUT_CACHE)")
    g.add_argument("--latency-engine", choices=["eager", "onnxruntime"],
                   help="what the latency table times: PyTorch eager (default) or ONNX Runtime "
                        "on the CPU (its plans measured no faster in ONNX Runtime than the "
                        "default's, often slower: docs/planning.md)")
    g.add_argument("--exclude", nargs="+", help="layer names or glob patterns to leave dense")
    g.add_argument("--min-params", type=int, default=COMPRESS["min_params"],
                   help="leave layers with fewer parameters dense (default "
                        f"{COMPRESS['min_params']})")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--config", help="YAML file of flag values (command-line flags override it)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--threads", type=int, help="torch.set_num_threads")
    g.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=False,
                   help="have glibc's malloc keep freed memory instead of returning it to the "
                        "OS (rankcut.profile.keep_freed_memory): CPU inference takes no page "
                        "faults for its activations, factorized models gain most; time and "
                        "plan with it as the model will be deployed")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks of errors")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its errors (a mistyped number, an unknown or missing flag) raised as
    one-line usage errors like every other check's, not the usage text then an exit."""

    def error(self, message: str):
        raise UserError(f"{self.prog.removeprefix('rankcut ')}: {message} "
                        f"(rankcut {self.prog.removeprefix('rankcut ')} --help lists the flags)"
                        if self.prog != "rankcut" else f"{message} (rankcut --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    _out_args(p, "output folder for the report and plots")
    _common(p)

    p = sub.add_parser("compress", help="plan, apply, optionally fine-tune; write the model, "
                                        "plan, report and plots")
    _model_args(p)
    _data_args(p)
    _plan_args(p)
    p.add_argument("--synthetic-calib", type=int, default=COMPRESS["synthetic_calib"],
                   metavar="N",
                   help="without --data: N calibration inputs synthesised from the model's "
                        "BatchNorm statistics (rankcut.data.synthetic_calibration) for "
                        "data-aware planning and fitting; far better than none beyond 2x "
                        f"(default {COMPRESS['synthetic_calib']}: none)")
    p.add_argument("--plan", help="apply this plan.json (e.g. hand-edited), or the plan of a "
                                  "rankcut output folder, instead of planning (not with "
                                  "--method, --rank or --target)")
    p.add_argument("--schedule", default=COMPRESS["schedule"],
                   choices=["one_shot", "layerwise", "multistage"],
                   help=f"default {COMPRESS['schedule']}")
    p.add_argument("--rounds", type=int, default=COMPRESS["rounds"],
                   help=f"multistage rounds (default {COMPRESS['rounds']})")
    p.add_argument("--steps-per-layer", type=int, help="layerwise fine-tuning steps per layer")
    p.add_argument("--min-accuracy", type=float,
                   help="multistage: stop when top-1 (%%) on a validation split held out of the "
                        "training set falls below this")
    p.add_argument("--val-split", type=float,
                   help="with --min-accuracy: the fraction (0.1) or number (5000) of training "
                        "examples held out to check it, not trained on (default 0.1)")
    _finetune_args(p)
    p.add_argument("--no-latency", action="store_true", help="do not time the models")
    _out_args(p, "output folder (plan.json, model.safetensors, report.json, report.md, plots)")
    _common(p)

    p = sub.add_parser("evaluate", help="top-1/top-5/loss of a model or a compressed folder")
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument("--compressed", help="a folder written by 'rankcut compress'")
    _verify_args(p)
    _common(p)

    p = sub.add_parser("benchmark", help="latency of the original and the compressed model")
    _model_args(p)
    _data_args(p)
    p.add_argument("--compressed", required=True, help="a folder written by 'rankcut compress'")
    _verify_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32],
                   help="batch sizes (each >= 1)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per batch size (>= 1)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                   help="also time both models fused as 'rankcut export' writes them "
                        "(BatchNorm folded, factorizations that save nothing made dense), each "
                        "in the memory format that runs it faster")
    p.add_argument("--engine", choices=["eager", "onnxruntime"], default="eager",
                   help="time PyTorch itself (default) or both models fused and exported to "
                        "ONNX, run by ONNX Runtime on the CPU (needs rankcut[export])")
    _common(p)

    p = sub.add_parser("export", help="write a compressed model as ONNX or TorchScript")
    _model_args(p)
    _data_args(p)
    p.add_argument("--compressed", help="a folder written by 'rankcut compress' (default: the "
                                        "model as given)")
    _verify_args(p)
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="export the deployable copy: BatchNorm folded into the convolution "
                        "before it, factorizations that save nothing made dense (default: on)")
    p.add_argument("--output", required=True, help="file to write (not a folder)")
    _common(p)

    p = sub.add_parser("sweep", help="accuracy against compression across targets and methods")
    _model_args(p)
    _data_args(p, required=True)
    _plan_args(p)
    for action in p._actions:  # sweep takes --methods and --targets (it refuses these two)
        if action.dest in ("method", "target"):
            action.help = argparse.SUPPRESS
    p.add_argument("--targets", nargs="+", default=["macs=1.5x", "macs=2x", "macs=3x"],
                   help="the targets to plan each method to (default macs=1.5x macs=2x "
                        "macs=3x); sweep takes these, not --target")
    p.add_argument("--methods", nargs="+", default=["svd", "tucker", "auto"],
                   help="the methods to sweep (default svd tucker auto); sweep takes these, "
                        "not --method")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=False,
                   help="also time every plan against the dense model on this machine (both "
                        "fused, at --latency-batch, default 1) and plot top-1 against speed-up "
                        "(sweep_latency.png)")
    _finetune_args(p)
    _out_args(p, "output folder (sweep.json, sweep.md, sweep.png[, sweep_latency.png])")
    _common(p)

    p = sub.add_parser("transfer", help="train a new classifier head on a frozen backbone (a "
                                        "compressed folder or the model): seed 000's transfer "
                                        "learning")
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument("--compressed", help="the backbone: a folder written by 'rankcut compress' "
                                        "(default: the model as given)")
    _verify_args(p)
    p.add_argument("--head", help="the classifier module to replace (default: the last "
                                  "nn.Linear)")
    p.add_argument("--train-limit", type=int,
                   help="train the head on the first N training examples only")
    _finetune_args(p, distill=False)
    _out_args(p, "output folder (plan.json, model.safetensors: the backbone with its new head; "
                 "load with rc.load(create(MODEL, num_classes=K), OUT))")
    _common(p)

    p = sub.add_parser("demo", help="the embedded demo: train a small CNN on scikit-learn's "
                                    "digits, compress it, report (no download)")
    _out_args(p, "output folder (default rankcut-demo)", default="rankcut-demo",
              overwrite_help="replace an existing non-empty --out folder that is not an "
                             "earlier demo output, and everything in it")
    _common(p)
    return parser


def _out_args(p: argparse.ArgumentParser, help: str, default: str | None = None,
              overwrite_help: str | None = None) -> None:
    p.add_argument("--out", required=default is None, default=default, help=help)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help=overwrite_help or "replace an existing non-empty --out folder that is "
                        "not an earlier output of this command, and everything in it (an "
                        "earlier output is replaced whole without it)")


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="load a --compressed folder whose plan.json has no weights_sha256 (a "
                        "plan written by hand); rankcut's own outputs always have it")


def _finetune_args(p: argparse.ArgumentParser, distill: bool = True) -> None:
    g = p.add_argument_group("fine-tuning (needs --data)")
    g.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning (>= 1)")
    g.add_argument("--finetune-steps", type=int, help="optimizer steps of fine-tuning (>= 1)")
    if distill:
        g.add_argument("--distill", action=argparse.BooleanOptionalAction,
                       default=COMPRESS["distill"],
                       help="distil from the original model (knowledge distillation; default "
                            f"{'on' if COMPRESS['distill'] else 'off'})")
        g.add_argument("--teacher-cache", metavar="DIR",
                       help="keep the teacher's outputs in DIR, so later runs with the same "
                            "teacher on the same batches (same data, seed, batch size, "
                            "augmentation) skip its forward")
    g.add_argument("--lr", type=float, help="learning rate, > 0 (default: the optimizer's)")
    g.add_argument("--optimizer", default=COMPRESS["optimizer"], choices=["sgd", "adamw"],
                   help=f"default {COMPRESS['optimizer']}")
    g.add_argument("--checkpoint-dir", help="checkpoints here; rerun with --resume to continue")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False)


# ------------------------------------------------------------------------------------ config

def _subparser(parser: argparse.ArgumentParser, argv: list[str]):
    """(the subcommand's name, its parser), or (None, None) when argv names none."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if a in sub.choices), None)
    return command, (sub.choices[command] if command is not None else None)


def _config_value(key: str, action: argparse.Action, value):
    """A config file's ``value`` for ``action``, checked as the command line would check it:
    an on/off flag takes a YAML boolean only (the string "false" is not false), a number flag a
    number, a list flag one value or a list, a choice one of its choices."""
    where = f"--config: key {key!r}"
    if value is None:
        return None
    if action.nargs == 0:  # store_true, BooleanOptionalAction
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise UserError(f"{where}: expected a single value, got a list {value!r}")
    values = value if isinstance(value, list) else [value]
    if many and not values:
        raise UserError(f"{where}: expected at least one value, got an empty list")
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise UserError(f"{where}: expected {kind}, got {v!r}")
        if action.type is int:
            if isinstance(v, float):
                raise UserError(f"{where}: expected an integer, got {v!r}")
            try:
                v = int(v)
            except ValueError:
                raise UserError(f"{where}: expected an integer, got {v!r}") from None
        elif action.type is float:
            try:
                v = float(v)
            except ValueError:
                raise UserError(f"{where}: expected a number, got {v!r}") from None
        elif action.type is None:
            v = str(v)
        if action.choices is not None and v not in action.choices:
            raise UserError(f"{where}: expected one of {', '.join(map(str, action.choices))}, "
                            f"got {v!r}")
        out.append(v)
    return out if many else out[0]


def _read_config(path: Path, command: str, subparser) -> dict:
    """The config file's values by dest, checked (see :func:`_config_value`)."""
    import yaml

    if not path.is_file():
        raise UserError(f"--config: {path} " + ("is a folder, not a YAML file" if path.is_dir()
                                                else "not found"))
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--config: {path} is not valid YAML: "
                        f"{_one_line(err) or type(err).__name__}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config: {path} must hold a mapping of flag names to values")
    # (--debug decides how the file itself is reported: the command line only)
    known_dests = {a.dest: a for a in subparser._actions
                   if a.dest not in ("help", "config", "debug")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known_dests:
            raise UserError(f"--config: unknown key {key!r} for 'rankcut {command}'; known: "
                            f"{', '.join(sorted(d.replace('_', '-') for d in known_dests))}")
        action = known_dests[dest]
        if value is None and (action.required or action.default is not None):
            why = ("the flag is required" if action.required else
                   f"its default is {action.default!r}; drop the key to keep it")
            raise UserError(f"--config: key {key!r}: expected a value, got null ({why})")
        defaults[dest] = _config_value(str(key), known_dests[dest], value)
    return defaults


def _given(parser: argparse.ArgumentParser, subparser, argv: list[str]) -> set[str]:
    """The dests that ``argv`` sets explicitly (their defaults do not count): parsed again with
    every default of the subcommand suppressed."""
    saved = [(a, a.default) for a in subparser._actions]
    saved_defaults = dict(subparser._defaults)
    try:
        for action in subparser._actions:
            action.default = argparse.SUPPRESS
        subparser._defaults.clear()
        given = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        subparser._defaults.update(saved_defaults)
    return set(vars(given)) - {"command"}


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become the subcommand's defaults, so flags on the
    command line override them (and a required flag the file gives is no longer required).
    ``args.given`` is the set of dests given explicitly, on the command line or in the file."""
    pre = _Parser(prog="rankcut", add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    command, subparser = _subparser(parser, argv)
    if command is None or "-h" in argv or "--help" in argv:
        return parser.parse_args(argv)
    defaults = {}
    if known.config:
        defaults = _read_config(Path(known.config).expanduser(), command, subparser)
        subparser.set_defaults(**defaults)
        for action in subparser._actions:
            if action.dest in defaults:
                action.required = False
    args = parser.parse_args(argv)
    # (a null in the file is "unset" for a flag whose default is unset: not given)
    args.given = _given(parser, subparser, argv) | {d for d, v in defaults.items()
                                                    if v is not None}
    return args


# ------------------------------------------------------------------------------ checks

def _known_methods() -> tuple[str, ...]:
    """The method names --method accepts: the registry's (``rankcut.methods``), and "auto"."""
    from .select.planner import method_choices

    return method_choices()


def _check_method(flag: str, method) -> None:
    known = _known_methods()
    if method not in known:
        raise UserError(f"{flag}: unknown method {method!r}; known: {', '.join(known)}")


def _solver_options(items: list[str]) -> dict[str, dict]:
    """--solver-option METHOD.KEY=VALUE ... as rankcut.plan's ``options`` ({method: {key:
    value}}), each method's options checked against its solver before any work."""
    import yaml

    from . import methods

    options: dict[str, dict] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        key, eq, text = rest.partition("=")
        if not (dot and eq and name and key):
            raise UserError(f"--solver-option: expected METHOD.KEY=VALUE (e.g. cur.solver=rx), "
                            f"got {item!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no decimal point) as text
            for number in (int, float):
                try:
                    value = number(value)
                    break
                except ValueError:
                    pass
        options.setdefault(name, {})[key] = value
    return _as_user_error("--solver-option", methods.check_solver_options, options)


def _check_options_used(args) -> None:
    """--solver-option for a method this run never uses would be ignored (cur under `auto`,
    which does not consider CUR): refused, naming the methods it does use."""
    from . import methods

    asked = [args.method] if args.command == "compress" else list(args.methods)
    used = set()
    for name in asked:
        if name == "auto":
            used |= {m.name for m in methods.REGISTRY.values() if m.auto}
        else:  # (a Linear under a conv-only method is factorized by the fallback)
            try:
                used |= {methods.resolve(name)[0].name, methods.FALLBACK}
            except ValueError:
                return  # (an unknown method: named by its own check)
    unused = sorted(set(args.solver_options) - used)
    if unused:
        flag = "--method" if args.command == "compress" else "--methods"
        raise UserError(f"--solver-option: {unused[0]} is not among the methods this run uses "
                        f"({', '.join(sorted(used))}, from {flag} {' '.join(asked)}); its "
                        "options would be ignored")


def _check_rank_fits(flag: str, methods: list[str], text: str, rule) -> None:
    """A rank rule read off singular values (energy, vbmf) with a method that has none (CP)."""
    from . import methods as registry

    bare = [m for m in methods if m != "auto" and not registry.resolve(m)[0].spectra]
    if rule.kind in ("energy", "vbmf") and bare:
        raise UserError(f"--rank {text}: not defined for {flag} {bare[0]} (no singular "
                        "values); use a fixed rank, 'params=F' or 'macs=F', or leave it out")


def _as_user_error(flag: str, fn, *args):
    """``fn(*args)``, a ValueError of it reported as a mistake in ``flag``."""
    try:
        return fn(*args)
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(not 1 <= v <= MAX_INT for v in shape):
        raise UserError(f"--input-shape: expected C,H,W positive integers (e.g. 3,32,32), got "
                        f"{text!r}")
    return shape


# The largest integer a count flag takes (torch's sizes and thread counts are C integers; a
# seed may be as large as torch.manual_seed takes)
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_numbers(args: argparse.Namespace) -> None:
    at_least = {"batch_size": 1, "finetune_epochs": 1, "finetune_steps": 1, "eval_limit": 1,
                "image_size": 1, "threads": 1, "rounds": 1, "steps_per_layer": 1, "repeats": 1,
                "num_classes": 1, "rank_multiple": 1, "calib": 0, "min_params": 0,
                "synthetic_calib": 0, "train_limit": 1, "latency_batch": 1, "seed": 0}
    for dest, low in at_least.items():
        value = getattr(args, dest, None)
        high = {"seed": MAX_SEED, "threads": MAX_THREADS}.get(dest, MAX_INT)
        if value is not None and not low <= value <= high:
            raise UserError(f"{_flag(dest)}: expected an integer >= {low} and <= {high}, got "
                            f"{value}")
    for batch in getattr(args, "batches", None) or []:
        if not 1 <= batch <= MAX_INT:
            raise UserError(f"--batches: expected batch sizes >= 1 and <= {MAX_INT}, got "
                            f"{batch}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr: expected a finite number > 0, got {lr}")
    slack = getattr(args, "speed_slack", None)
    if slack is not None and not (math.isfinite(slack) and slack >= 0):
        raise UserError(f"--speed-slack: expected a finite number >= 0, got {slack}")
    accuracy = getattr(args, "min_accuracy", None)
    if accuracy is not None and not (math.isfinite(accuracy) and 1 < accuracy <= 100):
        raise UserError(f"--min-accuracy: expected a top-1 in percent, above 1 and at most 100 "
                        f"(e.g. 90 for 90%), got {accuracy:g}")
    split = getattr(args, "val_split", None)
    if split is not None and not (math.isfinite(split) and (
            0 < split < 1 or (split >= 1 and split == int(split)))):
        raise UserError(f"--val-split: expected a fraction in (0, 1) or a whole number of "
                        f"examples, got {split:g}")


def _check_device(text: str) -> None:
    """--device names a device this machine has (a missing GPU is refused, not ignored by the
    commands that would use it only late or not at all)."""
    from ._modes import available_device

    try:
        available_device(text)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None


def _check_onnx_runtime(args: argparse.Namespace) -> None:
    """ONNX Runtime (and onnx) importable when a flag asks for them, before any work."""
    needs = ("--engine onnxruntime" if getattr(args, "engine", None) == "onnxruntime"
             else "--latency-engine onnxruntime"
             if getattr(args, "latency_engine", None) == "onnxruntime"
             else "--format onnx" if getattr(args, "format", None) == "onnx"
             and args.command == "export" else None)
    if needs is None:
        return
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"{needs}: needs {module} (pip install rankcut[export])") from None


def _check_normalization(args: argparse.Namespace) -> None:
    """--normalization names statistics rankcut knows, and only with --data; without it, the
    model's own statistics or the dataset's must exist (an image folder has none)."""
    from . import models
    from .data import dataset_key
    from .data._transforms import DATASET_STATS, resolve_normalization

    if not hasattr(args, "normalization"):
        return
    if args.normalization:
        if not args.data:
            raise UserError("--normalization: only with --data (it sets how the dataset's "
                            "images are normalised)")
        if args.normalization.lower() != "none":
            _as_user_error("--normalization", resolve_normalization, args.normalization)
        return
    if not args.data or dataset_key(args.data) in DATASET_STATS:
        return
    model = getattr(args, "model", None) or ""
    try:
        models.normalization(model)
    except ValueError:
        raise UserError(f"--normalization: {model!r} has no known input statistics and "
                        f"{args.data} has none of its own; give --normalization none, a dataset "
                        f"name ({', '.join(DATASET_STATS)}) or a model name") from None


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder``, as written or where links lead (either: an input
    reached through a symbolic link is still the input)."""
    return any(Path(f(path)).is_relative_to(Path(f(folder)))
               for f in (os.path.abspath, os.path.realpath))


def _check_paths(args: argparse.Namespace) -> None:
    from .atomic import (
        file_target_problem,
        output_folder_problem,
        written_folder_problem,
    )

    out = getattr(args, "out", None)
    if out is not None:
        if Path.cwd().is_relative_to(Path(os.path.abspath(out))):
            raise UserError(f"--out: {out} is the current folder or holds it; it is replaced "
                            "whole at the end: give a folder below it (e.g. --out results/run1)")
        problem = output_folder_problem(out, OUTPUT_MARKERS.get(args.command),
                                        getattr(args, "overwrite", False))
        if problem is not None:
            raise UserError(f"--out: {problem}")
        for dest in ("compressed", "weights", "teacher_cache", "latency_table", "plan",
                     "config", "data_dir"):
            given = getattr(args, dest, None)
            if given and _inside(Path(given), Path(out)):
                raise UserError(f"{_flag(dest)}: {given} lies inside --out {out}, which is "
                                "replaced whole at the end; keep it elsewhere")
        if getattr(args, "data", None) and getattr(args, "data_dir", None) is None:
            from .data import find_data_root

            found = find_data_root(None)  # $RANKCUT_DATA or ../shared/data
            if found is not None and _inside(found, Path(out)):
                raise UserError(f"--out: {out} holds the data root {found} (found from "
                                "$RANKCUT_DATA or the default); it is replaced whole at the "
                                "end: give a folder beside the data")
    output = getattr(args, "output", None)
    if output is not None:
        problem = file_target_problem(output)
        if problem is not None:
            raise UserError(f"--output: {problem}")
        for dest in ("compressed", "weights", "config", "latency_table"):
            given = getattr(args, dest, None)
            if given and (_inside(Path(output), Path(given)) if Path(given).is_dir()
                          else any(f(output) == f(given)
                                   for f in (os.path.abspath, os.path.realpath))):
                raise UserError(f"--output: {output} is {'inside ' if Path(given).is_dir() else ''}"
                                f"{_flag(dest)} {given}, an input of this command; write it "
                                "elsewhere")
    ckpt = getattr(args, "checkpoint_dir", None)
    if ckpt is not None:
        problem = written_folder_problem(ckpt)  # (written into, not replaced)
        if problem is not None:
            raise UserError(f"--checkpoint-dir: {problem}")
        if out is not None and _inside(Path(ckpt), Path(out)):
            raise UserError(f"--checkpoint-dir: {ckpt} lies inside --out {out}, which is "
                            "replaced whole at the end; keep checkpoints elsewhere")
        held = (next(Path(ckpt).rglob("last.pt"), None) if Path(ckpt).is_dir() else None)
        if held is not None and not getattr(args, "resume", False):
            raise UserError(f"--checkpoint-dir: {ckpt} holds an earlier run's checkpoint "
                            f"({held}), which this run would replace: pass --resume to "
                            "continue it, or give another folder to start afresh")
    teacher_cache = getattr(args, "teacher_cache", None)
    if teacher_cache:
        problem = written_folder_problem(teacher_cache)
        if problem is not None:
            raise UserError(f"--teacher-cache: {problem}")
    if getattr(args, "resume", False) and ckpt is None:
        raise UserError("--resume: needs --checkpoint-dir (where the checkpoint is)")
    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        what = ("is a folder" if Path(weights).is_dir() else "is not a regular file"
                if Path(weights).exists() else "not found")
        raise UserError(f"--weights: {weights} {what}; expected a safetensors or torch "
                        "state-dict file (rankcut never downloads weights)")
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir: {data_dir} is not a folder (the data root: holding "
                        "cifar10/, mnist/, ... or the dataset's files)")
    compressed = getattr(args, "compressed", None)
    if compressed is not None and not Path(compressed, "plan.json").is_file():
        raise UserError(f"--compressed: {compressed} is not a folder written by 'rankcut "
                        "compress' (no plan.json in it)")


def _has_calibration(args: argparse.Namespace) -> bool:
    """Whether the command will have calibration examples (real or synthesised)."""
    return bool((getattr(args, "data", None) and getattr(args, "calib", 0))
                or getattr(args, "synthetic_calib", 0))


def _check_plan(args: argparse.Namespace):
    """The --plan's Plan (None without one), refused when it cannot be read or conflicts with
    planning flags given explicitly (a plan replaces planning: its method and ranks are used)."""
    from .io import load_plan

    if getattr(args, "plan", None) is None:
        return None
    path = Path(args.plan)
    if not (path.is_file() or (path / "plan.json").is_file()):
        raise UserError(f"--plan: {path} is neither a plan.json file nor a rankcut output "
                        "folder holding one")
    clash = [_flag(d) for d in ("method", "rank", "target", "solver_option", "exclude",
                                "min_params", "rank_multiple", "speed_slack", "allow_slower",
                                "latency_table", "latency_batch", "latency_engine")
             if d in args.given]
    if clash:
        raise UserError(f"--plan: a plan fixes each layer's method, ranks and solver options "
                        f"(nothing is planned); it cannot be "
                        f"combined with {', '.join(clash)} (drop {' and '.join(clash)}, or "
                        "--plan to plan afresh)")
    if args.schedule == "multistage":
        raise UserError("--plan: --schedule multistage plans every round itself; use "
                        "one_shot or layerwise with a plan")
    try:
        plan = load_plan(path)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"--plan: {err}") from None
    from .curves import DATA_AWARE

    for name, lp in plan.active.items():  # (the options' values before what they ask for)
        try:
            lp.spec.check_options(lp.options)
        except ValueError as err:
            raise UserError(f"--plan: layer {name!r}: {err}") from None
    aware = [n for n, lp in plan.active.items() if lp.options.get(DATA_AWARE)]
    if aware and not _has_calibration(args):
        raise UserError(f"--plan: it fits {', '.join(aware[:3])}{' ...' if len(aware) > 3 else ''}"
                        f" ({len(aware)} layer(s)) on calibration data: give --data (with "
                        "--calib above 0) or --synthetic-calib N")
    return plan


def _check_plan_ranks(plan, model) -> None:
    """A --plan's ranks within what each layer can hold (a hand-edited rank above it would be
    built at the full rank, a layer larger than the dense one, reported as planned), and its
    solver options ones the user may set."""
    for name, lp in plan.active.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # (rc.apply names a missing layer)
        if lp.spec.why_not(module) is not None:
            continue  # (and a method that does not fit)
        full = lp.spec.max_rank(module, lp.form)
        if any(r > f for r, f in zip(lp.ranks, full, strict=False)):
            raise UserError(f"--plan: layer {name!r} has ranks {list(lp.ranks)}, above what it "
                            f"can hold ({list(full)}); edit the plan")
        _as_user_error(f"--plan: layer {name!r}", lp.spec.check_options, lp.options)


def _check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any work is done: numbers in range, names known, rank rules and
    targets parsed, conflicting flags refused, output paths writable."""
    _check_numbers(args)
    command = args.command
    for flag in LIST_FLAGS:  # argparse keeps only the last of a repeated list flag
        uses = [a for a in getattr(args, "argv", []) if a == flag or a.startswith(flag + "=")]
        if len(uses) > 1:
            raise UserError(f"{flag}: given {len(uses)} times, and only the last would count; "
                            f"list every value after one {flag}")
    if getattr(args, "input_shape", None):
        _input_shape(args.input_shape)
    if getattr(args, "data", None):
        from .data import NAMES, dataset_key

        if dataset_key(args.data) not in NAMES:
            raise UserError(f"--data: unknown dataset {args.data!r}; known: {', '.join(NAMES)}")
        if dataset_key(args.data) == "imagefolder" and not getattr(args, "data_dir", None):
            raise UserError("--data imagefolder: needs --data-dir, the folder holding its "
                            "train/ and test/ class folders")
    _check_normalization(args)
    if getattr(args, "device", None):
        _check_device(args.device)
    if "calib" in args.given and args.calib and not getattr(args, "data", None):
        raise UserError("--calib: calibration examples are read from --data; give it")
    if getattr(args, "synthetic_calib", 0) and getattr(args, "data", None):
        raise UserError("--synthetic-calib: for a model without data; with --data, --calib "
                        "reads real calibration examples")
    if getattr(args, "sequential", None) and not _has_calibration(args):
        raise UserError("--sequential: fits each layer to the inputs it gets on calibration "
                        "data: give --data (with --calib above 0) or --synthetic-calib N")
    if (getattr(args, "finetune_epochs", None) is not None
            and getattr(args, "finetune_steps", None) is not None):
        raise UserError("--finetune-epochs, --finetune-steps: give one, not both")
    if command in ("export",) and "device" in args.given:
        raise UserError("--device: export writes the model from the CPU; it takes no device")
    if command == "benchmark" and args.engine == "onnxruntime" and "device" in args.given:
        raise UserError("--device: --engine onnxruntime times on the CPU; drop --device")
    if command == "benchmark" and args.fused and args.engine == "onnxruntime":
        raise UserError("--fused: --engine onnxruntime always times the fused models (as "
                        "'rankcut export' writes them); drop --fused")
    if command in ("benchmark", "export", "analyze") and "batch_size" in args.given:
        raise UserError(f"--batch-size: {command} does not use it"
                        + (" (the batches to time are --batches)" if command == "benchmark"
                           else ""))
    _check_onnx_runtime(args)
    if command in ("compress", "sweep"):
        from .select import parse_rank, parse_target

        _check_method("--method", args.method)
        args.solver_options = _solver_options(args.solver_option or [])
        if args.solver_options and getattr(args, "plan", None) is None:
            _check_options_used(args)
        if args.rank is not None:
            rule = _as_user_error("--rank", parse_rank, args.rank)
            if command == "compress":
                _check_rank_fits("--method", [args.method], args.rank, rule)
        if args.target is not None:
            _as_user_error("--target", parse_target, args.target)
        tuning = [f for f in ("finetune_epochs", "finetune_steps", "steps_per_layer")
                  if getattr(args, f, None) is not None]
        if tuning and not args.data:
            raise UserError(f"{_flag(tuning[0])}: fine-tuning needs --data")
        if args.teacher_cache and not args.distill:
            raise UserError("--teacher-cache keeps the teacher's outputs: it needs --distill")
    if command == "compress":
        if args.min_accuracy is not None and args.schedule != "multistage":
            raise UserError("--min-accuracy: only with --schedule multistage")
        if args.min_accuracy is not None and not args.data:
            raise UserError("--min-accuracy: needs --data (to measure the accuracy on)")
        if args.val_split is not None and args.min_accuracy is None:
            raise UserError("--val-split: only with --min-accuracy (it holds out the data that "
                            "checks it)")
        if "rounds" in args.given and args.schedule != "multistage":
            raise UserError("--rounds: only with --schedule multistage")
        if args.steps_per_layer is not None and args.schedule != "layerwise":
            raise UserError("--steps-per-layer: only with --schedule layerwise")
        if args.sequential is not None and args.schedule == "layerwise":
            raise UserError(f"--{'' if args.sequential else 'no-'}sequential: --schedule "
                            "layerwise fits each layer to the model at hand (fine-tuned "
                            "between layers); drop it")
        args.plan_obj = _check_plan(args)
        if args.schedule == "multistage" and not args.target:
            raise UserError("--schedule multistage: needs --target (it plans a round at a "
                            "time towards it)")
        if not (args.plan_obj is not None or args.rank or args.target):
            raise UserError("compress: give --target, --rank, or --plan")
    if command == "sweep":
        from .select import parse_target

        for dest in ("method", "target"):
            if dest in args.given:
                raise UserError(f"{_flag(dest)}: sweep takes {_flag(dest)}s (one or more)")
        for method in args.methods:
            _check_method("--methods", method)
        for target in args.targets:
            _as_user_error("--targets", parse_target, target)
        if getattr(args, "rank", None):
            from .select import parse_rank

            rule = _as_user_error("--rank", parse_rank, args.rank)
            _check_rank_fits("--methods", args.methods, args.rank, rule)
    if command == "analyze":
        from .select import parse_rank

        for rule in args.rules:
            _as_user_error("--rules", parse_rank, rule)
    _check_paths(args)
    _check_idle(args)


def _check_idle(args: argparse.Namespace) -> None:
    """Refuse flags that would do nothing with the others given (after every other check: a
    flag's own mistake is named first)."""
    data = getattr(args, "data", None)
    if getattr(args, "input_shape", None) and data:  # the dataset's examples are the inputs
        raise UserError("--input-shape: only without --data (the inputs are then the "
                        "dataset's examples); drop one")
    idle = [d for d in ("eval_limit", "image_size", "data_dir")
            if getattr(args, d, None) is not None and not data]
    if idle:
        raise UserError(f"{_flag(idle[0])}: only with --data (it sets how the dataset is read)")
    if getattr(args, "eval_limit", None) is not None and args.command in (
            "analyze", "export", "benchmark"):  # (their one input is the first test example)
        raise UserError(f"--eval-limit: {args.command} evaluates nothing (its example input is "
                        "the first test example); drop it")
    if getattr(args, "weights", None) is not None and getattr(args, "compressed", None):
        raise UserError("--weights: --compressed holds every weight of the model (the dense "
                        "model's are replaced when it loads); drop --weights")
    if getattr(args, "no_verify", False) and not getattr(args, "compressed", None):
        raise UserError("--no-verify: only with --compressed (it lets a hand-written plan.json "
                        "load)")
    if args.command not in ("compress", "sweep"):
        return
    tuning = any(getattr(args, f, None) is not None
                 for f in ("finetune_epochs", "finetune_steps", "steps_per_layer"))
    # fine-tuning settings without fine-tuning (the checkpoint folder also holds the plans of
    # layerwise and multistage)
    idle = [d for d in ("lr", "optimizer", "distill", "teacher_cache", "resume")
            if d in args.given] + (["checkpoint_dir"] if "checkpoint_dir" in args.given
                                   and getattr(args, "schedule", "one_shot") == "one_shot"
                                   else [])
    if idle and not tuning:
        raise UserError(f"{_flag(idle[0])}: only with fine-tuning (--finetune-epochs or "
                        "--finetune-steps" + (", --steps-per-layer" if args.command == "compress"
                                              else "") + ")")
    timing = [d for d in ("latency_batch", "latency_table", "latency_engine", "speed_slack")
              if d in args.given]
    def is_latency(target) -> bool:
        return target.strip().lower().startswith("latency")  # (parse_target's spelling)

    latency_asked = is_latency(args.target or "") or (
        args.command == "sweep" and any(map(is_latency, args.targets)))
    if args.command == "sweep" and args.latency:  # (it times the plans made: batch, engine)
        timing = [d for d in timing if d not in ("latency_batch", "latency_engine")]
    if timing and args.allow_slower and not latency_asked:
        raise UserError(f"{_flag(timing[0])}: --allow-slower turns the latency guard off, so "
                        "nothing is timed for the plan; drop one of them")
    budgets = [args.target] if args.command == "compress" else list(args.targets)
    if "speed_slack" in args.given and not any(t and not is_latency(t) for t in budgets):
        raise UserError("--speed-slack: spends predicted damage on speed within a params or "
                        "MACs --target" + ("s" if args.command == "sweep" else "")
                        + " (a latency target spends all of it on time); give one, or drop it")


# ------------------------------------------------------------------------------ shared steps

class _Context:
    """What a subcommand works with: the model, data and inputs its flags describe."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        if getattr(args, "keep_freed_memory", False):
            from .profile import keep_freed_memory

            if not keep_freed_memory():
                raise UserError("--keep-freed-memory: the C library here is not glibc, or it "
                                "refused the settings (set its allocator's own options, or "
                                "preload jemalloc)")
        torch.manual_seed(args.seed)
        from .train.distributed import resolve_device

        self.device = resolve_device(getattr(args, "device", None))
        self.progress = not args.quiet and sys.stderr.isatty()
        self._read: dict[tuple, object] = {}  # (split, limit) -> the dataset as read, untransformed
        self.kept = None  # the training split less a held-out part (hold_out), once set

    def model(self):
        from . import models

        a = self.args
        try:
            return models.create(a.model, weights=a.weights, num_classes=a.num_classes).eval()
        except TypeError as err:  # a constructor that returns something else, or takes no such
            raise UserError(f"--model: {err}") from None  # arguments

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

    def transform(self, train: bool):
        from . import data as D

        a = self.args
        return D.transforms(a.data, train=train, normalization=self.normalization(),
                            size=a.image_size)

    def dataset(self, split: str, train_transform: bool = False, limit=None):
        from . import data as D

        a = self.args
        if not a.data:
            raise UserError("--data: this needs a dataset (cifar10, cifar100, mnist, "
                            "fashion_mnist, imagefolder)")
        transform = self.transform(train=train_transform)
        if split == "train" and self.kept is not None:  # less a held-out part (hold_out)
            return D.with_transform(self.kept, transform)
        key = (split, limit)  # read each split once; training, calibration and inputs share it
        if key not in self._read:
            self._read[key] = D.dataset(a.data, split, root=a.data_dir, limit=limit)
        return D.with_transform(self._read[key], transform)

    def hold_out(self, val):
        """A seeded part of the training split (``val``: a fraction or a count), with the
        evaluation transform, set aside: data to make choices on (an accuracy floor) that is
        neither the test split nor trained or calibrated on; from here on the "train" split is
        the rest."""
        from . import data as D

        try:
            self.kept, held = D.train_val_split(self.dataset("train"), val=val,
                                                seed=self.args.seed)
        except ValueError as e:
            raise UserError(f"--val-split: {e}") from None
        return held

    def test_data(self):
        return self.dataset("test", limit=self.args.eval_limit)

    def example_inputs(self, model):
        """One input for ``model``: the first test example of --data, else a random one of
        --input-shape, which ``model`` must accept (else a usage error naming the flag)."""
        import torch

        from ._modes import model_device

        a = self.args
        if a.data:
            test = self.test_data()
            if len(test) == 0:
                raise UserError(f"--data: the test split of {a.data} holds no examples")
            x = test[0][0].unsqueeze(0)
            flag, what = "--data", (f"the first test example of {a.data}, shape "
                                    f"{tuple(x.shape)} (--image-size resizes it)")
        else:
            if not a.input_shape:
                raise UserError("--input-shape: give C,H,W of one input (e.g. 3,32,32) or "
                                "--data")
            x = torch.rand(1, *_input_shape(a.input_shape))
            flag, what = "--input-shape", f"a batch of shape {tuple(x.shape)}"
        try:
            with torch.no_grad():
                model(x.to(model_device(model)))
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError too): not the shape
            raise
        # a model's own shape checks (asserts too); a forward that takes more than one input
        except (RuntimeError, ValueError, AssertionError, TypeError) as err:
            more = ("; the command line feeds one input a forward, use the Python API for more"
                    if isinstance(err, TypeError) and "positional argument" in str(err) else "")
            raise UserError(f"{flag}: the model does not run on {what}: "
                            f"{_one_line(err) or type(err).__name__}{more}") from None
        return x

    def calib_data(self, n: int, model=None, x=None):
        """``n`` real calibration examples from --data; without it, --synthetic-calib's inputs
        synthesised from ``model``'s BatchNorm statistics (``x``: example inputs); else None."""
        from . import data as D

        if not self.args.data:
            k = getattr(self.args, "synthetic_calib", 0)
            if not k or model is None:
                return None
            _say(f"synthesising {k} calibration inputs from the model's BatchNorm statistics")
            try:
                return D.synthetic_calibration(model, x, n=k, batch_size=min(128, k),
                                               seed=self.args.seed, progress=self.progress)
            except ValueError as e:
                raise UserError(f"--synthetic-calib: {e}") from None
        if not n:
            return None
        return D.calibration(self.dataset("train"), n=n, batch_size=min(128, n),
                             seed=self.args.seed)

    def subject(self):
        """The model a command works on: the --compressed folder's, else --model's."""
        folder = getattr(self.args, "compressed", None)
        return self.compressed(folder) if folder else self.model()

    def compressed(self, folder):
        from .io import load

        if not Path(folder).is_dir():
            raise UserError(f"--compressed: {folder} is not a folder written by 'rankcut "
                            "compress'")
        model = self.model()
        try:
            return _as_user_error("--compressed", lambda: load(
                model, folder, verify=not self.args.no_verify)).eval()
        except OSError as err:  # (a file missing beside plan.json)
            raise UserError(f"--compressed: {err}") from None

    def finetune_options(self) -> dict:
        a = self.args
        opts = {"optimizer": a.optimizer, "batch_size": a.batch_size, "progress": self.progress,
                "device": self.device, "seed": a.seed}
        if a.lr is not None:
            opts["lr"] = a.lr
        if a.checkpoint_dir:
            opts.update(checkpoint_dir=a.checkpoint_dir, resume=a.resume)
        if getattr(a, "teacher_cache", None):  # with --distill (checked with the flags)
            opts["teacher_cache"] = a.teacher_cache
        return opts

    def plan_options(self) -> dict:
        from .select import CandidateCache

        a = self.args
        # this machine's candidate cache: a later command planning the same model, data and
        # settings (another target, a rerun) skips the scoring; plans of one invocation share
        # their moments too (RANKCUT_CACHE=off: in memory only)
        opts = {"rank_multiple": a.rank_multiple, "allow_slower": a.allow_slower,
                "speed_slack": a.speed_slack, "exclude": a.exclude,
                "min_params": a.min_params, "cache": CandidateCache.cached(max_entries=2)}
        if getattr(a, "solver_options", None):
            opts["options"] = a.solver_options
        if a.latency_batch is not None:
            opts["latency_batch"] = a.latency_batch
        if a.latency_table or a.latency_engine not in (None, "eager"):
            from .select import LatencyTable

            # (ONNX Runtime for --latency-engine was checked with the flags: _check_onnx_runtime)
            # the model is planned where it is built, on the CPU (fine-tuning moves it later):
            # its layers are timed there
            device = "cpu"
            opts["latency_table"] = (
                LatencyTable.at(a.latency_table, device, engine=a.latency_engine or "eager")
                if a.latency_table else LatencyTable.cached(device, engine=a.latency_engine))
        return opts


def _start(args):
    """The context, the model and its example inputs: how the subcommands that plan start."""
    ctx = _Context(args)
    model = ctx.model()
    return ctx, model, ctx.example_inputs(model)


def _say(*parts) -> None:
    print(*parts, flush=True)


def _note_no_calibration(args, model, calib, plan) -> None:
    """Planning beyond 2x fewer MACs or params with no calibration data at all: the plan sees
    weight errors only, and there a few ranks more or less swing top-1 by tens of points
    (docs/planning.md); say what would help."""
    from .data._synthetic import norm_layers
    from .select import parse_target

    if calib is not None or plan is not None or not args.target:
        return
    kind, keep = parse_target(args.target)
    if kind == "latency" or keep >= 0.5:
        return
    with_bn = bool(norm_layers(model))  # what --synthetic-calib needs
    advice = ("--calib 512" if getattr(args, "data", None) else
              "--data" + (" or --synthetic-calib 128 (inputs synthesised from the model's "
                          "BatchNorm statistics)" if with_bn else ""))
    _say(f"note: {args.target} without calibration data: the plan sees weight errors only, "
         f"which beyond 2x can cost much accuracy; give {advice}")


def _epochs_steps(args):
    return args.finetune_epochs, args.finetune_steps


def _evaluate(ctx, model, data):
    from .train import evaluate

    return evaluate(model.to(ctx.device), data, device=ctx.device,
                    batch_size=ctx.args.batch_size)


# ------------------------------------------------------------------------------- subcommands

def cmd_compress(args) -> int:
    from . import report as R
    from .atomic import atomic_folder
    from .compress import compress
    from .io import realized_plan, save

    ctx, model, x = _start(args)
    plan = args.plan_obj
    if plan is not None:
        _check_plan_ranks(plan, model)
    options = ctx.plan_options()  # (a latency table read now, before any data)
    epochs, steps = _epochs_steps(args)
    tune = epochs is not None or steps is not None or args.steps_per_layer
    val = None
    if args.min_accuracy is not None:  # the floor is a choice made on data: not the test split
        split = 0.1 if args.val_split is None else args.val_split
        val = ctx.hold_out(split if split < 1 else int(split))
    train = ctx.dataset("train", train_transform=True) if tune else None
    test = ctx.test_data() if args.data else None
    calib = (ctx.calib_data(args.calib, model, x)
             if plan is None or args.calib or args.synthetic_calib else None)
    _note_no_calibration(args, model, calib, plan)
    what = (f"plan {args.plan}" if plan is not None else
            f"method {args.method}, " + (f"target {args.target}" if args.target else "")
            + (", " if args.target and args.rank else "")
            + (f"rank {args.rank}" if args.rank else ""))
    _say(f"rankcut compress: {args.model}, {what}, schedule {args.schedule}")
    result = compress(
        model, x, method=args.method, rank=args.rank, target=args.target,
        schedule=args.schedule, plan=plan, calib_data=calib, train_data=train, epochs=epochs,
        steps=steps, steps_per_layer=args.steps_per_layer, rounds=args.rounds,
        val_data=val,
        min_accuracy=args.min_accuracy, distill=args.distill,
        plan_options=options, finetune_options=ctx.finetune_options(),
        progress=ctx.progress, sequential=args.sequential)
    out = Path(args.out)
    small = result.model.cpu().eval()
    accuracy = None
    if test is not None:
        accuracy = {"original": _evaluate(ctx, model, test), "compressed": _evaluate(ctx, small,
                                                                                     test)}
    done = realized_plan(small, result.plan)  # the ranks built: the report's and the save's
    rep = R.compare(model.cpu(), small.cpu(), x, plan=done, accuracy=accuracy,
                    latency=not args.no_latency,
                    meta={"model": args.model, "command": _command_line(args),
                          "schedule": args.schedule, "stages": result.stages,
                          "met_target": result.met_target})
    # the whole output set goes into a temporary sibling, renamed into place at the end: the
    # folder never holds this run's model beside an earlier run's report
    with atomic_folder(out) as tmp:
        save(small, tmp, plan=done)
        rep.write_json(tmp / "report.json")
        rep.write_markdown(tmp / "report.md")
        plots = R.write_plots(rep, tmp)
    _say(rep.summary())
    _say(f"wrote {out}/: " + ", ".join(["plan.json", "model.safetensors", "report.json",
                                          "report.md", *(Path(p).name for p in plots)]))
    return 0


def cmd_evaluate(args) -> int:
    ctx = _Context(args)
    model = ctx.subject()
    m = _evaluate(ctx, model, ctx.test_data())
    _say(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
         f"on {m['n']} {args.data} test examples")
    return 0


def cmd_benchmark(args) -> int:
    import torch

    from .profile import allocator_advice, speedups

    ctx = _Context(args)
    model = ctx.model().to(ctx.device)
    small = ctx.compressed(args.compressed).to(ctx.device)
    x = ctx.example_inputs(model)
    ort = args.engine == "onnxruntime"
    where = "ONNX Runtime on the CPU" if ort else ctx.device
    _say(f"latency on {where}, {torch.get_num_threads()} threads, median of "
         f"{args.repeats} interleaved runs" + (
             " (fused and exported as 'rankcut export --fuse' writes them)" if ort else
             " (fused: as export writes them, each in its faster memory format)" if args.fused
             else "") + ":")
    _say(f"{'':6} {'batch':>6} {'original ms':>12} {'compressed ms':>14} {'speed-up':>9}")
    advice = None
    for row in speedups(model, small, x.to(ctx.device), args.batches, fused=args.fused,
                        repeats=args.repeats, engine=args.engine):
        _say(f"{row['form']:6} {row['batch']:>6} {row['dense_ms']:12.3f} "
             f"{row['compressed_ms']:14.3f} {row['speedup']:8.2f}x")
        if advice is None:  # (the first row that pays the allocator: one note)
            said = allocator_advice(row["dense_faults"], row["compressed_faults"],
                                    device=ctx.device, engine=row["engine"])
            advice = said and f"note: {row['form']} at batch {row['batch']}, {said}"
    if advice:
        _say(advice)
    return 0


def cmd_export(args) -> int:
    from .export import export

    ctx = _Context(args)
    model = ctx.subject()
    path = export(model, args.output, example_inputs=ctx.example_inputs(model), format=args.format,
                  fuse=args.fuse)
    _say(f"wrote {path}" + (" (BatchNorm folded)" if args.fuse else ""))
    return 0


def cmd_transfer(args) -> int:
    from .atomic import atomic_folder
    from .compress import transfer
    from .io import save
    from .profile import count_params

    ctx = _Context(args)
    backbone = ctx.subject()
    if args.head is not None:  # before the data is read (slow for an image folder)
        from .compress import find_head

        try:
            find_head(backbone, args.head)
        except ValueError as err:
            raise UserError(f"--{err}") from None  # ("head: ...")
    train = ctx.dataset("train", train_transform=True, limit=args.train_limit)
    test = ctx.test_data()
    base = _base_dataset(train)
    from .data import num_classes

    # the format's own count where it has one (a --train-limit subset may lack the last
    # classes: a head sized from its labels was too small for the test split), else an image
    # folder's class names
    classes = num_classes(args.data) or len(getattr(base, "classes", None) or [])
    if not classes:
        labels = [int(y) for y in getattr(base, "labels", [])]
        if not labels:
            raise UserError(f"--data: {args.data} gives no labels to count the classes of")
        classes = max(labels) + 1
    epochs, steps = _epochs_steps(args)
    if epochs is None and steps is None:
        epochs = 1
    options = ctx.finetune_options()
    what = f"{args.compressed} ({args.model})" if args.compressed else args.model
    _say(f"rankcut transfer: a new {classes}-class head on {what}, frozen, trained on "
         f"{len(train)} {args.data} examples")
    result = transfer(backbone, train, num_classes=classes, head=args.head, epochs=epochs,
                      steps=steps, **options)
    model = result.model.cpu().eval()
    m = _evaluate(ctx, model, test)
    out = Path(args.out)
    record = {"command": _command_line(args), "model": args.model,
              "backbone": args.compressed, "head": args.head, "data": args.data,
              "num_classes": classes,
              "train_examples": len(train), "epochs": epochs, "steps": steps,
              "params": count_params(model), "test": m}
    with atomic_folder(out) as tmp:  # the plan is read off the model's factorized layers
        save(model, tmp)
        (tmp / OUTPUT_MARKERS["transfer"]).write_text(json.dumps(record, indent=2) + "\n")
    _say(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  on {m['n']} "
         f"{args.data} test examples; backbone {count_params(model):,} params in all")
    _say(f"wrote {out}/: plan.json, model.safetensors, transfer.json (load with rc.load(create("
         f"{args.model!r}, num_classes={classes}), {str(out)!r}))")
    return 0


def _base_dataset(ds):
    """The dataset under Subsets (which keep only indices)."""
    from torch.utils.data import Subset

    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def cmd_sweep(args) -> int:
    from . import report as R
    from .atomic import atomic_folder
    from .compress import compress

    ctx, model, x = _start(args)
    # one candidate cache (the plans share their moments too); a latency table read now, before
    # any data
    options = ctx.plan_options()
    test = ctx.test_data()
    epochs, steps = _epochs_steps(args)
    train = ctx.dataset("train", train_transform=True) if epochs or steps else None
    calib = ctx.calib_data(args.calib)
    dense = _evaluate(ctx, model, test)
    model.cpu()  # (moved by the evaluation: planned where it was built, as compress plans)
    from .profile import count_macs, count_params
    from .select import TargetUnreachable

    base = {"params": count_params(model), "macs": count_macs(model, x)}
    points, skipped = [], []
    timer = (_SpeedUp(model, x, args.latency_batch or 1,
                      getattr(args, "latency_engine", None) or "eager")
             if args.latency else None)
    extra = f" {'speed-up':>8}" if timer else ""
    _say(f"{'method':>12} {'target':>10} {'params x':>9} {'MACs x':>7} {'top-1 %':>8}{extra}")
    _say(f"{'dense':>12} {'-':>10} {1:9.2f} {1:7.2f} {dense['top1']:8.2f}"
         + (f" {1:8.2f}" if timer else ""))
    for method in args.methods:
        for target in args.targets:
            tuning = ctx.finetune_options()
            if "checkpoint_dir" in tuning:  # each point's own (a resume picks up each one)
                tuning["checkpoint_dir"] = str(Path(tuning["checkpoint_dir"],
                                                    f"{method}-{target}".replace("=", "")))
            try:
                result = compress(model, x, method=method, rank=args.rank, target=target,
                                  calib_data=calib, train_data=train, epochs=epochs,
                                  steps=steps, distill=args.distill, plan_options=options,
                                  finetune_options=tuning, progress=ctx.progress,
                                  sequential=args.sequential)
            except TargetUnreachable as err:
                # a target the plan cannot reach (e.g. the latency guard's refusal): the
                # other points stand; the line says why this one is missing
                _say(f"{method:>12} {target:>10}  no plan: {err}")
                skipped.append({"method": method, "target": target, "error": str(err)})
                continue
            small = result.model.cpu().eval()
            m = _evaluate(ctx, small, test)
            point = {"method": method, "target": target, "top1": m["top1"], "top5": m["top5"],
                     "params_ratio": base["params"] / count_params(small),
                     "macs_ratio": base["macs"] / count_macs(small, x)}
            if timer:
                point.update(timer(small))
            points.append(point)
            _say(f"{method:>12} {target:>10} {point['params_ratio']:9.2f} "
                 f"{point['macs_ratio']:7.2f} {m['top1']:8.2f}"
                 + (f" {point['speedup']:8.2f}" if timer else ""))
    if not points:
        raise ValueError(f"no point of the sweep could be planned ({skipped[0]['target']}: "
                         f"{skipped[0]['error']})")
    out = Path(args.out)
    doc = {"schema": "rankcut.sweep", "version": 1, "model": args.model, "data": args.data,
           "dense": dense, "points": points, **({"skipped": skipped} if skipped else {})}
    if timer:
        doc["latency"] = timer.setting
    speed = " speed-up (measured) |" if timer else ""
    lines = [f"# Sweep: {args.model} on {args.data} ({dense['n']} test examples)", "",
             f"Dense top-1: {dense['top1']:.2f}%", "",
             f"| method | target | params (x fewer) | MACs (x fewer) | top-1 % |{speed}",
             "|---|---|---:|---:|---:|" + ("---:|" if timer else "")]
    lines += [f"| {p['method']} | {p['target']} | {p['params_ratio']:.2f} | "
              f"{p['macs_ratio']:.2f} | {p['top1']:.2f} |"
              + (f" {p['speedup']:.2f} |" if timer else "") for p in points]
    if timer:
        lines += ["", f"Speed-up: dense time / compressed time, both fused, {timer.describe()}."]
    lines += ["", "No plan:", ""] + [f"- {p['method']} {p['target']}: {p['error']}"
                                      for p in skipped] if skipped else []
    files = ["sweep.json", "sweep.md", "sweep.png"]
    with atomic_folder(out) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(doc, indent=2))
        (tmp / "sweep.md").write_text("\n".join(lines) + "\n")
        R.plot_sweep([{**p, "ratio": p["macs_ratio"]} for p in points], tmp / "sweep.png",
                     baseline=dense["top1"], title=f"{args.model} on {args.data}")
        if timer:
            R.plot_sweep([{**p, "ratio": p["speedup"]} for p in points],
                         tmp / "sweep_latency.png", baseline=dense["top1"],
                         dense_point=(1.0, dense["top1"]),
                         xlabel=f"speed-up (dense / compressed time, {timer.describe()})",
                         title=f"{args.model} on {args.data}: accuracy against measured time")
            files.append("sweep_latency.png")
    _say(f"wrote {out}/: {', '.join(files)}")
    return 0


class _SpeedUp:
    """Times compressed models against the dense one on this machine: both fused (the faster
    memory format of each), interleaved, median of 20 runs, at one batch."""

    def __init__(self, model, x, batch: int, engine: str = "eager"):
        import torch

        from ._modes import model_device
        from .fuse import fuse
        from .profile import with_batch

        self.x = with_batch(x, batch)
        self.dense = fuse(model, self.x, memory_format="auto")
        self.engine = engine  # what the plans were made for (--latency-engine)
        self.setting = {"batch": batch, "threads": torch.get_num_threads(),
                        "device": str(model_device(model)) if engine == "eager"
                        else "cpu (onnxruntime)"}

    def describe(self) -> str:
        s = self.setting
        return f"batch {s['batch']}, {s['threads']} threads, {s['device']}"

    def __call__(self, small) -> dict:
        from ._modes import model_device
        from .fuse import fuse
        from .profile import compare_latency

        small = fuse(small.to(model_device(self.dense)), self.x,
                     memory_format="auto")
        d, c = compare_latency(self.dense, small, self.x, repeats=20, engine=self.engine)
        return {"speedup": d.median_ms / c.median_ms, "latency_ms": c.median_ms,
                "dense_latency_ms": d.median_ms}


def cmd_analyze(args) -> int:
    from . import report as R

    ctx, model, x = _start(args)
    calib = ctx.calib_data(args.calib)
    from .atomic import atomic_folder

    model, x = model.to(ctx.device), x.to(ctx.device)
    result = R.analyze(model, x, rank_rules=tuple(args.rules), calib_data=calib,
                       max_batches=None)  # (--calib says how many examples: all are used)
    out = Path(args.out)
    with atomic_folder(out) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2))
        (tmp / "analysis.md").write_text(result.to_markdown())
        plots = result.write_plots(tmp) if hasattr(result, "write_plots") else []
    _say(result.to_markdown())
    _say(f"wrote {out}/: analysis.json, analysis.md"
         + "".join(f", {Path(p).name}" for p in plots))
    return 0


def cmd_demo(args) -> int:
    from . import demo

    ctx = _Context(args)
    demo.run(args.out, seed=args.seed, progress=ctx.progress, device=ctx.device)
    return 0


COMMANDS = {"analyze": cmd_analyze, "compress": cmd_compress, "evaluate": cmd_evaluate,
            "benchmark": cmd_benchmark, "export": cmd_export, "sweep": cmd_sweep,
            "transfer": cmd_transfer, "demo": cmd_demo}


# the flags that name a file or folder
PATH_DESTS = ("weights", "data_dir", "compressed", "plan", "out", "output", "checkpoint_dir",
              "teacher_cache", "latency_table", "config")
# the flags that take a list (nargs="+" without "extend"): each given once
LIST_FLAGS = ("--exclude", "--rules", "--batches", "--targets", "--methods")


def _expand_paths(args: argparse.Namespace) -> None:
    """A leading "~" of a path flag is the home folder, as a shell would read it, in the checks
    and the work alike (a config file's values, and --flag=~/x, reach rankcut unexpanded)."""
    for dest in PATH_DESTS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, dest, os.path.expanduser(value))


def _command_line(args) -> str:
    """The command as a shell would take it again: "rankcut compress --model ..."."""
    import shlex

    return shlex.join(["rankcut", *map(str, args.argv)])


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"rankcut: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    # a warning is one line too (--debug shows where it came from); restored on return, so a
    # caller of main() keeps its own warning display
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _one_line_warning
        return _run(parser, argv, debug)


def _failed(err: BaseException, code: int, more: str = "") -> int:
    """An error that is not a usage error: one line naming its type; ``code``."""
    first = _one_line(err) or type(err).__name__
    print(f"rankcut: error: {type(err).__name__}: {first} (--debug shows the traceback{more})",
          file=sys.stderr)
    return code


def _run(parser: argparse.ArgumentParser, argv: list[str], debug: bool) -> int:
    try:
        args = _with_config(parser, argv)
        _expand_paths(args)
        args.argv = list(argv)  # what the records' "command" says (main(argv) need not be sys.argv)
        _check_args(args)
        return COMMANDS[args.command](args)
    except (UserError, ValueError, OSError) as err:  # OSError: a file missing, not writable...
        if debug:
            raise
        text = _one_line(err) or type(err).__name__
        print(f"rankcut: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    # e.g. inputs of the wrong shape (a model's own assert too), a loss gone non-finite, an
    # optional package missing
    except (RuntimeError, ArithmeticError, ImportError, AssertionError) as err:
        if debug:
            raise
        return _failed(err, EXIT_USAGE)
    except Exception as err:  # in the user's code (a model's), or rankcut's
        if debug:
            raise
        return _failed(err, EXIT_ERROR, "; unless it comes from your model's code, please "
                                        "report it")
    except KeyboardInterrupt:
        print("rankcut: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
