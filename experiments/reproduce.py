"""Reproduce a founding document's result: compress, fine-tune on real data, measure; every run
resumable. One config file (YAML, under experiments/configs/) names the runs; one command runs
them in turn, each in its own folder, and picks up where a killed run stopped:

    .venv/bin/python experiments/reproduce.py experiments/configs/mtd_vgg11.yaml
        [--only NAME ...] [--runs-dir runs] [--threads N] [--device cpu|cuda]
        [--summary]                       # only print the table of the finished runs
        [--replace-exports]               # let an export: replace a model already there

A config is a mapping of settings shared by its runs plus ``runs:``, a mapping from run name to
the settings it changes (see ``SETTINGS`` for every key and its default; a mapping such as
``plan_options`` changes the keys it names); a ``sweep:`` section is
experiments/classifier_sweep.py's. Each run is one
``rankcut.compress`` call: plan (stored), apply (stored, before fine-tuning), fine-tune with
checkpoints every ``checkpoint_every`` steps, ``resume=True``; then top-1 on the test split
before and after fine-tuning, params and MACs against the dense model. Rerunning the command
skips finished runs (their ``result.json``) and resumes the others exactly (rankcut.compress's
checkpoints; see docs/compress.md; not with ``finetune_options: {num_workers: N}``, whose
workers' augmentation draws are not checkpointed: a run resumed mid-epoch then trains on
other crops and flips, docs/training.md). A run's ``export: results/NAME`` writes the
fine-tuned model there with ``rc.save`` (float16 weights when that keeps top-1 on the test
split within 0.1 point; ``rc.load(rankcut.models.create(MODEL), FOLDER)`` reads it back as
float32); a folder that already holds a saved model is refused before the first run starts
unless ``--replace-exports`` is given. A config's ``keep: results/runs/NAME`` copies each
finished run's result.json there as ``RUN.json`` (with its settings), to be committed: a run
folder is lost with the machine, and a run whose folder is gone but whose copy is kept counts
as finished.

Data and pretrained weights come from the shared data folder ($RANKCUT_DATA, else
../shared/data); nothing is downloaded. CIFAR-10's test split there is images 0..1016.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import platform
import shutil
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import rankcut as rc
from rankcut import data as D
from rankcut._modes import available_device
from rankcut._provenance import source_commit
from rankcut.atomic import atomic_folder, atomic_path
from rankcut.compress import FINETUNE_OPTIONS_TAKEN, PLAN_OPTIONS_TAKEN
from rankcut.io import save_plan
from rankcut.models import PRETRAINED, create, pretrained_path
from rankcut.profile import count_macs, count_params, speedups
from rankcut.train import check_finetune_options, evaluate, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import carry  # (experiments/carry.py: where unfinished runs are carried)

# Every key a config (or a run) may set, with its default.
SETTINGS = {
    "model": None,            # a rankcut.models name (required)
    "weights": "pretrained",  # "pretrained" (rankcut.models.PRETRAINED) or a file
    "train": None,            # a recipe (rankcut.train.finetune keyword arguments: epochs, lr,
                              # ...) that trains the model from scratch on `data` when the
                              # `weights` file is missing; resumable, then saved there
    "num_classes": None,      # outputs of a model built here (rankcut.models.create)
    "normalization": None,    # input statistics (rankcut.data.transforms); None: the model's
    "image_size": None,       # inputs resized to this side (MNIST's 28 to 32 for a VGG)
    "augment": "standard",    # the training split's augmentation (rankcut.data.transforms:
                              # "standard", "none", "shift")
    "data": "cifar10",
    "test_limit": None,       # measure on the first N test images only (quick trials; None: all)
    "calib": 1024,            # calibration images, drawn from the training split (eval transform)
    "method": "auto",
    "rank": None,
    "target": None,
    "schedule": "one_shot",
    "steps_per_layer": None,  # layerwise
    "sequential": None,       # rc.compress's default: on with calibration data
    "allow_slower": True,     # the latency guard is off: the targets here are params and MACs
    "plan_options": {},       # more rc.plan keyword arguments
    "epochs": None,
    "steps": None,
    "lr": None,               # None: rankcut's default (1e-3 for SGD on models with CP layers)
    "batch_size": 128,
    "distill": True,
    "teacher_cache": True,    # keep the teacher's outputs in RUNS/CONFIG/teacher-outputs/: runs
                              # on the same batches (same seed, data, batch size) skip its forward
    "finetune_options": {},   # more rankcut.train.finetune keyword arguments
    "checkpoint_every": 100,  # optimizer steps between checkpoints
    "seed": 0,
    "export": None,           # a results/ folder to save the fine-tuned model into
    "match_params": None,     # a finished run of this config: target its parameter count
    "start_from": None,       # a run of this config whose factorized model (checkpoints/start/)
                              # this one fine-tunes, instead of planning and fitting again; a
                              # run without fine-tuning takes that run's finished model/ as is
    "transfer": None,         # seed 000's transfer, {data, epochs, train_limit, test_limit,
                              # lr}: a new head trained on the frozen compressed backbone (and,
                              # once per config and data, on the dense one)
    "sensitivity": None,      # seed 000's ranks instead of `method`: {lam, trial_rank, form,
                              # options} for rankcut.select.sensitivity_plan over every eligible
                              # conv, to `target` (params=...)
    "latency": [1, 32],       # batches to time dense against compressed at, plain and fused
                              # (rankcut.profile.speedups, after fine-tuning); [] to skip
    "note": "",               # printed under the summary's table (as the run kept it)
}
# the settings that are whole numbers: (key, least value, whether null is allowed)
INTEGERS = [("test_limit", 1, True), ("calib", 0, False), ("steps_per_layer", 1, True),
            ("epochs", 1, True), ("steps", 1, True), ("batch_size", 1, False),
            ("checkpoint_every", 1, False), ("seed", 0, False), ("num_classes", 1, True),
            ("image_size", 1, True)]
# transfer's keys and their defaults ("data" has none: it must be given)
TRANSFER = {"data": None, "epochs": 2, "train_limit": 10000, "test_limit": None, "lr": 0.05}
RESULT = "result.json"
# a config's keys that are not a run's settings: its runs, classifier_sweep.py's sweep, and
# where finished runs' results are kept (a folder to commit)
CONFIG_ONLY = ("runs", "sweep", "keep")
# rankcut.train.finetune arguments a run sets itself: not for finetune_options
MANAGED_FINETUNE = {"checkpoint_dir", "resume", "log", "progress", "device", "callback", "seed",
                    "batch_size", "checkpoint_every"}
# The runs of one invocation share what planning measures before the target matters (the
# calibration moments, every layer's candidates): a sweep of ratios of one model scores once.
# and on disk, for later invocations; an entry whose moments total over MOMENT_LIMIT bytes (a
# 25,088-wide classifier layer's alone is 5 GB) keeps none of them while the plan is applied,
# fitted sequentially and fine-tuned (classifier_sweep.py's fine-tuned stage uses it too)
MOMENT_LIMIT = 2**31
CACHE = rc.select.CandidateCache.cached(max_entries=2, max_moment_bytes=MOMENT_LIMIT)


def settings_of(config: dict, name: str) -> dict:
    """The settings of run ``name``: the config's shared keys, then the run's own; a setting
    that is a mapping in both (``plan_options``, ``finetune_options``, ``transfer``,
    ``sensitivity``) takes the run's keys over the shared ones, the others kept (it replaced
    the shared mapping whole, silently dropping what the run did not repeat)."""
    shared = {k: v for k, v in config.items() if k not in CONFIG_ONLY}
    own = config["runs"][name] or {}
    for where, keys in (("config", shared), (f"run {name!r}", own)):
        unknown = sorted(set(keys) - set(SETTINGS), key=str)  # (YAML reads on: / no: as bools)
        if unknown:
            raise SystemExit(f"{where}: unknown keys {unknown}; known: {', '.join(SETTINGS)}")
    merged = {**SETTINGS, **shared}
    for key, value in own.items():
        both = isinstance(value, dict) and isinstance(merged[key], dict)
        merged[key] = {**merged[key], **value} if both else value
    if not merged["model"]:
        raise SystemExit(f"run {name!r}: no model")
    return merged


SETTINGS_FILE = "settings.json"
LATE_SETTINGS = ("export", "note")  # settings a finished run may be given afterwards
# what a factorized model is made of: a start_from run, which takes another's, must agree
MADE_BY = ("model", "weights", "train", "augment", "num_classes", "normalization", "image_size",
           "data", "calib", "method", "rank", "target", "sequential", "allow_slower",
           "plan_options", "sensitivity", "match_params")


def pinned(s: dict) -> dict:
    """Settings ``s`` as a run's folder keeps them (JSON; without the settings a finished run
    may be given afterwards: export, written then)."""
    return json.loads(json.dumps({k: v for k, v in s.items() if k not in LATE_SETTINGS},
                                 default=str))


def changed_settings(then: dict, now: dict) -> list[str]:
    """The settings kept as ``then`` that ``now`` (:func:`pinned`) changes (a setting added to
    the config format since is not compared)."""
    return sorted(k for k in then if then[k] != now.get(k))


def refuse_changed(folder: Path, name: str, s: dict) -> dict:
    """Refuse run ``name`` when its folder holds settings other than ``s`` (see
    :func:`pin_settings`); returns ``s`` as they are kept. Called for every selected run before
    the first starts too, so a changed later run is not found hours into the queue."""
    now = pinned(s)
    path = folder / SETTINGS_FILE
    if path.is_file():
        changed = changed_settings(json.loads(path.read_text()), now)
        if changed:
            raise SystemExit(f"run {name!r}: {folder} was made with other settings ({changed} "
                             "differ); move it away to run it afresh, or restore the settings")
    return now


def pin_settings(folder: Path, name: str, s: dict) -> None:
    """Record run ``name``'s settings in its folder when it starts; a later invocation finding
    the run begun or finished under other settings refuses it (a finished run's result, or a
    killed run's fitted model and checkpoints, would otherwise be reused under settings they
    were not made with). A folder from before settings were kept is not checked."""
    path = folder / SETTINGS_FILE
    now = refuse_changed(folder, name, s)
    if path.is_file():
        return
    # (a hidden .NAME.*.tmp is a write a kill cut short, the first settings' among them)
    if folder.is_dir() and any(not (f.name.startswith(".") and f.name.endswith(".tmp"))
                               for f in folder.iterdir()):
        return  # begun before settings were kept: not checked
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")


def check(config: dict, name: str, s: dict) -> None:
    """Refuse, before any run starts, a run whose settings rankcut would refuse hours later:
    a model without pretrained weights (unless a weights file is given), an unknown method,
    rank rule, target or schedule; sensitivity or transfer settings that are not mappings of
    known keys, or CP options that do not exist; latency batches that are not sizes; a
    match_params or start_from naming no run of the config; option keys rc.compress sets
    itself; settings that exclude each other (match_params with a target or rank,
    steps_per_layer outside layerwise, sensitivity with multistage)."""
    from rankcut.plans import LayerPlan
    from rankcut.select.planner import parse_target
    from rankcut.select.rules import parse_rank

    def refuse(what: str, err) -> None:
        text = str(err).removeprefix(f"{what}: ")  # rankcut's own errors name the key already
        raise SystemExit(f"run {name!r}: {what}: {text}")

    if s["train"] is not None:
        known = set(inspect.signature(finetune).parameters) - {
            "model", "train_data", "checkpoint_dir", "resume", "log", "progress", "device",
            "callback", "teacher", "val_data"}
        if not isinstance(s["train"], dict) or set(s["train"]) - known:
            refuse("train", f"expected a mapping of rankcut.train.finetune arguments "
                            f"({', '.join(sorted(known))}), got {s['train']!r}")
        if s["weights"] == "pretrained":
            refuse("train", "needs weights: FILE, where the trained weights go")
        try:  # its values, as finetune would check them when the training starts
            check_finetune_options(s["train"])
        except ValueError as err:
            refuse("train", err)
    try:
        rc.models.check_name(s["model"])
    except ValueError as err:
        refuse("model", err)
    if s["augment"] not in D.AUGMENTS:
        refuse("augment", f"expected one of {', '.join(D.AUGMENTS)}, got {s['augment']!r}")
    if s["model"] not in PRETRAINED and s["weights"] == "pretrained":
        refuse("model", f"no pretrained weights for {s['model']!r} (known: "
                        f"{', '.join(PRETRAINED)}); give weights: FILE")
    if not isinstance(s["method"], str):
        refuse("method", f"expected a method's name, got {s['method']!r}")
    if s["method"] != "auto":
        try:
            rc.methods.resolve(s["method"])
        except ValueError as err:
            refuse("method", err)
    for key, parse in (("rank", parse_rank), ("target", parse_target)):
        if s[key] is not None:
            try:
                parse(s[key])
            except ValueError as err:
                refuse(key, err)
    if not isinstance(s["data"], str) or D.dataset_key(s["data"]) not in D.NAMES:
        refuse("data", f"expected one of {', '.join(D.NAMES)}, got {s['data']!r}")
    for key, low, nullable in INTEGERS:
        if problem := _integer_problem(s[key], low, nullable):
            refuse(key, problem)
    if s["lr"] is not None and not _positive_number(s["lr"]):
        refuse("lr", f"expected a number > 0 or null, got {s['lr']!r}")
    for key in ("distill", "teacher_cache", "allow_slower", "sequential"):
        if not isinstance(s[key], bool) and not (key == "sequential" and s[key] is None):
            refuse(key, f"expected true or false, got {s[key]!r}")
    if s["epochs"] is not None and s["steps"] is not None:
        refuse("epochs", "give epochs or steps, not both")
    for key, fn, taken in (("plan_options", rc.plan, PLAN_OPTIONS_TAKEN),
                           ("finetune_options", finetune, FINETUNE_OPTIONS_TAKEN)):
        if not isinstance(s[key], dict):
            refuse(key, f"expected a mapping of {fn.__module__}.{fn.__name__} arguments, got "
                        f"{s[key]!r}")
        # (those rc.compress sets itself are refused there: the config has keys for them)
        unknown = sorted(set(s[key]) - (set(inspect.signature(fn).parameters) - taken))
        if unknown:
            refuse(key, f"unknown keys {unknown} for {fn.__module__}.{fn.__name__} (or keys "
                        "the run sets itself: method, rank, target, epochs, ...)")
    # a key of the run's own given again in the options: one of the two would be dropped in
    # silence (the options' allow_slower won over the run's, which its settings recorded; the
    # run's lr won over the options')
    for key, own in (("plan_options", ("allow_slower",)), ("finetune_options", ("lr",))):
        twice = sorted(set(s[key]) & set(own))
        if twice:
            refuse(key, f"{twice}: the run's own key{'s' if len(twice) > 1 else ''}; set "
                        f"{'them' if len(twice) > 1 else 'it'} there, not in {key}")
    managed = sorted(set(s["finetune_options"]) & MANAGED_FINETUNE) if isinstance(
        s["finetune_options"], dict) else []
    if managed:
        refuse("finetune_options", f"{managed}: set by the run itself (checkpoints, resuming, "
                                   "logs, device; seed and batch_size are the run's own keys)")
    try:  # values, as finetune checks them (after planning and fitting, in rc.compress)
        check_finetune_options(s["finetune_options"], teacher=s["distill"])
    except ValueError as err:
        refuse("finetune_options", err)
    try:  # the input statistics (a model name or explicit (mean, std)) and size
        D.transforms(s["data"], train=False, normalization=normalization_of(s),
                     size=s["image_size"])
    except (TypeError, ValueError) as err:
        refuse("normalization", err)
    for key in ("match_params", "start_from"):
        if s[key] is not None and not isinstance(s[key], str):
            refuse(key, f"expected the name of a run, got {s[key]!r}")
    if s["start_from"] is not None and s["schedule"] != "one_shot":
        refuse("start_from", "only with schedule: one_shot (the other schedules plan and fit "
                             "as they go)")
    if s["export"] is not None and not isinstance(s["export"], str):
        refuse("export", f"expected a folder name, got {s['export']!r}")
    if not isinstance(s["weights"], str):
        refuse("weights", f"expected 'pretrained' or a file, got {s['weights']!r}")
    if s["train"] is None and s["weights"] != "pretrained" and not Path(s["weights"]).is_file():
        refuse("weights", f"{s['weights']}: no such file (and no train: recipe to make it)")
    if s["match_params"] is not None and (s["target"] is not None or s["rank"] is not None):
        refuse("match_params", "sets the target; give no target or rank")
    if s["steps_per_layer"] is not None and s["schedule"] != "layerwise":
        refuse("steps_per_layer", "only with schedule: layerwise")
    if s["sensitivity"] is not None and s["schedule"] == "multistage":
        refuse("sensitivity", "a ready plan: not with schedule: multistage (it plans each round)")
    batches = s["latency"] or []
    if not isinstance(batches, list) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                and b >= 1 for b in batches):
        refuse("latency", f"expected a list of batch sizes >= 1, got {s['latency']!r}")
    if s["schedule"] not in ("one_shot", "layerwise", "multistage"):
        refuse("schedule", f"expected one_shot, layerwise or multistage, got {s['schedule']!r}")
    for key in ("match_params", "start_from"):
        if s[key] is not None and s[key] not in config["runs"]:
            refuse(key, f"no run {s[key]!r} in this config")
    for key in ("sensitivity", "transfer"):
        if s[key] is not None and not isinstance(s[key], dict):
            refuse(key, f"expected a mapping, got {s[key]!r}")
    if s["sensitivity"] is not None:
        opts = dict(s["sensitivity"])
        unknown = sorted(set(opts) - {"lam", "trial_rank", "form", "options"})
        if unknown:
            refuse("sensitivity", f"unknown keys {unknown}; known: lam, trial_rank, form, "
                                  "options")
        if s["target"] is None or parse_target(s["target"])[0] != "params":
            refuse("sensitivity", f"needs a params target (params=...), got {s['target']!r}")
        if s["calib"] == 0:
            refuse("sensitivity", "needs calibration images (calib: 0): the layers' losses are "
                                  "measured on them")
        lam = opts.get("lam", 0.0)
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
            refuse("sensitivity", f"lam: expected a number in [0, 1], got {lam!r}")
        if problem := _integer_problem(opts.get("trial_rank", 5), 1, False):
            refuse("sensitivity", f"trial_rank: {problem}")
        try:  # the CP options and form every layer of the plan will carry
            LayerPlan("cp", (1,), form=opts.get("form"), options=opts.get("options") or {})
            rc.methods.resolve("cp", opts.get("form"))
        except (TypeError, ValueError) as err:
            refuse("sensitivity", err)
    if s["transfer"] is not None:
        unknown = sorted(set(s["transfer"]) - set(TRANSFER))
        if unknown or "data" not in s["transfer"]:
            refuse("transfer", f"expected keys {', '.join(TRANSFER)} ('data' required), got "
                               f"{sorted(s['transfer'])}")
        t = {**TRANSFER, **s["transfer"]}
        if not isinstance(t["data"], str) or D.dataset_key(t["data"]) not in D.NAMES:
            refuse("transfer", f"data: expected one of {', '.join(D.NAMES)}, got {t['data']!r}")
        for key, nullable in (("epochs", False), ("train_limit", True), ("test_limit", True)):
            if problem := _integer_problem(t[key], 1, nullable):
                refuse("transfer", f"{key}: {problem}")
        if not _positive_number(t["lr"]):
            refuse("transfer", f"lr: expected a number > 0 (YAML reads 5e-3 as a string: write "
                               f"5.0e-3), got {t['lr']!r}")
        if (t["train_limit"] is not None and isinstance(s["batch_size"], int)
                and t["train_limit"] < s["batch_size"]):
            refuse("transfer", f"train_limit: {t['train_limit']} images are fewer than one "
                               f"batch of {s['batch_size']} (batch_size)")
    # (last: a run missing these is refused for them once all else is right)
    if s["rank"] is None and s["target"] is None and s["match_params"] is None:
        refuse("target", "give a target (e.g. params=32x), a rank rule, or match_params")
    if s["schedule"] == "multistage" and s["target"] is None and s["match_params"] is None:
        refuse("schedule", "multistage needs a target (its rounds go toward it)")
    if s["calib"] == 0 and s["sequential"]:
        refuse("sequential", "needs calibration images (calib: 0)")


def _integer_problem(v, low: int, nullable: bool) -> str | None:
    """What is wrong with ``v`` as a whole-number setting of at least ``low`` (None: nothing)."""
    if (v is None and nullable) or (isinstance(v, int) and not isinstance(v, bool) and v >= low):
        return None
    return f"expected an integer >= {low}{' or null' if nullable else ''}, got {v!r}"


def _positive_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")


COMMIT = source_commit()  # read when the process starts (see there)


class _Wall:
    """Wall time of a run summed over the invocations that worked on it (a killed invocation
    counts up to its last update, at most ``every`` steps before it died), and the commits
    they ran at."""

    def __init__(self, folder: Path, every: int = 20):
        self.path = folder / "wall.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.before = old.get("seconds", 0.0)
        self.commits = list(dict.fromkeys([*old.get("commits", []), COMMIT]))
        self.start = time.perf_counter()
        self.every = every
        self.save()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"seconds": round(self.seconds(), 1),
                                       "commits": self.commits}))

    def callback(self, info) -> bool:
        if info["step"] % self.every == 0:
            self.save()
        return False


def datasets(s: dict, root: Path):
    """(training split with augmentation, the same without, test split) of ``s["data"]``,
    normalised as ``s["normalization"]`` (default: as the model's weights expect). Read once per
    process for each data, normalisation and size: a queue's runs share them."""
    return _datasets(s["data"], normalization_of(s), s["image_size"], s["test_limit"], str(root),
                     s["augment"])


def normalization_of(s: dict):
    """The run's input statistics: ``s["normalization"]``, by default the model's."""
    norm = s["normalization"] if s["normalization"] is not None else s["model"]
    if isinstance(norm, list):  # YAML's [[mean...], [std...]]
        norm = tuple(tuple(v) if isinstance(v, list) else v for v in norm)
    return norm


@lru_cache(maxsize=4)
def _datasets(data: str, norm, size, test_limit, root: str, augment: str):
    def tf(train: bool):
        return D.transforms(data, train=train, normalization=norm, size=size, augment=augment)

    train = D.dataset(data, "train", root=root, transform=tf(True))
    test = D.dataset(data, "test", root=root, transform=tf(False), limit=test_limit)
    return train, D.with_transform(train, tf(False)), test


_DENSE_TOP1: dict[tuple, dict] = {}


def check_models(todo: dict, root: Path) -> None:
    """Build each run's model as the run will (``num_classes`` outputs, its weights file or
    the pretrained one loaded strictly; a file a ``train:`` recipe has yet to make is not read)
    and refuse, before the first run, one that fails or whose outputs are not its data's
    classes: found only when the run was reached, after the runs before it (hours)."""
    outputs: dict[tuple, int | None] = {}
    for name, s in todo.items():
        try:
            weights = (pretrained_path(s["model"], root) if s["weights"] == "pretrained"
                       else Path(s["weights"]) if Path(s["weights"]).is_file() else None)
            key = (s["model"], str(weights), s["num_classes"])
            if key not in outputs:
                linears = [m for m in create(s["model"], weights=weights,
                                             num_classes=s["num_classes"]).modules()
                           if isinstance(m, torch.nn.Linear)]
                outputs[key] = linears[-1].out_features if linears else None
        except (OSError, ValueError, TypeError, RuntimeError, ImportError) as err:
            raise SystemExit(f"run {name!r}: model: {err}") from None
        classes = D.num_classes(s["data"])
        # (the last Linear is the head of rankcut's and torchvision's models; a model of the
        # user's own may register another after it)
        own = rc.models.check_name(s["model"]) == "user"
        if not own and None not in (outputs[key], classes) and outputs[key] != classes:
            raise SystemExit(
                f"run {name!r}: {s['model']} has {outputs[key]} outputs (num_classes: "
                f"{s['num_classes']}), but {s['data']} has {classes} classes; set num_classes: "
                f"{classes}")


def dense_top1(model: torch.nn.Module, s: dict, weights: Path, test) -> dict:
    """``evaluate(model, test)`` of the dense model, measured once per process for each model,
    weights file and test data (runs of one config share it)."""
    key = (s["model"], str(weights), s["num_classes"], s["data"], repr(s["normalization"]),
           s["image_size"], s["test_limit"])
    if key not in _DENSE_TOP1:
        _DENSE_TOP1[key] = evaluate(model, test)
    return _DENSE_TOP1[key]


class _Unrepeated(torch.nn.Module):
    """Stands in for a torchvision VGG's ``AdaptiveAvgPool2d((7, 7))`` while training: a 1x1
    feature map (32x32 inputs) passes through once instead of being repeated 49 times; any
    other size goes through the pool."""

    def __init__(self, pool: torch.nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return x if x.shape[-2:] == (1, 1) else self.pool(x)


def _folded_forward(linear: torch.nn.Linear, x):
    """The first classifier layer on the features given once: its weight's 49 copies of each
    feature's column summed, the same function and (through the sum) the same gradients."""
    if x.shape[-1] == linear.in_features:
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    out = linear.weight.shape[0]
    return torch.nn.functional.linear(x, linear.weight.view(out, x.shape[-1], -1).sum(-1),
                                      linear.bias)


@contextlib.contextmanager
def unrepeated_pool(model: torch.nn.Module):
    """Train a torchvision-layout VGG on 32x32 inputs without its pool's 49-fold repetition.

    Its adaptive pool turns the 512x1x1 feature map into 512x7x7 copies, so the 4096 x 25,088
    first classifier layer does 49x the work its function needs. Inside this context the
    features reach it once and it applies its weight summed over the copies: the model computes
    the same outputs and every parameter (the 25,088-wide weight too) gets the same gradient, in
    1.8-2.1 s instead of 2.9-3.1 s a step of 64 on the 2-core CPU; its state dict, checkpoints
    and saved weights are unchanged. Other models pass through untouched."""
    pool = getattr(model, "avgpool", None)
    head = getattr(model, "classifier", None)
    first = head[0] if isinstance(head, torch.nn.Sequential) and len(head) else None
    if not (isinstance(pool, torch.nn.AdaptiveAvgPool2d) and isinstance(first, torch.nn.Linear)):
        yield model
        return
    model.avgpool = _Unrepeated(pool)
    first.forward = partial(_folded_forward, first)
    try:
        yield model
    finally:
        model.avgpool = pool
        del first.forward


# the settings trained weights depend on besides their recipe: the model and its inputs
TRAINED_ON = ("model", "data", "num_classes", "normalization", "image_size", "augment")


def trained_weights(s: dict, root: Path, device: str) -> dict:
    """Train ``s["model"]`` from scratch by the recipe ``s["train"]`` (finetune's keyword
    arguments; seeded, checkpointed beside the weights file, so a killed run resumes) unless its
    ``s["weights"]`` file exists; save it there with a ``.json`` beside (top-1 on the test
    split, the recipe, wall time, commit). Returns that record (None for a weights file that
    was not trained here)."""
    path = Path(s["weights"])
    record = path.with_suffix(".json")
    folder = path.parent / f"{path.stem}-training"
    recipe = {"batch_size": s["batch_size"], "seed": s["seed"], **s["train"]}
    every = recipe.pop("checkpoint_every", s["checkpoint_every"])  # not the recipe: when saved
    begun = folder / "recipe.json"  # a training in progress resumes only under its recipe
    # trained earlier (its record), or a file of the user's (no record, no training folder);
    # weights without their record are a run killed between the two writes: the training
    # resumes from its last checkpoint, at the final step, and writes both again
    if path.is_file() and (record.is_file() or not begun.is_file()):
        info = json.loads(record.read_text()) if record.is_file() else None
        if info is not None and info.get("recipe") != recipe:
            raise SystemExit(f"{path}: trained by the recipe {info.get('recipe')}, the config "
                             f"asks for {recipe}; move it (and {record.name}, {folder.name}/) "
                             "away to train it again")
        # what the inputs were (a record that predates a key is not checked for it)
        other = sorted(k for k in TRAINED_ON if info is not None and k in info
                       and info[k] != json.loads(json.dumps(s[k])))
        if other:
            raise SystemExit(f"{path}: trained with other {other} than the config's; move it "
                             f"(and {record.name}, {folder.name}/) away to train it again")
        return info
    # the recipe and what it trains on (data, augmentation, normalization, ...): a training
    # in progress resumes only under both
    inputs = {k: json.loads(json.dumps(s[k])) for k in TRAINED_ON}
    if begun.is_file():
        was = json.loads(begun.read_text())
        if "recipe" not in was:  # written before the inputs were pinned beside the recipe
            was = {"recipe": was}
        changed = (["recipe"] if was["recipe"] != recipe else []) + sorted(
            k for k in TRAINED_ON if k in was.get("inputs", {}) and was["inputs"][k] != inputs[k])
        if changed:
            raise SystemExit(f"{folder}: a training with other {changed} is in progress there "
                             f"({begun.read_text()}; the config asks for {recipe}, {inputs}); "
                             "move the folder away to train afresh")
    wall = _Wall(folder)
    with atomic_path(begun) as tmp:
        tmp.write_text(json.dumps({"recipe": recipe, "inputs": inputs}))
    torch.manual_seed(s["seed"])
    model = create(s["model"], num_classes=s["num_classes"])
    train, _, test = datasets(s, root)
    print(f"[weights] training {s['model']} on {s['data']} from scratch: {recipe} -> {path}",
          flush=True)
    with unrepeated_pool(model):
        result = finetune(model, train, checkpoint_dir=str(folder), resume=True,
                          checkpoint_every=every, log=str(folder / "train.jsonl"),
                          progress=False, device=device, callback=wall.callback, **recipe)
    small = result.model.cpu().eval()
    info = {**{k: s[k] for k in TRAINED_ON}, "recipe": recipe,
            "top1": evaluate(small, test)["top1"], "test_images": len(test),
            "commit": "+".join(wall.commits), "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "device": device}
    with atomic_path(path) as tmp:  # a run killed while writing 515 MB leaves no torn file
        save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp))
    wall.save()
    info["wall_s"] = round(wall.seconds(), 1)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    print(f"[weights] {path}: top-1 {info['top1']:.2f}% on {len(test)} test images, "
          f"{info['wall_s'] / 60:.0f} min", flush=True)
    return info


def dense_transfer(folder: Path, s: dict) -> tuple[Path, dict]:
    """The file of the dense backbone's transfer result that the runs of a config with the same
    head settings share (named by the model, the data and a digest of those settings: runs
    with other settings get their own baseline), and the settings."""
    made = {**TRANSFER, **s["transfer"], "batch_size": s["batch_size"],
            "weights": str(s["weights"]),
            # (the head's seed and inputs, named only where not the defaults: the baselines
            # made before they counted keep their names)
            **{k: s.get(k, SETTINGS[k]) for k in ("seed", "normalization", "image_size")
               if s.get(k, SETTINGS[k]) != SETTINGS[k]}}
    digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:10]
    return (folder.parent / f"dense-transfer-{s['model']}-{s['transfer']['data']}-{digest}.json",
            made)


