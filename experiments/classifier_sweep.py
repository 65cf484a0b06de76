"""Seed 001's experiment: top-1 against the compression ratio (CR) of a model's classifier, with
no fine-tuning, for truncated SVD, data-aware SVD and the CUR family; resumable, one point at a
time. It reads a reproduce.py config (experiments/configs/) and its ``sweep:`` section:

    .venv/bin/python experiments/classifier_sweep.py experiments/configs/seed001_vgg11.yaml
        [--only RUN ...] [--runs-dir runs] [--threads N] [--device cpu|cuda] [--summary]
        [--no-finetune] [--series LABEL[/MODE] ...]

``sweep.models`` names runs of the config whose model, data, weights (trained from scratch by
the run's ``train:`` recipe when the file is missing, as reproduce.py does), normalisation and
calibration size the sweep uses; ``--only`` picks some of them. For each, the inputs of
``sweep.part`` (a submodule holding the Linear layers, "classifier") are computed once on the
test split and on the calibration images, so each point plans, factorizes and evaluates the part
alone. A point is a method (``sweep.methods``: a label -> {method, data, options, seeds, modes}),
a ratio and a mode:

- ``rule``: every Linear of the part at the rank rule ``params=CRx`` (seed 001's per-layer CR);
- ``target``: the plan's ``params=CRx`` target over the part (a global budget: the planner gives
  each layer the rank that hurts least).

Each point's top-1, the part's realised parameters and CR, the whole model's CR and the seconds
it took (plan + apply) go to ``runs/<config>/sweep/<run>.jsonl`` as they finish; a rerun skips
the points done, and refuses to mix them with points of other settings. Then ``<run>.md`` (the
seed's table: the largest CR within 0.1 and 0.5 point of the dense top-1, every smaller CR within
it too, per method and mode, sampled methods as the mean over seeds) and ``<run>.png``
(top-1 and parameters against CR).

With a ``sweep.finetune:`` section, each of its series (a method and mode; sampled methods at
their first seed) is then fine-tuned by distillation from the dense part, ``epochs`` epochs on
the part's inputs over the training images (without augmentation; the convolutions are frozen,
so their outputs are computed once and kept in float16): first at the largest CR the series
keeps within ``tolerance`` of the dense top-1 without fine-tuning, then at each larger CR of
``ratios`` until one loses more than ``tolerance`` after fine-tuning. Its points go to
``<run>-finetuned.jsonl`` (resumable the same way) and its table below the sweep's.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import rankcut as rc
from rankcut import data as D
from rankcut.atomic import atomic_path
from rankcut.calibrate import input_at
from rankcut.models import create, pretrained_path
from rankcut.profile import count_params
from rankcut.select import TargetUnreachable
from rankcut.train import evaluate, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (
    COMMIT,
    MOMENT_LIMIT,
    check,
    command_line,
    datasets,
    settings_of,
    trained_weights,
)

# The sweep: section's keys and defaults.
SWEEP = {
    "models": None,          # runs of the config whose model and data the sweep uses (required)
    "part": "classifier",    # the submodule whose Linear layers are compressed
    "exclude": [],           # Linear layers of the part left dense (names within the part)
    "ratios": [2, 5, 10, 30, 100, 150, 225, 300],
    "modes": ["rule", "target"],
    "methods": {"svd": {"method": "svd"}},
    "finetune": None,        # the fine-tuned stage (FINETUNE), none by default
    # a series stops after this many CRs in a row whose mean top-1 is at chance (within a
    # point of the most frequent test class's share: the model answers one class); its larger
    # CRs would only repeat it (null: every CR is swept)
    "chance_stop": 2,
}
# The finetune: section's keys and defaults. series: "label" (each mode the method sweeps) or
# "label/mode"; default every series swept. ratios: the CRs walked after the first (default the
# sweep's). lr, batch_size: rankcut.train.finetune's (SGD with momentum, cosine to zero).
# train_limit: the first N training images only (quick trials; None: all).
FINETUNE = {"series": None, "tolerance": 0.5, "ratios": None, "epochs": 1, "lr": 0.01,
            "batch_size": 128, "train_limit": None}
# One method's keys and defaults: data = data-aware (fitted in the output norm on the part's
# inputs from the calibration images); options = rankcut solver options (a CUR variant:
# {solver: leverage | linear_time | cx | deim}); seeds = the seeds of a sampling method.
METHOD = {"method": "svd", "data": False, "options": {}, "seeds": [0], "modes": None}
# A method within this many points of the dense top-1 counts as keeping the accuracy.
TOLERANCES = (0.1, 0.5)

# A fine-tuning whose loss goes non-finite at the recipe's lr is tried again at this fraction of
# it (RX fitted on data diverged at lr 0.01 at classifier CR 343.5 on MNIST and 591 on CIFAR-10)
RETRY_LR = 0.1


def _list_of(value, ok) -> bool:
    return isinstance(value, list) and bool(value) and all(ok(v) for v in value)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def sweep_settings(config: dict) -> dict:
    """The ``sweep:`` section with defaults filled in and every key checked (SystemExit with
    the bad key, before any work)."""
    raw = config.get("sweep")
    if not isinstance(raw, dict):
        raise SystemExit("config: no 'sweep:' mapping")
    unknown = sorted(set(raw) - set(SWEEP))
    if unknown:
        raise SystemExit(f"sweep: unknown keys {unknown}; known: {', '.join(SWEEP)}")
    s = {**SWEEP, **raw}
    runs = config.get("runs") or {}
    if not _list_of(s["models"], lambda m: isinstance(m, str) and m in runs):
        raise SystemExit(f"sweep.models: expected a list of runs of this config, got "
                         f"{s['models']!r}")
    if not isinstance(s["part"], str) or not s["part"]:
        raise SystemExit(f"sweep.part: expected a submodule name, got {s['part']!r}")
    if not isinstance(s["exclude"], list) or not all(isinstance(n, str) for n in s["exclude"]):
        raise SystemExit(f"sweep.exclude: expected a list of layer names within the part, got "
                         f"{s['exclude']!r}")
    if not _list_of(s["ratios"], lambda r: _number(r) and 1 < r < float("inf")) or (
            s["ratios"] != sorted(set(s["ratios"]))):
        # (increasing: a series stops at the first CRs at chance; each once: a point per CR)
        raise SystemExit(f"sweep.ratios: expected an increasing list of numbers > 1, each "
                         f"once, got {s['ratios']!r}")
    if s["chance_stop"] is not None and (isinstance(s["chance_stop"], bool) or not isinstance(
            s["chance_stop"], int) or s["chance_stop"] < 1):
        raise SystemExit(f"sweep.chance_stop: expected an int >= 1 or null, got "
                         f"{s['chance_stop']!r}")
    if not isinstance(s["methods"], dict) or not s["methods"]:
        raise SystemExit(f"sweep.methods: expected a mapping of labels to methods, got "
                         f"{s['methods']!r}")
    methods = {}
    for label, m in s["methods"].items():
        where = f"sweep.methods.{label}"
        if m is not None and not isinstance(m, dict):
            raise SystemExit(f"{where}: expected a mapping, got {m!r}")
        bad = sorted(set(m or {}) - set(METHOD))
        if bad:
            raise SystemExit(f"{where}: unknown keys {bad}; known: {', '.join(METHOD)}")
        m = {**METHOD, **(m or {})}
        if m["modes"] is None:
            m["modes"] = s["modes"]
        if not _list_of(m["modes"], lambda v: v in ("rule", "target")) or len(
                set(m["modes"])) != len(m["modes"]):
            raise SystemExit(f"{where}.modes: expected a list of rule and/or target, each "
                             f"once, got {m['modes']!r}")
        if not _list_of(m["seeds"], lambda v: isinstance(v, int) and not isinstance(v, bool)) \
                or len(set(m["seeds"])) != len(m["seeds"]):
            raise SystemExit(f"{where}.seeds: expected a list of ints, each once, got "
                             f"{m['seeds']!r}")
        if not isinstance(m["data"], bool):
            raise SystemExit(f"{where}.data: expected true or false, got {m['data']!r}")
        if not isinstance(m["options"], dict):
            raise SystemExit(f"{where}.options: expected a mapping, got {m['options']!r}")
        try:
            method = rc.methods.resolve(m["method"])[0]
            method.check_options(m["options"])
        except (ValueError, TypeError) as err:
            raise SystemExit(f"{where}: {err}") from None
        if method.linear is None:
            raise SystemExit(f"{where}: method {m['method']!r} does not factorize Linear layers")
        if m["data"] and not method.data_aware:
            raise SystemExit(f"{where}: method {m['method']!r} has no data-aware form")
        methods[label] = m
    s["methods"] = methods
    if s["finetune"] is not None:
        s["finetune"] = finetune_settings(s["finetune"], methods, s["ratios"])
    return s


def every_series(methods: dict) -> list[tuple[str, str]]:
    """Every (label, mode) of ``sweep.methods``, in the config's order."""
    return [(label, mode) for label, m in methods.items() for mode in m["modes"]]