def run(name: str, s: dict, folder: Path, root: Path, device: str) -> dict:
    if s["start_from"]:
        check_start_from(folder, name, s)
    folder.mkdir(parents=True, exist_ok=True)
    trained = trained_weights(s, root, device) if s["train"] else None
    wall = _Wall(folder)
    torch.manual_seed(s["seed"])
    weights = (pretrained_path(s["model"], root) if s["weights"] == "pretrained"
               else Path(s["weights"]))
    model = create(s["model"], weights=weights, num_classes=s["num_classes"]).eval()
    train, plain, test = datasets(s, root)
    calib = D.calibration(plain, n=s["calib"], seed=s["seed"]) if s["calib"] else None
    x = test[0][0].unsqueeze(0)
    dense = dense_top1(model, s, weights, test)
    tune = {"batch_size": s["batch_size"], "checkpoint_dir": str(folder / "checkpoints"),
            "resume": True, "checkpoint_every": s["checkpoint_every"], "seed": s["seed"],
            "log": str(folder / "train.jsonl"), "progress": False, "device": device,
            "callback": wall.callback, **s["finetune_options"]}
    if s["lr"] is not None:
        tune["lr"] = s["lr"]
    if s["distill"] and s["teacher_cache"]:
        tune["teacher_cache"] = str(folder.parent / "teacher-outputs")
    tuning = tunes(s)
    method = "cp by sensitivity" if s["sensitivity"] is not None else s["method"]
    per_layer = f" + {s['steps_per_layer']} per layer" if s["steps_per_layer"] else ""
    print(f"[{name}] {s['model']} dense {dense['top1']:.2f}%; {method} "
          f"{s['target'] or s['rank']}, {s['schedule']}, "
          f"{s['epochs'] or 0} epoch(s) / {s['steps'] or 0} step(s){per_layer}", flush=True)
    if s["start_from"] and not tuning:  # the other run's compressed model, as it finished
        result = reuse_finished(folder, s["start_from"], model, test)
    else:
        if s["start_from"]:
            reuse_start(folder, s["start_from"])
        plan = sensitivity(model, s, calib, folder) if s["sensitivity"] else None
        before_hits = (CACHE.hits, CACHE.disk_hits)
        result = rc.compress(
            model, x, method=s["method"], rank=None if plan else s["rank"],
            target=None if plan else s["target"], plan=plan, schedule=s["schedule"],
            calib_data=calib, train_data=train if tuning else None,
            epochs=s["epochs"], steps=s["steps"], steps_per_layer=s["steps_per_layer"],
            val_data=test, distill=s["distill"], sequential=s["sequential"],
            plan_options={"allow_slower": s["allow_slower"], "cache": CACHE,
                          **s["plan_options"]},
            finetune_options=tune, progress=False)
    candidate_hits = (None if s["start_from"] else
                      {"hits": CACHE.hits - before_hits[0],
                       "disk_hits": CACHE.disk_hits - before_hits[1]})
    small = result.model.cpu().eval()
    final = result.stages[-1]
    before = result.stages[0].get("val_before") or (
        final["val"] if s["schedule"] == "one_shot" else None)  # one_shot, not fine-tuned
    if before is None:  # layerwise, multistage: the whole plan applied at once, before any
        # fine-tuning; for layerwise without the sequential correction (its layers are fitted
        # on the model at hand, never to the dense model's outputs), multistage as its rounds fit
        sequential = False if s["schedule"] == "layerwise" else s["sequential"]
        before = evaluate(rc.apply(model, result.plan, calib_data=calib, sequential=sequential),
                          test)
    out = {
        "name": name, "model": s["model"], "data": s["data"],
        "method": "cp (sensitivity)" if s["sensitivity"] is not None else s["method"],
        "target": s["target"],
        "rank": s["rank"], "schedule": s["schedule"], "epochs": s["epochs"],
        "steps": s["steps"], "steps_per_layer": s["steps_per_layer"],
        "dense_top1": dense["top1"], "before_top1": before["top1"],
        "after_top1": final["val"]["top1"], "test_images": dense["n"],
        "params": count_params(small), "dense_params": count_params(model),
        "macs": count_macs(small, x), "dense_macs": count_macs(model, x),
        "layers": {m: sum(lp.method == m for lp in result.plan.active.values())
                   for m in sorted({lp.method for lp in result.plan.active.values()})},
        "ranks": {n: list(lp.ranks) for n, lp in result.plan.active.items()},
        "lr": next((st["train"]["lr"] for st in result.stages if st.get("train")), None),
        # teacher outputs taken from the config's teacher-outputs/ (hits) or computed (misses)
        "teacher_cache": _cache_counts(result.stages),
        # plans that took their candidates from an earlier plan (in this process or on disk):
        # their wall time has no scoring in it
        "candidate_cache": candidate_hits,
        "resumed": bool(result.stages[0].get("resumed")),
        "commit": "+".join(wall.commits),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": device,
        "machine": f"{platform.machine()}, {platform.processor() or platform.node()}",
        "note": s["note"], "sensitivity": s["sensitivity"], "trained_weights": trained,
    }
    out["params_x"] = out["dense_params"] / out["params"]
    out["macs_x"] = out["dense_macs"] / out["macs"]
    if s["transfer"]:
        out["transfer"] = transfer_head(small, s, root, folder / "transfer", device)
        dense_file, made = dense_transfer(folder, s)
        if not dense_file.is_file():
            dense_result = transfer_head(model, s, root, folder.parent / dense_file.stem, device)
            with atomic_path(dense_file) as tmp:
                tmp.write_text(json.dumps({**dense_result, **made}))
        out["transfer_dense"] = json.loads(dense_file.read_text())
    if s["latency"]:
        # both on the CPU (the compressed model is there; fine-tuning on a GPU moved the
        # dense one, its teacher, there too)
        out["latency"] = speedups(model.cpu().eval(), small, x.cpu(), s["latency"],
                                  repeats=20)
    rc.save(small, folder / "model", plan=result.plan)
    if s["export"]:
        out["export"] = export(small, result.plan, create(s["model"],
                                                          num_classes=s["num_classes"]),
                               Path(s["export"]), test, out["after_top1"])
    wall.save()
    out["wall_s"] = round(wall.seconds(), 1)
    with atomic_path(folder / RESULT) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    return out