def pick_series(names: list[str], methods: dict, where: str) -> list[tuple[str, str]]:
    """The (label, mode) series that ``names`` (labels, or label/mode) name, in their order."""
    every, series = every_series(methods), []
    for name in names:
        label, _, mode = name.partition("/")
        found = [(lb, md) for lb, md in every if lb == label and mode in ("", md)]
        if not found:
            raise SystemExit(f"{where}: {name!r} is not a swept series (label or label/mode "
                             f"of: {', '.join(f'{lb}/{md}' for lb, md in every)})")
        series += [sm for sm in found if sm not in series]
    return series


def finetune_settings(raw, methods: dict, ratios: list) -> dict:
    """``sweep.finetune`` with defaults filled in and checked; its series as (label, mode)."""
    if not isinstance(raw, dict):
        raise SystemExit(f"sweep.finetune: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(FINETUNE))
    if unknown:
        raise SystemExit(f"sweep.finetune: unknown keys {unknown}; known: {', '.join(FINETUNE)}")
    f = {**FINETUNE, **raw}
    if f["series"] is None:
        series = every_series(methods)
    elif _list_of(f["series"], lambda v: isinstance(v, str)):
        series = pick_series(f["series"], methods, "sweep.finetune.series")
    else:
        raise SystemExit(f"sweep.finetune.series: expected a list of labels, got "
                         f"{f['series']!r}")
    f["series"] = series
    if f["ratios"] is None:
        f["ratios"] = list(ratios)
    if not _list_of(f["ratios"], lambda r: _number(r) and 1 < r < float("inf")):
        raise SystemExit(f"sweep.finetune.ratios: expected a list of numbers > 1, got "
                         f"{f['ratios']!r}")
    checks = {"tolerance": lambda v: _number(v) and v >= 0,
              "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "lr": lambda v: _number(v) and 0 < v < float("inf"),
              "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "train_limit": lambda v: v is None or (isinstance(v, int)
                                                     and not isinstance(v, bool) and v > 0)}
    for key, ok in checks.items():
        if not ok(f[key]):
            raise SystemExit(f"sweep.finetune.{key}: out of range: {f[key]!r}")
    if f["train_limit"] is not None and f["train_limit"] < f["batch_size"]:
        raise SystemExit(f"sweep.finetune.train_limit: {f['train_limit']} images make no "
                         f"batch of {f['batch_size']} (batch_size)")
    return f


@torch.no_grad()
def part_inputs(model: torch.nn.Module, part: str, batches, device: str, dtype=None):
    """(inputs of ``model.<part>``, labels) over ``batches`` of (images, labels), on the CPU
    (in ``dtype``, default as computed); each pass stops at the part
    (``rankcut.calibrate.input_at``)."""
    module = model.get_submodule(part)
    seen, labels = [], []
    for x, y in batches:
        seen.append(input_at(model, module, x.to(device)).to("cpu", dtype))
        labels.append(y)
    return _joined(seen), torch.cat(labels)


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of ``chunks``, each freed as it is copied (the peak is one copy plus a chunk,
    not two copies: 60,000 x 25,088 float16 inputs are 3 GB)."""
    out = torch.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]),
                      dtype=chunks[0].dtype)
    at = 0
    while chunks:
        c = chunks.pop(0)
        out[at:at + len(c)] = c
        at += len(c)
    return out


def _batches(dataset, size: int = 256):
    loader = torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)
    yield from loader


def compressed(part, x, method: dict, ratio, mode: str, seed: int, calib, cache=None,
               exclude=()):
    """(``part`` planned and factorized for one point, its plan, seconds taken); the layers
    named in ``exclude`` stay dense."""
    options = dict(method["options"])
    if method["method"] == "cur":
        options["seed"] = seed
    start = time.perf_counter()
    plan = rc.plan(part, x, method=method["method"],
                   rank=f"params={ratio}x" if mode == "rule" else None,
                   target=f"params={ratio}x" if mode == "target" else None,
                   calib_data=calib if method["data"] else None, min_params=0,
                   exclude=list(exclude) or None,
                   options={method["method"]: options} if options else None, allow_slower=True,
                   cache=cache)
    small = rc.apply(part, plan, calib_data=calib if method["data"] else None).eval()
    return small, plan, time.perf_counter() - start


def point(part, x, method: dict, ratio, mode: str, seed: int, calib, test, cache=None,
          exclude=()) -> dict:
    """Plan and factorize ``part`` for one point; its top-1 on ``test`` (inputs, labels)."""
    small, plan, seconds = compressed(part, x, method, ratio, mode, seed, calib, cache, exclude)
    return {"top1": evaluate(small, test)["top1"], "params": count_params(small),
            "ranks": {n: list(lp.ranks) for n, lp in plan.active.items()},
            "seconds": round(seconds, 2), "commit": COMMIT}  # (the code that measured it)


def _fit(method: dict) -> dict:
    """What of a method's settings its points depend on (more seeds, ratios or modes add
    points; other options make other points)."""
    return {k: method[k] for k in ("method", "data", "options")}


def check_part(model: torch.nn.Module, name: str, part: str, exclude=()) -> None:
    """Refuse a ``part`` that is not a submodule holding Linear layers, or an ``exclude`` that
    names none of them (before any training)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        found = model.get_submodule(part)
    except AttributeError:
        found = None
    if found is None or not any(isinstance(m, torch.nn.Linear) for m in found.modules()):
        raise SystemExit(f"sweep.part: {name} has no submodule {part!r} holding Linear layers; "
                         f"its Linear layers: {', '.join(linears) or 'none'}")
    inner = [n for n, m in found.named_modules() if isinstance(m, torch.nn.Linear)]
    stray = [n for n in exclude if n not in inner]
    if stray:
        raise SystemExit(f"sweep.exclude: {name}.{part} has no Linear layer {stray}; its Linear "
                         f"layers: {', '.join(inner) or '(the part itself)'}")


def settings_head(s: dict, sw: dict, device: str) -> dict:
    """What a model's points depend on that its settings alone say (the rest of a points
    file's header is measured: dense top-1, parameter counts, images read)."""
    return {"part": sw["part"], "exclude": sw["exclude"], "model": s["model"], "data": s["data"],
            # which calibration images, how the inputs are made, which weights
            "seed": s["seed"], "normalization": s["normalization"],
            "image_size": s["image_size"], "weights": str(s["weights"]),
            "test_limit": s["test_limit"],
            # (float rounding on another device can move the pivots and ranks near a cut-off)
            "device": device}


def finetune_head(sw: dict, device: str) -> dict:
    """What a ``<run>-finetuned.jsonl`` file's points depend on beyond its sweep's header: the
    fine-tuned stage's settings (and the device: float16 autocast on CUDA) and the retry's lr
    (a key of its own: files from before retries compare equal on the rest)."""
    ft = sw["finetune"]
    setting = {k: ft[k] for k in ("epochs", "lr", "batch_size", "train_limit", "tolerance",
                                  "ratios")} | {"device": device}
    return {"finetune": setting, "retry_lr": RETRY_LR}