def _cache_counts(stages) -> dict | None:
    """Teacher-cache hits and misses summed over the fine-tuning stages (None: no cache)."""
    counts = [st["train"]["final"].get("teacher_cache") for st in stages if st.get("train")]
    counts = [c for c in counts if c]
    if not counts:
        return None
    return {k: sum(c[k] for c in counts) for k in ("hits", "misses")}


def check_start_from(folder: Path, name: str, s: dict) -> None:
    """Refuse a ``start_from`` run whose own settings of what the factorized model is made of
    (method, rank, target, calibration, ...: ``MADE_BY``) differ from the run it takes that
    model from: they would label another model (a p=0.5 row for a p=0.1 backbone). A source
    from before settings were kept is not checked."""
    source = folder.parent / s["start_from"] / SETTINGS_FILE
    if not source.is_file():
        return
    then = json.loads(source.read_text())
    now = json.loads(json.dumps({k: s[k] for k in MADE_BY}, default=str))
    if s["match_params"] is not None:  # its target is filled in from the matched run's result
        now["target"] = then.get("target")  # after its settings were kept (as null)
    changed = sorted(k for k in now if k in then and then[k] != now[k])
    if changed:
        raise SystemExit(f"run {name!r}: start_from {s['start_from']!r} made its model with "
                         f"other {changed}; give this run the same ones")