def check_points_file(path: Path, s: dict, sw: dict, device: str,
                      finetuned: bool = False) -> None:
    """Refuse, before any model is trained or swept, a points file (``finetuned``: its
    fine-tuned stage's, :func:`finetune_model`'s) made with other settings (what
    :func:`sweep_model` or :func:`finetune_model` would find only when it reached that model,
    hours into a config)."""
    if not path.is_file():
        return
    old, points = read_points(path)
    now = {**settings_head(s, sw, device), **(finetune_head(sw, device) if finetuned else {})}
    changed = sorted(k for k in now if k in old and old[k] != json.loads(json.dumps(now[k])))
    changed += sorted({p["label"] for p in points if p["label"] in sw["methods"]  # a refit
                       and p["fit"] != _fit(sw["methods"][p["label"]])})
    if "calib" in old and old["calib"] > s["calib"]:  # (fewer images than asked: the data's)
        changed.append("calib")
    if changed:
        raise SystemExit(f"{path}: its points were made with other settings ({changed} "
                         f"differ); move it away to {'tune' if finetuned else 'sweep'} afresh")


def sweep_model(config: dict, name: str, sw: dict, base: Path, root: Path,
                device: str, series: list[tuple[str, str]] | None = None) -> dict:
    """Every point of run ``name``'s model not in its .jsonl yet (of ``series``, (label, mode)
    pairs in the order to sweep them; default all); returns what the fine-tuned stage needs
    (the model, its part, inputs and the sweep's points)."""
    s = settings_of(config, name)
    path = base / f"{name}.jsonl"
    old, points = read_points(path) if path.is_file() else (None, [])
    # where an earlier run found a series' target below its smallest plan: it ends there
    ended: dict[tuple, float] = {}
    for p in points:
        if "unreachable" in p:
            at = (p["label"], p["mode"], p["seed"])
            ended[at] = min(p["ratio"], ended.get(at, p["ratio"]))
    refit = sorted({p["label"] for p in points if p["label"] in sw["methods"]
                    and p["fit"] != _fit(sw["methods"][p["label"]])})
    if refit:  # known before any data is read
        raise SystemExit(f"{path}: its points were made with other settings ({refit} differ); "
                         "move it away to sweep afresh")
    trained = trained_weights(s, root, device) if s["train"] else None
    weights = (pretrained_path(s["model"], root) if s["weights"] == "pretrained"
               else Path(s["weights"]))
    model = create(s["model"], weights=weights, num_classes=s["num_classes"]).eval().to(device)
    _, plain, test = datasets(s, root)
    calib_batches = D.calibration(plain, n=s["calib"], seed=s["seed"])
    test_x, test_y = part_inputs(model, sw["part"], _batches(test), device)
    calib_x, calib_y = part_inputs(model, sw["part"], calib_batches, device)
    calib = [(calib_x.to(device), calib_y.to(device))]
    part = model.get_submodule(sw["part"])
    if isinstance(part, torch.nn.Linear):  # rankcut replaces layers inside a module
        part = torch.nn.Sequential(part)
    dense_top1 = evaluate(part, (test_x, test_y))["top1"]
    part_params, total = count_params(part), count_params(model)
    # what the points depend on besides their own method: a rerun with other settings must not
    # mix its points with these
    head = {"dense_top1": dense_top1, "part_params": part_params, "total_params": total,
            **settings_head(s, sw, device), "test_images": len(test_y), "calib": len(calib_y),
            "trained_weights": trained}
    base.mkdir(parents=True, exist_ok=True)
    done = set()
    if old is not None:
        # (a setting a file predates is not compared)
        changed = sorted(k for k in head if k in old and old[k] != head[k])
        if changed:
            raise SystemExit(f"{path}: its points were made with other settings ({changed} "
                             "differ); move it away to sweep afresh")
        done = {(p["label"], p["mode"], p["ratio"], p["seed"]) for p in points}
    else:
        with atomic_path(path) as tmp:  # a kill mid-write leaves no headless file
            tmp.write_text(json.dumps({**head, "threads": torch.get_num_threads(),
                                       "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"[{name}] {s['model']} on {s['data']}: {sw['part']} {part_params:,} of {total:,} "
          f"params, top-1 {dense_top1:.2f}% on {len(test_y)} test images; "
          f"{len(done)} point(s) done earlier", flush=True)
    x = test_x[:1].to(device)
    # the top-1 of a model that answers one class: at most the most frequent class's share
    chance = 100.0 * float(torch.bincount(test_y).max()) / len(test_y)
    cache_label = cache = None
    for label, mode in series or every_series(sw["methods"]):
        method = sw["methods"][label]
        # plans of one method to targets share its moments and candidates (one entry: a
        # 25,088-wide layer's moment is 5 GB); the candidates also on this machine's disk, so
        # a sweep resumed by a new process does not score them again (12 min for CUR of a
        # 4096 x 25,088 layer)
        if label != cache_label:  # one method's at a time, the last one's (GBs) dropped first
            cache_label, cache = label, None
            # CUR's sequential apply measures the moment again and fits W's own entries beside
            # it: with the plan's 5 GB kept too, a VGG-11 point peaked at 20 GB on a 24 GB
            # machine, so its moments are not kept (each point measures them, about a minute)
            cache = rc.select.CandidateCache.cached(
                max_entries=1, max_moment_bytes=(
                    MOMENT_LIMIT if rc.methods.resolve(method["method"])[0].keeps_entries
                    else None))
        # ratio by ratio, every seed of each (a time-boxed run leaves whole ratios behind)
        streak = 0  # CRs in a row at chance (counted again from the points on a resumed run)
        for ratio in sw["ratios"]:
            if sw["chance_stop"] is not None and streak >= sw["chance_stop"]:
                print(f"[{name}] {label:>16} {mode:>6}: top-1 at chance ({chance:.2f}%) at "
                      f"{streak} CRs in a row; the series stops before CR {ratio}", flush=True)
                break
            for seed in method["seeds"]:
                if ratio >= ended.get((label, mode, seed), math.inf):
                    continue
                if (label, mode, ratio, seed) in done:
                    continue
                try:
                    p = point(part, x, method, ratio, mode, seed, calib, (test_x, test_y),
                              cache if mode == "target" else None, sw["exclude"])
                except ValueError as err:
                    unreachable(path, name, label, method, mode, ratio, seed, err)
                    ended[(label, mode, seed)] = ratio
                    continue
                p.update(label=label, fit=_fit(method), mode=mode, ratio=ratio, seed=seed,
                         **ratios(head, p["params"]))
                with path.open("a") as f:
                    f.write(json.dumps(p) + "\n")
                points.append(p)
                print(f"[{name}] {label:>16} {mode:>6} CR {ratio:>5}: "
                      f"{p['part_ratio']:7.1f}x, top-1 {p['top1']:6.2f}%, "
                      f"{p['seconds']:.1f} s", flush=True)
            tops = [p["top1"] for p in points if "unreachable" not in p and
                    (p["label"], p["mode"], p["ratio"]) == (label, mode, ratio)]
            streak = streak + 1 if tops and statistics.fmean(tops) <= chance + 1 else 0
    return {"name": name, "model": model, "part": part, "x": x, "calib": calib,
            "test": (test_x, test_y), "plain": plain, "head": head,
            "points": [p for p in points if "unreachable" not in p],
            "device": device}


def ratios(head: dict, params: int) -> dict:
    """The realised CRs of a part compressed to ``params``: of the part, and of the whole model."""
    part, total = head["part_params"], head["total_params"]
    return {"part_ratio": part / params, "whole_ratio": total / (total - part + params)}


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def finetune_model(run: dict, sw: dict, base: Path,
                   only: list[tuple[str, str]] | None = None) -> Path:
    """The fine-tuned stage of a swept run (``sweep_model``'s return): each series of
    ``sw["finetune"]`` (those in ``only``, when given) from the largest CR it keeps within the
    tolerance up, one point at a time, until a fine-tuned point loses more; returns
    ``<run>-finetuned.jsonl``."""
    ft, name, head = sw["finetune"], run["name"], run["head"]
    path = base / f"{name}-finetuned.jsonl"
    ft_head = {**head, **finetune_head(sw, run["device"])}
    old, tuned = read_points(path) if path.is_file() else (None, [])
    if old is not None:
        changed = sorted(k for k in ft_head if k in old and old[k] != ft_head[k])
        refit = sorted({p["label"] for p in tuned if p["label"] in sw["methods"]
                        and p["fit"] != _fit(sw["methods"][p["label"]])})
        if changed or refit:
            raise SystemExit(f"{path}: its points were made with other settings "
                             f"({changed + refit} differ); move it away to tune afresh")
    else:
        base.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**ft_head, "date": time.strftime("%Y-%m-%d")}) + "\n")
    done = {_key(p): p for p in tuned}
    dense, tol = head["dense_top1"], ft["tolerance"]
    swept = grouped(run["points"])
    train = None
    for label, mode in ft["series"]:
        if only is not None and (label, mode) not in only:
            continue
        method = sw["methods"][label]
        seed = method["seeds"][0]
        ok = kept([(r, [p for p in ps if p["seed"] == seed])
                   for r, ps in swept.get((label, mode), [])], dense, tol)
        # none kept: from the smallest CR (the row says so)
        start = ok[-1][0] if ok else min(ft["ratios"])
        began = {p["ratio"] for p in tuned if p.get("start") and "unreachable" not in p
                 and (p["label"], p["mode"], p["seed"]) == (label, mode, seed)}
        if began and began != {start}:  # the sweep's points changed since the walk began
            raise SystemExit(f"{path}: the walk of {label} {mode} began at CR "
                             f"{min(began)}, the points without fine-tuning now keep CR "
                             f"{start} (sweep.ratios edited?); move the file away to walk "
                             "afresh")
        # the candidates only: a 25,088-wide layer's 5 GB moment is not held beside the training
        # inputs (3 GB) through the fine-tuning; each plan measures it again (about a minute)
        cache = (rc.select.CandidateCache.cached(max_entries=1, max_moment_bytes=MOMENT_LIMIT)
                 if mode == "target" else None)
        for ratio in sorted({start, *(r for r in ft["ratios"] if r > start)}):
            p = done.get((label, mode, ratio, seed))
            if p is not None and "diverged" in p and "lr" not in p:
                # diverged before a retry at a lower rate was tried (code before it): tuned
                # again, its line replaced
                p = None
                _drop(path, (label, mode, ratio, seed))
            if p is not None and "unreachable" in p:  # recorded by an earlier run
                break
            if p is None:
                if train is None:  # the frozen convolutions' outputs, computed once
                    images = run["plain"]
                    if ft["train_limit"] is not None:
                        images = torch.utils.data.Subset(
                            images, range(min(ft["train_limit"], len(images))))
                    print(f"[{name}] the {sw['part']} inputs of {len(images)} training "
                          "images (float16)", flush=True)
                    train = part_inputs(run["model"], sw["part"], _batches(images),
                                        run["device"], dtype=torch.float16)
                try:
                    p = tuned_point(run, method, ratio, mode, seed, train, ft,
                                    base / "teacher-outputs", cache)
                except ValueError as err:
                    unreachable(path, name, label, method, mode, ratio, seed, err)
                    break
                p.update(label=label, fit=_fit(method), mode=mode, ratio=ratio, seed=seed,
                         start=ratio == start, kept_before=bool(ok), **ratios(head, p["params"]))
                with path.open("a") as f:
                    f.write(json.dumps(p) + "\n")
                print(f"[{name}] {label:>16} {mode:>6} CR {ratio:>5} fine-tuned: "
                      f"{p['part_ratio']:7.1f}x, top-1 {p['top1_before']:6.2f}% -> "
                      f"{p['top1']:6.2f}%, {p['seconds']:.1f} s"
                      + (f" (diverged: {p['diverged']})" if "diverged" in p else ""),
                      flush=True)
            if lost(p["top1"], dense, tol) or "diverged" in p:
                break
    return path


def _key(p: dict) -> tuple:
    return p["label"], p["mode"], p["ratio"], p["seed"]


def _drop(path: Path, key: tuple) -> None:
    """The points file ``path`` (header, then the points, read again: this run may have added
    some) rewritten without the point of ``key``."""
    head, rows = read_points(path)
    rows = [p for p in rows if "unreachable" in p or _key(p) != key]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [head, *rows]))


def unreachable(path: Path, name: str, label: str, method: dict, mode: str, ratio, seed: int,
                err: ValueError) -> None:
    """Record in ``path`` that a series' target at ``ratio`` is below its smallest plan (every
    layer at rank 1): the series ends there, and a resumed run does not plan it again (minutes
    for a 25,088-wide layer). Any other error is raised."""
    if not isinstance(err, TargetUnreachable):
        raise err
    with path.open("a") as f:
        f.write(json.dumps({"label": label, "fit": _fit(method), "mode": mode, "ratio": ratio,
                            "seed": seed, "unreachable": str(err)}) + "\n")
    print(f"[{name}] {label:>16} {mode:>6} CR {ratio:>5}: {err}; the series stops here",
          flush=True)


def tuned_point(run: dict, method: dict, ratio, mode: str, seed: int, train, ft: dict,
                teacher_cache: Path, cache=None) -> dict:
    """One point compressed (``cache``: a target mode's candidates, shared by a series), then
    fine-tuned by distillation from the dense part on ``train`` (the part's inputs, labels);
    its top-1 before and after. A loss gone non-finite (``FloatingPointError``) at the
    recipe's lr is tried once more from the same compressed start at ``RETRY_LR`` times it
    (``retried``: the first try's lr and message; ``lr``: the rate of the result); diverged
    again, the point is measured as the fine-tuning left it, with ``diverged``: the message
    (the walk ends there)."""
    part = run["part"]
    small, plan, fit_s = compressed(part, run["x"], method, ratio, mode, seed, run["calib"],
                                    cache, run["head"]["exclude"])
    before = evaluate(small, run["test"])["top1"]
    start = time.perf_counter()
    out = {"top1_before": before}
    lr, diverged = ft["lr"], None
    for attempt in range(2):
        trained = copy.deepcopy(small) if attempt == 0 else small  # the start, kept for a retry
        try:
            finetune(trained, train, epochs=ft["epochs"], lr=lr, batch_size=ft["batch_size"],
                     teacher=part, transform=_as_float32, seed=seed, progress=False,
                     device=run["device"], teacher_cache=str(teacher_cache))
            diverged = None
        except FloatingPointError as err:  # the loss went non-finite
            diverged = str(err)
        if diverged is None or attempt == 1:
            break
        out["retried"] = {"lr": lr, "diverged": diverged}
        lr *= RETRY_LR
    trained.eval()
    out |= {"top1": evaluate(trained, run["test"])["top1"], "lr": lr,
            "params": count_params(trained),
            "ranks": {n: list(lp.ranks) for n, lp in plan.active.items()},
            "seconds": round(fit_s + time.perf_counter() - start, 2), "commit": COMMIT}
    return out | ({"diverged": diverged} if diverged else {})