def check_start_source(base: Path, keep: Path | None, name: str, s: dict, earlier: list[str],
                       finished: bool) -> None:
    """Before any run starts, refuse a ``start_from`` run that names itself, or that is not
    ``finished``, holds no copy of the model yet, and whose source has not made its model
    and is not among the ``earlier`` runs of this invocation, or whose source's folder is gone
    (its kept result holds no model)."""
    other = s["start_from"]
    if other == name:
        raise SystemExit(f"run {name!r}: start_from names the run itself")
    if finished or start_ready(base, name, s):
        return
    if other not in earlier:
        raise SystemExit(f"run {name!r}: start_from {other!r} has not made its model yet and "
                         f"does not run before it: list it first (--only ... {other} {name})")
    if not (base / other).is_dir() and result_of(base, keep, other) is not None:
        raise SystemExit(f"run {name!r}: start_from {other!r}: its folder is gone (only its kept "
                         f"result {keep / f'{other}.json'} is left, which holds no model); move "
                         f"that away to run {other!r} again first")


def tunes(s: dict) -> bool:
    """Whether a run with settings ``s`` fine-tunes (epochs, steps, or steps per layer)."""
    return s["epochs"] is not None or s["steps"] is not None or bool(s["steps_per_layer"])


def refuse_uncarried(base: Path, name: str) -> None:
    """A run about to start afresh (no checkpoint in its folder) while experiments/carried holds
    one carried from another machine: refused, so that hours of fine-tuning are not begun again
    and the carried copy is not later replaced by a shorter one."""
    carried = carry.CARRIED / base.name / name
    if carried.is_dir() and not (base / name / "checkpoints").is_dir():
        raise SystemExit(f"run {name!r}: {carried} holds it, carried from another session; "
                         f"restore it first (experiments/carry.py restore {base.name} {name}"
                         f"{'' if base.parent == Path('runs') else f' --runs-dir {base.parent}'}"
                         f"), or remove that folder to start the run afresh")


def start_ready(base: Path, name: str, s: dict) -> bool:
    """Whether run ``name`` of ``base`` can take what its ``start_from`` run made, as things
    stand: the source's finished model (a run without fine-tuning, :func:`reuse_finished`), or
    its factorized model before fine-tuning (:func:`reuse_start`; or this run's own copy)."""
    source = base / s["start_from"]
    if tunes(s):
        return ((base / name / "checkpoints" / "start").is_dir()
                or (source / "checkpoints" / "start" / "model.safetensors").is_file())
    return (source / "model" / "plan.json").is_file()


def reuse_finished(folder: Path, other: str, model: torch.nn.Module, test):
    """Run ``other``'s finished model (its ``model/``), as rc.compress's result would hold it
    (one stage, resumed, measured on ``test``): a run without fine-tuning that only does
    something else with the same compressed model (a transfer head on other data)."""
    from types import SimpleNamespace

    source = folder.parent / other / "model"
    if not (source / "plan.json").is_file():
        raise SystemExit(f"start_from: {source} holds no finished model yet; run {other!r} "
                         "first")
    small = rc.load(copy.deepcopy(model), source)
    stage = {"stage": "one_shot", "resumed": True, "reused": other,
             "val": evaluate(small, test), "train": None}
    return SimpleNamespace(model=small, plan=rc.load_plan(source / "plan.json"), stages=[stage])