def read_points(path: Path) -> tuple[dict, list[dict]]:
    """(the header, the points) of a .jsonl. A last line cut short by a kill mid-append is
    removed from the file (its point is computed again; the next append would otherwise run
    on from it); any other unreadable line is an error."""
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == 0 or i < len(lines) - 1:
                raise SystemExit(f"{path}: line {i + 1} is not JSON; move the file away to "
                                 "start afresh") from None
    if len(rows) < len(lines) or not text.endswith("\n"):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[0], rows[1:]


def grouped(points: list[dict]) -> dict:
    """{(label, mode): [(ratio, [points over seeds]), ...] by ratio}."""
    out: dict = {}
    for p in points:
        out.setdefault((p["label"], p["mode"]), {}).setdefault(p["ratio"], []).append(p)
    return {k: sorted(v.items()) for k, v in out.items()}


def _mean(points: list[dict], key: str) -> float:
    return statistics.fmean(p[key] for p in points)


def lost(top1: float, dense: float, tol: float) -> bool:
    """Whether ``top1`` loses more than ``tol`` points of ``dense`` (a loss of exactly ``tol``,
    99.33 from 99.43 at 0.1, is within it: compared with a margin for float rounding, in
    which 99.43 - 0.1 is 99.33000000000001)."""
    return dense - top1 > tol + 1e-9


def kept(by_ratio: list, dense: float, tol: float) -> list:
    """The (ratio, points) of ``by_ratio`` up to the first whose mean top-1 loses more than
    ``tol`` points of ``dense`` (a lucky seed past a failing ratio does not count)."""
    out = []
    for r, ps in by_ratio:
        if not ps or lost(_mean(ps, "top1"), dense, tol):
            break
        out.append((r, ps))
    return out


def table(head: dict, points: list[dict]) -> str:
    """The seed's table: per method and mode, the largest CR (of the part) whose mean top-1 is
    within each tolerance of the dense top-1, as every smaller CR's is (a lucky seed past a
    failing ratio does not count), with its top-1, parameters and whole-model CR."""
    dense = head["dense_top1"]
    cols = "".join(f" CR within {t} | top-1 % | {head['part']} params | whole x |"
                   for t in TOLERANCES)
    lines = [f"{head['model']} on {head['data']}: dense top-1 {dense:.2f}% "
             f"({head['test_images']} test images), {head['part']} "
             f"{head['part_params']:,} of {head['total_params']:,} parameters; over several "
             "seeds, top-1 is their mean ± their standard deviation (population)",
             "", f"| method | mode | seeds |{cols} seconds / point |",
             "|---|---|---:|" + "---:|" * (4 * len(TOLERANCES) + 1)]
    for (label, mode), by_ratio in grouped(points).items():
        counts = sorted({len(ps) for _, ps in by_ratio})  # seeds per ratio: "1-3" if uneven
        row = (f"| {label} | {mode} | "
               f"{'-'.join(map(str, dict.fromkeys((counts[0], counts[-1]))))} |")
        for tol in TOLERANCES:
            ok = kept(by_ratio, dense, tol)
            if ok:
                ps = ok[-1][1]
                spread = (f" ± {statistics.pstdev(p['top1'] for p in ps):.2f}"
                          if len(ps) > 1 else "")
                row += (f" {_mean(ps, 'part_ratio'):.1f} | {_mean(ps, 'top1'):.2f}{spread} | "
                        f"{_mean(ps, 'params'):,.0f} | {_mean(ps, 'whole_ratio'):.2f} |")
            else:
                row += " - | - | - | - |"
        seconds = statistics.fmean(p["seconds"] for _, ps in by_ratio for p in ps)
        lines.append(row + f" {seconds:.1f} |")
    return "\n".join(lines)