def reuse_start(folder: Path, other: str) -> None:
    """Copy run ``other``'s factorized model before fine-tuning into this run's checkpoints, so
    rc.compress resumes from it (same plan and fitted weights, another fine-tuning)."""
    source = folder.parent / other / "checkpoints" / "start"
    target = folder / "checkpoints" / "start"
    if target.is_dir():
        return
    if not (source / "model.safetensors").is_file():
        raise SystemExit(f"start_from: {source} holds no factorized model yet; run {other!r} "
                         "first")
    with atomic_folder(target) as tmp:  # all of it or nothing: a partial start/ would be
        shutil.copytree(source, tmp, dirs_exist_ok=True)  # planned afresh, silently


def sensitivity(model, s: dict, calib, folder: Path):
    """Seed 000's plan: CP ranks over every eligible conv by sensitivity (kept in the run's
    folder, so a resumed run does not measure the sensitivities again)."""
    from rankcut.select import sensitivity_plan
    from rankcut.surgery import target_layers

    path = folder / "sensitivity_plan.json"
    if path.is_file():
        return rc.load_plan(path)
    opts = dict(s["sensitivity"])
    names = [n for n, why in target_layers(model, exclude=torch.nn.Linear).items()
             if why is None]
    plan = sensitivity_plan(model, names, calib, target=s["target"], method="cp",
                            lam=opts.pop("lam", 0.0), trial_rank=opts.pop("trial_rank", 5),
                            form=opts.pop("form", None), options=opts.pop("options", None))
    save_plan(plan, path)
    return plan


def transfer_head(backbone, s: dict, root: Path, folder: Path, device: str) -> dict:
    """Top-1 of a new head trained on ``backbone``, frozen (rc.transfer), on the test split of
    ``s["transfer"]["data"]`` (MNIST-style digits made 3-channel 32x32 by the transform);
    checkpointed in ``folder`` so a killed run resumes it."""
    t = {**TRANSFER, **s["transfer"]}
    tf = D.transforms(t["data"], train=False, normalization=s["normalization"] or s["model"],
                      size=s["image_size"] or 32)
    train = D.dataset(t["data"], "train", root=root, transform=tf, limit=t["train_limit"])
    test = D.dataset(t["data"], "test", root=root, transform=tf, limit=t["test_limit"])
    result = rc.transfer(backbone, train, num_classes=len(train.classes), epochs=t["epochs"],
                         lr=t["lr"], batch_size=s["batch_size"], progress=False,
                         checkpoint_dir=str(folder), resume=True, device=device, seed=s["seed"])
    head = [m for m in result.model.modules() if type(m) is torch.nn.Linear][-1]
    return {**t, "top1": evaluate(result.model, test)["top1"], "test_images": len(test),
            "backbone_params": count_params(result.model) - count_params(head)}


def export(small, plan, fresh: torch.nn.Module, folder: Path, test, top1: float) -> dict:
    """Save ``small`` into ``folder`` (a results/ entry): with float16 weights when that keeps
    top-1 on ``test`` within 0.1 point of ``top1`` (float32's), else float32; then load it back
    as a user would, ``rc.load(create(MODEL), folder)`` (``fresh``), and measure it again."""
    half = copy.deepcopy(small).half()
    top1_half = evaluate(copy.deepcopy(half).float(), test)["top1"]
    keep = abs(top1_half - top1) <= 0.1 + 1e-9  # (90.01 - 89.91 is 0.10000000000000853)
    rc.save(half if keep else small, folder, plan=plan)
    loaded = evaluate(rc.load(fresh, folder), test)["top1"]
    return {"folder": str(folder), "dtype": "float16" if keep else "float32",
            "top1_float16": top1_half, "top1_loaded": loaded}


def refuse_overwrite(name: str, s: dict, done: Path | None, own_result: Path) -> None:
    """Refuse, before any run starts, a run that would export (at its end, or as a late export
    of a finished run whose folder is here) into a folder that already holds a saved model: a
    results/ folder holds a committed headline, which a rerun of other settings, or of the
    same ones with another outcome, would silently replace."""
    if not s["export"] or not (Path(s["export"]) / "plan.json").is_file():
        return
    if done is not None:  # finished: only a late export writes, and only from its own folder
        if done != own_result:
            return
        made = json.loads(done.read_text()).get("export") or {}
        if made.get("folder") == str(Path(s["export"])):
            return  # exported there already, by this run
    raise SystemExit(f"run {name!r}: export: {s['export']} already holds a saved model "
                     f"({Path(s['export']) / 'plan.json'}); exporting would replace it. Give "
                     "the run another folder, export: null for none, or pass "
                     "--replace-exports to replace it")


def late_export(folder: Path, s: dict, root: Path) -> None:
    """A finished run given ``export:`` after it ran (once its result was known to be the
    headline): its fine-tuned model (``model/``) exported now, as a run exports at its end, and
    recorded in its result.json."""
    result = json.loads((folder / RESULT).read_text())
    # "results/x/" and "./results/x" name the folder "results/x" that export() recorded
    if not s["export"] or result.get("export", {}).get("folder") == str(Path(s["export"])):
        return
    fresh = partial(create, s["model"], num_classes=s["num_classes"])
    small = rc.load(fresh(), folder / "model").eval()
    _, _, test = datasets(s, root)
    if len(test) != result["test_images"]:  # top-1 compared on other images would mislead
        raise SystemExit(f"[{folder.name}] export: the run was measured on "
                         f"{result['test_images']} test images, the config now gives "
                         f"{len(test)} (test_limit changed); set it back to export")
    result["export"] = export(small, rc.load_plan(folder / "model" / "plan.json"), fresh(),
                              Path(s["export"]), test, result["after_top1"])
    with atomic_path(folder / RESULT) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"[{folder.name}] exported to {s['export']}", flush=True)


def matched_target(base: Path, keep: Path | None, name: str, s: dict) -> str:
    """``params=F``: the fraction of the dense parameters that run ``s["match_params"]`` kept
    (it must have finished: runs go in the config's order)."""
    other = result_of(base, keep, s["match_params"])
    if other is None:
        raise SystemExit(f"run {name!r}: match_params {s['match_params']!r} has not finished "
                         f"({base / s['match_params'] / RESULT} is missing); list it first, or "
                         "run it with --only")
    if s["target"] or s["rank"]:
        raise SystemExit(f"run {name!r}: match_params sets the target; give no target or rank")
    r = json.loads(other.read_text())
    return f"params={r['params'] / r['dense_params']:.6f}"