def finetuned_table(head: dict, tuned: list[dict], series=None) -> str:
    """Per fine-tuned series (method, mode, seed; only ``series``' (label, mode) pairs when
    given): its first point (the largest CR within the tolerance without fine-tuning) before
    and after, and the largest CR within the tolerance after fine-tuning (every CR walked
    before it within it too), and where the walk ended: the first CR that lost more after
    fine-tuning, or whose fine-tuning diverged ("-": every CR walked kept it). The tolerance is
    the one the walks stopped at (the file's)."""
    ft = head["finetune"]
    tol = ft["tolerance"]
    lines = [f"Fine-tuned: {ft['epochs']} epoch(s) of distillation from the dense "
             f"{head['part']} (lr {ft['lr']}, batch {ft['batch_size']}), the convolutions "
             f"frozen; within {tol} point of {head['dense_top1']:.2f}%", "",
             f"| method | mode | seed | first CR (kept without fine-tuning) | top-1 before -> "
             f"after | largest CR within {tol} after fine-tuning | top-1 % | {head['part']} "
             f"params | whole x | walk ended at (CR: before -> after) | seconds / point |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    walks: dict = {}
    for p in tuned:
        walks.setdefault((p["label"], p["mode"], p["seed"]), []).append(p)
    for (label, mode, seed), ps in walks.items():
        if series is not None and (label, mode) not in series:
            continue
        ps = sorted(ps, key=lambda p: p["ratio"])
        first = next((p for p in ps if p["start"]), ps[0])
        walked = [(p["ratio"], [p]) for p in ps if p["ratio"] >= first["ratio"]]
        end = next((p for _, (p,) in walked if "diverged" in p
                    or lost(p["top1"], head["dense_top1"], tol)), None)
        if end is not None:  # a diverged point counts as lost whatever its top-1
            walked = [(r, q) for r, q in walked if r < end["ratio"]]
        where = f"{first['part_ratio']:.1f}" + ("" if first["kept_before"] else " (none kept)")
        row = (f"| {label} | {mode} | {seed} | {where} | "
               f"{first['top1_before']:.2f} -> {_after(first)} |")
        ok = kept(walked, head["dense_top1"], tol)
        if ok:
            best = ok[-1][1][0]
            row += (f" {best['part_ratio']:.1f} | {_after(best)} | {best['params']:,} | "
                    f"{best['whole_ratio']:.2f} |")
        else:
            row += " - | - | - | - |"
        if end is None:
            row += " - |"
        else:
            row += (f" {end['part_ratio']:.1f}: {end['top1_before']:.2f} -> "
                    + ("diverged" if "diverged" in end else _after(end)) + " |")
        lines.append(row + f" {statistics.fmean(p['seconds'] for p in ps):.1f} |")
    if any("retried" in p for p in tuned):
        lines += ["", f"\\* tuned at lr {ft['lr'] * head.get('retry_lr', RETRY_LR):g}: at "
                  f"{ft['lr']} the loss went non-finite"]
    return "\n".join(lines)


def _after(p: dict) -> str:
    """A fine-tuned point's top-1, starred when it comes from the retry at a lower lr."""
    return f"{p['top1']:.2f}" + ("\\*" if "retried" in p else "")


def plot(head: dict, points: list[dict], path: Path, tuned: list[dict] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, size) = plt.subplots(1, 2, figsize=(14, 4.8))
    # one colour per method (its rule and target series and its fine-tuned points alike; up to
    # 10 methods, then tab20's), the mode by the line: rule solid, target dashed, tuned dotted
    labels = list(dict.fromkeys(label for label, _ in [*grouped(points), *grouped(list(tuned))]))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colour = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    for (label, mode), by_ratio in grouped(points).items():
        cr = [_mean(ps, "part_ratio") for _, ps in by_ratio]
        top = [_mean(ps, "top1") for _, ps in by_ratio]
        # (min-max; never below 0: a mean of equal values can land a rounding off them)
        low = [max(0.0, t - min(p["top1"] for p in ps))
               for t, (_, ps) in zip(top, by_ratio, strict=True)]
        high = [max(0.0, max(p["top1"] for p in ps) - t)
                for t, (_, ps) in zip(top, by_ratio, strict=True)]
        style = "-o" if mode == "rule" else "--s"
        acc.errorbar(cr, top, yerr=[low, high], fmt=style, ms=3, capsize=2,
                     color=colour[label], label=f"{label} ({mode})")
        size.plot(cr, [_mean(ps, "params") for _, ps in by_ratio], style, ms=3,
                  color=colour[label], label=f"{label} ({mode})")
    for (label, mode), by_ratio in grouped(list(tuned)).items():
        acc.plot([ps[0]["part_ratio"] for _, ps in by_ratio], [ps[0]["top1"] for _, ps in by_ratio],
                 "x:", ms=7, mew=1.5, color=colour[label], label=f"{label} ({mode}), fine-tuned")
    acc.axhline(head["dense_top1"], color="k", lw=0.8, ls=":", label="dense")
    for ax in (acc, size):
        ax.set_xscale("log")
        ax.set_xlabel(f"{head['part']} compression ratio (realised)")
        ax.grid(alpha=0.3)
    size.set_yscale("log")
    acc.set_ylabel("top-1 % (no fine-tuning unless marked)")
    size.set_ylabel(f"{head['part']} parameters")
    # beside the plots, not over the curves
    fig.legend(*acc.get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.suptitle(f"{head['model']} on {head['data']}: {head['part']} compressed, "
                 f"dense {head['dense_top1']:.2f}%")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _extra_flags(parser) -> None:
    parser.add_argument("--no-finetune", action="store_true",
                        help="the sweep's points only: leave the fine-tuned stage for a later run")
    parser.add_argument("--series", nargs="+", metavar="LABEL[/MODE]",
                        help="sweep only these series of sweep.methods, in this order (e.g. "
                             "rx-data/target svd-data/target); the fine-tuned stage then tunes "
                             "only those of its series among them")


def main() -> int:
    args, config_path, config = command_line(
        __doc__, "sweep only these of sweep.models",
        "write the tables and plots of the points done, and stop",
        extra=_extra_flags)
    sw = sweep_settings(config)
    series = (pick_series(args.series, sw["methods"], "--series") if args.series else None)
    names = args.only or sw["models"]
    missing = sorted(set(names) - set(sw["models"]))
    if missing:
        raise SystemExit(f"--only: {missing} are not in sweep.models ({sw['models']})")
    base = Path(args.runs_dir) / config_path.stem / "sweep"
    if not args.summary:
        for name in names:  # every model's settings and part, before any training
            s = settings_of(config, name)
            check(config, name, s)
            if s["calib"] < 1:  # (reproduce.py's runs may plan without data; a sweep does not)
                raise SystemExit(f"run {name!r}: calib: expected an int >= 1 for the sweep's "
                                 f"data-aware series, got {s['calib']}")
            check_part(create(s["model"], num_classes=s["num_classes"]), s["model"], sw["part"],
                       sw["exclude"])
            check_points_file(base / f"{name}.jsonl", s, sw, args.device)
            if sw["finetune"] is not None and not args.no_finetune:
                check_points_file(base / f"{name}-finetuned.jsonl", s, sw, args.device,
                                  finetuned=True)
        root = D.require_data_root()
        for name in names:
            # each layer's full SVD once for all its points (minutes for a 4096 x 25,088 one)
            # per classifier layer: its SVD, its singular values, its whitened Gram
            with rc.decompose.reuse_svds(max_entries=12):
                run = sweep_model(config, name, sw, base, root, args.device, series)
                if sw["finetune"] is not None and not args.no_finetune:
                    finetune_model(run, sw, base, series)
            del run  # its model and inputs (GBs for a 25,088-wide classifier)
    for name in names:
        path = base / f"{name}.jsonl"
        if not path.is_file():
            continue
        head, points = read_points(path)
        points = [p for p in points if "unreachable" not in p]  # a series' end, unplanned
        text = table(head, points)
        tuned_path = base / f"{name}-finetuned.jsonl"
        ft_head, tuned = read_points(tuned_path) if tuned_path.is_file() else ({}, [])
        tuned = [p for p in tuned if "unreachable" not in p]  # where a walk ended, unplanned
        if tuned and any(ft_head.get(k) != v for k, v in head.items()
                         if k not in ("device", "threads", "date") and k in ft_head):
            print(f"{tuned_path}: made on other sweep settings than {path}; left out")
            tuned = []
        if tuned:
            text += "\n\n" + finetuned_table(
                ft_head, tuned, sw["finetune"]["series"] if sw["finetune"] else None)
        print(text)
        (base / f"{name}.md").write_text(text + "\n")
        if points:
            print(f"wrote {plot(head, points, base / f'{name}.png', tuned)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