def check_still_matched(base: Path, keep: Path | None, name: str, s: dict) -> None:
    """A finished ``match_params`` run was made at the parameter share its matched run kept
    then (its result's target); refuse it when that run, redone since, keeps another (the
    pair would be compared at unequal sizes). Not checked while the matched run is unfinished."""
    if not s["match_params"] or result_of(base, keep, s["match_params"]) is None:
        return
    then = json.loads(result_of(base, keep, name).read_text())["target"]
    now = matched_target(base, keep, name, s)
    if then != now:
        raise SystemExit(f"run {name!r}: made at {then} to match {s['match_params']!r}, which "
                         f"now keeps {now}; move {_made(base, keep, name)} away to run it afresh")


def _fused(r: dict) -> str:
    """"1.9x b1, 2.4x b32": the fused speed-ups a run measured, or "-"."""
    rows = [t for t in r.get("latency", []) if t["form"] == "fused"]
    return ", ".join(f"{t['speedup']:.2f}x b{t['batch']}" for t in rows) or "-"


def summary(rows: list[dict]) -> str:
    head = ("| run | method | target | params x | MACs x | dense % | before % | after % | "
            "epochs | fused speed-up | wall min | commit |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['target'] or r['rank']} | "
            f"{r['params_x']:.1f} | {r['macs_x']:.2f} | {r['dense_top1']:.2f} | "
            f"{r['before_top1']:.2f} | {r['after_top1']:.2f} | "
            f"{r['epochs'] if r['epochs'] is not None else r['steps']} | {_fused(r)} | "
            f"{r['wall_s'] / 60:.0f} | {r['commit']} |")
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", *notes]
    sens = [r for r in rows if r.get("sensitivity")]
    if sens:  # seed 000's table: λ, solver, ranks
        lines += ["", "| run | model | λ | form | solver | total rank | params x | before % | "
                  "after % | wall min |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in sens:
            t = r["sensitivity"]
            solver = (t.get("options") or {}).get("solver", "als")
            total = sum(sum(v) for v in r["ranks"].values()) if "ranks" in r else "-"
            lines.append(f"| {r['name']} | {r['model']} | {t.get('lam', 0.0)} | "
                         f"{t.get('form') or 'cp4'} | {solver} | {total} | {r['params_x']:.2f} | "
                         f"{r['before_top1']:.2f} | {r['after_top1']:.2f} | "
                         f"{r['wall_s'] / 60:.0f} |")
    moved = [r for r in rows if r.get("transfer")]
    if moved:  # seed 000's transfer: a new head on the frozen backbone
        lines += ["", "| run | data | backbone rank | backbone params | top-1 % | dense backbone "
                  "params | dense top-1 % | test images |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in moved:
            t, d = r["transfer"], r["transfer_dense"]
            lines.append(f"| {r['name']} | {t['data']} | {r['rank'] or r['target']} | "
                         f"{t['backbone_params']:,} | {t['top1']:.2f} | "
                         f"{d['backbone_params']:,} | {d['top1']:.2f} | {t['test_images']} |")
    return "\n".join(lines)


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (a run block copied and
    not renamed would replace the first in silence; a setting given twice, the last would
    win); ``<<:`` merges still override as YAML says."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def command_line(doc: str, only: str, summary: str, extra=None):
    """(arguments, config path, config) of an experiment command on a config of this format
    (reproduce.py, classifier_sweep.py): config, --only, --runs-dir, --threads (applied),
    --device, --summary; ``extra(parser)`` adds a command's own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("config")
    parser.add_argument("--only", nargs="+", help=only)
    parser.add_argument("--runs-dir", default="runs", help="where the runs' folders go")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--summary", action="store_true", help=summary)
    args = parser.parse_args()
    try:  # a typo, or a GPU that is not there, found now, not when fine-tuning starts
        available_device(args.device)
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None
    config_path = Path(args.config)
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: no such config file")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: expected a number of threads >= 1, got {args.threads}")
    if args.only and len(set(args.only)) < len(args.only):
        raise SystemExit(f"--only: {sorted({n for n in args.only if args.only.count(n) > 1})} "
                         "named twice")
    try:
        config = yaml.load(config_path.read_text(), Loader=_UniqueKeys)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        raise SystemExit(f"{config_path}: not valid YAML"
                         + (f" (line {mark.line + 1})" if mark is not None else "")
                         + f": {str(err).strip().splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("runs"), dict):
        raise SystemExit(f"{config_path}: expected a mapping with a 'runs:' mapping")
    bad = [str(n) for n, run in config["runs"].items() if run is not None
           and not isinstance(run, dict)]
    if bad:
        raise SystemExit(f"{config_path}: runs {bad}: each run is a mapping of settings")
    unnamed = [n for n in config["runs"] if not isinstance(n, str)]
    if unnamed:
        raise SystemExit(f"{config_path}: runs {unnamed}: a run's name is text (quote a "
                         "number: '50': ...)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args, config_path, config


def main() -> int:
    args, config_path, config = command_line(
        __doc__, "run only these runs of the config",
        "print the table of the finished runs and stop",
        lambda parser: parser.add_argument(
            "--replace-exports", action="store_true",
            help="let a run's export: overwrite a model already in its folder (else refused "
                 "before the first run: results/ folders hold committed headline models)"))
    names = args.only or list(config["runs"])
    missing = [n for n in names if n not in config["runs"]]
    if missing:
        raise SystemExit(f"--only: no runs {missing} in {config_path}; it has "
                         f"{', '.join(config['runs'])}")
    base = Path(args.runs_dir) / config_path.stem
    keep = config_keep(config, config_path)
    if not args.summary:
        every = {name: settings_of(config, name) for name in names}
        for i, (name, s) in enumerate(every.items()):
            check(config, name, s)
            other = s["match_params"]  # matched to a run finished before this one starts
            if (other is not None and other not in list(every)[:i]
                    and result_of(base, keep, other) is None):
                raise SystemExit(f"run {name!r}: match_params: run {other!r} has not finished "
                                 "and does not run before it; list it first")
        done = {name: result_of(base, keep, name, s) for name, s in every.items()}
        order = list(every)
        exports: dict[Path, str] = {}  # two runs exporting to one folder: the last would win
        for name in config["runs"]:
            where = settings_of(config, name)["export"]
            if where and exports.setdefault(Path(where), name) != name:
                raise SystemExit(f"runs {exports[Path(where)]!r} and {name!r}: both export to "
                                 f"{where}; give each its own folder (export: null for none)")
        for name, s in every.items():  # what would refuse a later run, found now
            refuse_changed(base / name, name, s)
            if not args.replace_exports:
                refuse_overwrite(name, s, done[name], base / name / RESULT)
            if done[name] is None:
                refuse_uncarried(base, name)
            elif done[name] != base / name / RESULT and (base / name).is_dir():
                raise SystemExit(f"run {name!r}: {done[name]} says it finished, but {base / name} "
                                 "holds an unfinished run of it; move one of them away (the "
                                 "kept result to run it again, the folder to keep the result)")
            if s["start_from"] is not None:
                check_start_from(base / name, name, s)
                check_start_source(base, keep, name, s, order[:order.index(name)],
                                   done[name] is not None)
            if done[name] is not None:
                check_still_matched(base, keep, name, s)
        root = D.require_data_root()
        # every dataset a run to do reads (its own, a transfer head's), found before the first
        # run (a transfer head's was first opened after its backbone's compression)
        todo = [s for name, s in every.items() if done[name] is None]
        needed = sorted({D.dataset_key(s["data"]) for s in todo}
                        | {D.dataset_key(s["transfer"]["data"]) for s in todo if s["transfer"]})
        for key in needed:
            for split in ("train", "test"):
                try:
                    D.dataset(key, split, root=root, limit=1)
                except (OSError, ValueError) as err:
                    raise SystemExit(f"data: {err}") from None
        check_models({name: s for name, s in every.items() if done[name] is None}, root)
        # runs of one model share its layers' SVDs and whitened Grams (the same results, bit for
        # bit; a 4096 x 25,088 layer's are minutes each)
        with rc.decompose.reuse_svds(max_entries=8):
            for name, s in every.items():
                if (base / name / RESULT).is_file():
                    pin_settings(base / name, name, s)
                    check_still_matched(base, keep, name, s)
                    print(f"[{name}] finished earlier: {base / name / RESULT}", flush=True)
                    late_export(base / name, s, root)
                    kept(keep, name, base / name)
                    continue
                if done[name] is not None:  # kept, its folder gone
                    check_still_matched(base, keep, name, s)
                    print(f"[{name}] finished earlier (its folder is gone; the result kept: "
                          f"{done[name]})", flush=True)
                    made = json.loads(done[name].read_text()).get("export") or {}
                    if s["export"] and made.get("folder") != str(s["export"]):
                        print(f"[{name}] not exported to {s['export']}: the finished model "
                              "went with the run's folder (run it again to export it)",
                              flush=True)
                    continue
                pin_settings(base / name, name, s)
                if s["match_params"]:
                    s["target"] = matched_target(base, keep, name, s)
                start = time.perf_counter()
                try:
                    r = run(name, s, base / name, root, args.device)
                except ValueError as err:  # rankcut refusing a setting (its errors name it)
                    raise SystemExit(f"run {name!r}: {err}") from None
                kept(keep, name, base / name)
                print(f"[{name}] {r['params_x']:.1f}x params, {r['macs_x']:.2f}x MACs: "
                      f"{r['before_top1']:.2f}% -> {r['after_top1']:.2f}% "
                      f"(dense {r['dense_top1']:.2f}%), "
                      f"{(time.perf_counter() - start) / 60:.1f} min in this invocation",
                      flush=True)
    finished = {}
    for name in config["runs"]:
        try:
            path = result_of(base, keep, name, settings_of(config, name))
        except SystemExit as err:  # a kept result of other settings: not this run's
            print(f"(left out: {err})", flush=True)
            continue
        if path is not None:
            finished[name] = json.loads(path.read_text())
    rows = [finished[name] for name in names if name in finished]
    print(summary(rows))
    # the files: every finished run of the config, whichever this invocation selected
    # (beside the kept results when the config keeps them, to be committed with them)
    every = list(finished.values())
    out = keep or base
    if every:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(summary(every) + "\n")
        if len(every) > 1:
            print(f"wrote {plot(every, out / 'summary.png')}")
        else:
            (out / "summary.png").unlink(missing_ok=True)  # (an older one, of other runs)
    return 0


def config_keep(config: dict, path: Path) -> Path | None:
    """The config's ``keep:`` folder (relative to the working directory, as ``export:``), or
    None."""
    keep = config.get("keep")
    if keep is None:
        return None
    if not isinstance(keep, str) or not keep.strip():
        raise SystemExit(f"{path}: keep: expected a folder (e.g. results/runs/{path.stem}), "
                         f"got {keep!r}")
    if Path(keep).exists() and not Path(keep).is_dir():
        raise SystemExit(f"{path}: keep: {keep} is a file, not a folder")
    return Path(keep)


def kept(keep: Path | None, name: str, folder: Path) -> None:
    """Copy run ``name``'s finished result (``folder``'s) into the config's ``keep`` folder,
    with the settings it ran under (its folder's settings.json, as ``"settings"``), when the
    config has one and the copy differs (a late export changes a result)."""
    if keep is None:
        return
    copy_ = keep / f"{name}.json"
    result = json.loads((folder / RESULT).read_text())
    if (folder / SETTINGS_FILE).is_file():
        result["settings"] = json.loads((folder / SETTINGS_FILE).read_text())
    text = json.dumps(result, indent=1)
    if copy_.is_file() and copy_.read_text() == text:
        return
    keep.mkdir(parents=True, exist_ok=True)
    with atomic_path(copy_) as tmp:
        tmp.write_text(text)


def result_of(base: Path, keep: Path | None, name: str, s: dict | None = None) -> Path | None:
    """Run ``name``'s result: its folder's, else the one kept (the folder lost with a machine:
    the run is finished, not run again), else None (not finished). With ``s``, a result made
    under other settings is refused, the folder's (:func:`refuse_changed`) or the kept one's."""
    if (base / name / RESULT).is_file():
        if s is not None:
            refuse_changed(base / name, name, s)
        return base / name / RESULT
    path = None if keep is None else keep / f"{name}.json"
    if path is None or not path.is_file():
        return None
    then = json.loads(path.read_text()).get("settings")
    if s is not None and then is not None and (changed := changed_settings(then, pinned(s))):
        raise SystemExit(f"run {name!r}: its kept result {path} was made with other settings "
                         f"({changed} differ); move it away to run it afresh, or restore the "
                         "settings")
    return path


def _made(base: Path, keep: Path | None, name: str) -> Path:
    """What holds run ``name``'s finished result: its folder, else its kept copy."""
    return base / name if (base / name / RESULT).is_file() else keep / f"{name}.json"


def plot(rows: list[dict], path: Path) -> Path:
    """Top-1 after fine-tuning against the parameter ratio, one line per method (and model),
    the dense model's top-1 dashed: MTD's argument that mixing methods pays, made visible. For a
    config of transfer runs, seed 000's figure instead (top-1 against backbone parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if all(r.get("transfer") for r in rows):
        _plot_transfer(ax, rows)
    else:
        _plot_ratios(ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_transfer(ax, rows: list[dict]) -> None:
    """Seed 000's transfer figure: the new head's top-1 against the backbone's parameters, one
    line per dataset, the dense backbone a star."""
    for data in sorted({r["transfer"]["data"] for r in rows}):
        rs = sorted((r for r in rows if r["transfer"]["data"] == data),
                    key=lambda r: r["transfer"]["backbone_params"])
        line, = ax.plot([r["transfer"]["backbone_params"] for r in rs],
                        [r["transfer"]["top1"] for r in rs], "o-", label=data)
        dense = rs[0]["transfer_dense"]
        ax.plot([dense["backbone_params"]], [dense["top1"]], "*", ms=12,
                color=line.get_color(), label=f"{data}, dense backbone")
    ax.set_xscale("log")
    ax.set_xlabel("backbone parameters")
    ax.set_ylabel("top-1 % of the new head")
    ax.set_title(f"{rows[0]['model']} backbone, frozen")
    ax.legend(fontsize=8)


def _plot_ratios(ax, rows: list[dict]) -> None:
    def dense_of(r: dict) -> tuple:  # one model, data and weights (the dense top-1 tells
        return r["model"], r.get("data", "cifar10"), r["dense_top1"]  # retrained weights apart)

    series: dict[str, list] = {}
    for r in rows:  # a line joins runs of one method and dense model at equal fine-tuning only
        how = "sensitivity CP" if r.get("sensitivity") else r["method"]
        length = f"{r['epochs']} ep" if r.get("epochs") else f"{r.get('steps')} steps"
        tuning = ("not fine-tuned" if not (r.get("epochs") or r.get("steps")) else
                  f"{length}, lr {r['lr']:g}" if r.get("lr") is not None else
                  f"{length}, default lr")
        model, data, dense = dense_of(r)
        series.setdefault(f"{model} on {data} ({dense:.2f}%) {how} ({tuning})", []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["params_x"])
        ax.plot([r["params_x"] for r in rs], [r["after_top1"] for r in rs], "o-", label=label)
    for _, _, dense in sorted({dense_of(r) for r in rows}):
        ax.axhline(dense, ls="--", lw=1, color="grey")
        ax.axhline(dense - 1, ls=":", lw=1, color="grey")
    ax.set_xscale("log")
    # the ratios themselves as ticks, not powers of ten (a log axis printed 2x10^1)
    ticks = []
    for t in sorted({round(r["params_x"]) for r in rows}):
        if not ticks or t > 1.25 * ticks[-1]:  # (CP's 9x beside 8x: one label)
            ticks.append(t)
    if len(ticks) <= 12:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ticks, labels=[f"{t}x" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("fewer parameters (x)")
    ax.set_ylabel("top-1 % after fine-tuning")
    ax.set_title("dense dashed, 1 point below dotted")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
