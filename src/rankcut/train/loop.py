"""``finetune``: the training loop, on one device or under torchrun, with exact resume."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .._fingerprint import model_fingerprint
from .._modes import (
    FORWARD_ERRORS,
    as_path,
    available_device,
    check_module,
    eval_mode,
    forward_on,
    logits_of,
    sum_dtype,
)
from ..atomic import atomic_path, file_target_problem, folder_target_problem
from ..layers import FactorizedLayer
from ..profile import MEMORY_FORMATS, suits_channels_last
from . import checkpoint as ckpt
from . import distributed as dist_util
from .batches import as_data, fetch, split_batch, to_device
from .evaluation import evaluate, unwrap
from .losses import check_targets, training_loss
from .teacher_cache import TeacherCache

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
# Fine-tuning rates: a tenth of the usual from-scratch peak (SGD 0.1 on CIFAR, AdamW 1e-3).
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
# SGD: the 5e-4 the CIFAR ResNets and the VGG-11 here were trained with; AdamW: PyTorch's 1e-2.
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}


@dataclass
class TrainResult:
    """What ``finetune`` returns. ``model`` is the trained model (not wrapped, on the training
    device); ``history`` holds every logged entry (the lines of the JSON-lines log); ``final``
    the last training and validation figures; ``steps`` the optimizer steps taken in all;
    ``stopped``: True when the callback stopped the run before its end (resume to finish it)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    checkpoint: Path | None = None
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "final": self.final, "steps": self.steps,
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "stopped": self.stopped}


def factorized_parameters(model: nn.Module, parts: Iterable[str] | None = None) -> list[str]:
    """Names of the parameters inside rankcut's factorized layers, for ``freeze=``.

    ``parts`` keeps only the named children of each layer (``"first"``, ``"core"``, ``"last"``
    of Tucker-2 and SVD layers; ``"pointwise_in"``, ``"depthwise"``, ``"pointwise_out"`` of CP;
    ``"first"``, ``"second"`` of low-rank Linear). E.g. ``freeze=factorized_parameters(model,
    ["first", "last"])`` trains only the Tucker cores (and everything outside factorized layers).
    """
    wanted = None if parts is None else set([parts] if isinstance(parts, str) else parts)
    names, seen_parts = [], set()
    for prefix, module in model.named_modules():
        if not isinstance(module, FactorizedLayer):
            continue
        for name, _ in module.named_parameters():
            part = name.split(".", 1)[0]
            seen_parts.add(part)
            if wanted is None or part in wanted:
                names.append(f"{prefix}.{name}" if prefix else name)
    if wanted is not None and wanted - seen_parts:
        raise ValueError(f"parts: {sorted(wanted - seen_parts)} name no child of a factorized "
                         f"layer in this model (its layers have {sorted(seen_parts)})")
    return names


def _frozen_names(model: nn.Module, freeze) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    if freeze is None:
        return set()
    if callable(freeze):
        return {n for n in names if freeze(n)}
    patterns = [freeze] if isinstance(freeze, str) else list(freeze)
    frozen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"freeze: expected parameter-name patterns or a predicate, got "
                             f"{type(pattern).__name__}")
        hit = {n for n in names if fnmatchcase(n, pattern) or fnmatchcase(n, pattern + ".*")}
        if not hit:
            raise ValueError(f"freeze: pattern {pattern!r} matches no parameter of the model "
                             f"(names look like {names[:3]})")
        frozen |= hit
    return frozen


def _lr_factor(lr_schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step k (0-based): a linear warm-up
    over ``warmup`` steps, then constant or a cosine decay that reaches zero after ``total``."""
    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        if lr_schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))

    return factor


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format


def _layouts(module: nn.Module | None) -> list[tuple]:
    """Each 4-D parameter and buffer of ``module`` with its memory format (what
    ``module.to(memory_format=...)`` changes), to put back after training: a parameter
    itself (``.to`` keeps it and changes its data), a buffer by its module and name (``.to``
    puts a new tensor in its place)."""
    if module is None:
        return []
    params = [(p, None, _format_of(p)) for p in module.parameters() if p.ndim == 4]
    buffers = [(m, name, _format_of(b)) for m in module.modules()
               for name, b in m._buffers.items() if b is not None and b.ndim == 4]
    return params + buffers


def _restore_layouts(layouts) -> None:
    with torch.no_grad():
        for owner, name, fmt in layouts:
            if name is None:  # a parameter
                if not owner.is_contiguous(memory_format=fmt):
                    owner.data = owner.data.contiguous(memory_format=fmt)
            else:
                b = owner._buffers.get(name)
                if b is not None and not b.is_contiguous(memory_format=fmt):
                    owner._buffers[name] = b.contiguous(memory_format=fmt)


def _inference_copy(teacher: nn.Module) -> nn.Module:
    """The teacher as it runs fastest without gradients: a copy with every BatchNorm folded into
    the layer before it (:func:`rankcut.fuse`; its outputs equal the teacher's in eval mode up
    to rounding), or a plain copy where it cannot be fused (the caller's teacher is never moved
    or changed; only where it cannot even be copied is it used as it is)."""
    from ..fuse import fuse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx's "cannot trace" is about the copy only
            return fuse(teacher, check=False)
    except Exception:  # any failure: the teacher as given is right, only slower
        try:
            return copy.deepcopy(teacher)
        except Exception:
            return teacher


def check_finetune_options(options: dict[str, Any], *, teacher: bool = False) -> None:
    """What :func:`finetune` refuses before its first step, checked on keyword arguments
    alone (no model, data or run): a setting out of its range, an unknown optimizer, a path it
    cannot write. ``teacher``: a teacher will be given with them (``rankcut.compress`` gives
    its own to distil). Keys finetune does not take are for the caller to refuse."""
    known = inspect.signature(finetune).parameters
    o = {k: p.default for k, p in known.items() if p.default is not inspect.Parameter.empty}
    o.update((k, v) for k, v in options.items() if k in known)
    if teacher and o.get("teacher") is None:
        o["teacher"] = nn.Identity()  # (only whether there is one is checked)
    _check_arguments(o)


def _check_arguments(o: dict[str, Any]) -> None:
    """Refuse settings outside their range before anything is moved, built or trained: a NaN
    learning rate would otherwise surface as a non-finite loss some steps later. The paths in
    ``o`` are expanded in place ("~/run" is the home folder's run, as in a shell, not a folder
    named "~")."""
    def number(name, low=None, high=None, low_open=False, high_open=False, optional=False):
        value = o[name]
        if value is None and optional:
            return
        ok = _is_number(value) and math.isfinite(float(value))
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            lo = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
            hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
            raise ValueError(f"{name}: expected a finite number in {lo or '(-inf, '}{hi}, "
                             f"got {value!r}")

    def integer(name, low, optional=False):
        value = o[name]
        if value is None and optional:
            return
        if not _is_int(value) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")

    number("lr", 0.0, low_open=True, optional=True)
    number("momentum", 0.0, 1.0, high_open=True)
    number("weight_decay", 0.0, optional=True)
    number("kd_alpha", 0.0, 1.0)
    number("kd_temperature", 0.0, low_open=True)
    number("label_smoothing", 0.0, 1.0, high_open=True)
    number("clip_grad_norm", 0.0, low_open=True, optional=True)
    integer("epochs", 1, optional=True)
    integer("steps", 1, optional=True)
    integer("batch_size", 1)
    integer("eval_batch_size", 1)
    integer("warmup_steps", 0)
    integer("num_workers", 0)
    if not _is_int(o["seed"]):
        raise ValueError(f"seed: expected an int, got {o['seed']!r}")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        value = o[name]
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive number of steps, got {value!r}")
    if o["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {o['lr_schedule']!r}")
    kind = o["optimizer"]
    if not callable(kind) and kind not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS} or a callable, got {kind!r}")
    if o["epochs"] is not None and o["steps"] is not None:
        raise ValueError("give epochs or steps, not both")
    if o["resume"] and o["checkpoint_dir"] is None:
        raise ValueError("resume=True needs checkpoint_dir")
    cache = o["teacher_cache"]
    if cache is not None:
        if not isinstance(cache, str | Path) or not str(cache):
            raise ValueError(f"teacher_cache: expected a folder (str or Path) or None, got "
                             f"{cache!r}")
        o["teacher_cache"] = cache = str(as_path(cache))
        if o["teacher"] is None:
            raise ValueError("teacher_cache: keeps a teacher's outputs; give a teacher")
        problem = folder_target_problem(cache)
        if problem is not None:
            raise ValueError(f"teacher_cache: {problem}")
    # where the run writes: refused before an epoch is trained, not when it is first written
    for name, problem_of in (("checkpoint_dir", folder_target_problem),
                             ("tensorboard", folder_target_problem),
                             ("log", file_target_problem)):
        where = o[name]
        if where is None:
            continue
        if not isinstance(where, str | os.PathLike) or not str(where):
            raise ValueError(f"{name}: expected a path (str or Path) or None, got {where!r}")
        o[name] = where = str(as_path(where))
        problem = problem_of(where)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    if o["memory_format"] not in (None, "auto", *MEMORY_FORMATS):
        raise ValueError(f"memory_format: expected None, 'auto', "
                         f"{', '.join(map(repr, MEMORY_FORMATS))}, got {o['memory_format']!r}")
    if o.get("teacher") is not None:
        check_module(o["teacher"], "teacher")
    if o.get("device") is not None:
        if not isinstance(o["device"], str | torch.device):
            raise ValueError(f"device: expected a device name (e.g. 'cpu', 'cuda') or a "
                             f"torch.device, got {o['device']!r}")
        try:
            available_device(str(o["device"]))
        except ValueError as err:
            raise ValueError(f"device: {err}") from None


# How an optimizer computes its update (not what it computes): kept as built when a checkpoint's
# optimizer state is loaded, so that a run resumes with this machine's fastest implementation.
IMPLEMENTATION_KEYS = ("fused", "foreach")


def _make_optimizer(optimizer, groups, lr, momentum, nesterov) -> torch.optim.Optimizer:
    """The optimizer, fused where torch has a fused kernel for the parameters' device (one pass
    over them instead of four: on the 2-core CPU an SGD step over seed 001's 103 M-parameter
    classifier layer takes 90 ms instead of 380 ms), else torch's default implementation."""
    if callable(optimizer):
        opt = optimizer(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError("optimizer: the callable must return a torch.optim.Optimizer")
        return opt
    if optimizer == "sgd":
        def make(**kw):
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kw)
    else:
        def make(**kw):
            return torch.optim.AdamW(groups, lr=lr, **kw)
    try:
        return make(fused=True)
    except (TypeError, RuntimeError, ValueError):  # an older torch, or no kernel for the device
        return make()


def _loader_generators(loader) -> list[torch.Generator]:
    """The generators of its own a DataLoader draws from (``generator=`` of the loader, of its
    sampler, of its batch sampler's sampler), each once, in that order."""
    found: list[torch.Generator] = []
    for owner in (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


class _Run:
    """One call of ``finetune``: the settings, the state that a checkpoint saves, the loop."""

    def __init__(self, model: nn.Module, train_data, opts: dict[str, Any]):
        self.o = opts
        self.env, self.device = dist_util.setup(opts["device"])
        self.model = unwrap(model)
        self.data = as_data(train_data, "train_data")
        self.step = self.epoch = self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self._setup_data()

    # ---- data order -------------------------------------------------------------------
    def _setup_data(self) -> None:
        o, env = self.o, self.env  # the settings were checked by finetune (_check_arguments)
        self.loader = self.data if isinstance(self.data, DataLoader) else None
        if self.loader is None:
            if o["batch_size"] % env.world_size:
                raise ValueError(f"batch_size {o['batch_size']} is not divisible by the "
                                 f"{env.world_size} processes: the global batch is split evenly")
            self.per_rank_batch = o["batch_size"] // env.world_size
            # One sampler for every world size: with one process it is a seeded permutation;
            # with W, rank r reads positions r, r+W, ... of the same permutation, so the W
            # per-process batches of a step together are the single-process batch.
            self.sampler = DistributedSampler(self.data, num_replicas=env.world_size,
                                              rank=env.rank, shuffle=o["shuffle"],
                                              seed=o["seed"], drop_last=True)
            self.steps_per_epoch: int | None = len(self.sampler) // self.per_rank_batch
            if self.steps_per_epoch == 0:
                raise ValueError(f"train_data: {len(self.data)} samples are fewer than one "
                                 f"batch of {o['batch_size']}")
        else:
            if env.active and not isinstance(self.loader.sampler, DistributedSampler):
                warnings.warn("train_data is a DataLoader without a DistributedSampler: every "
                              "process reads all of it, so the processes train on the same "
                              "batches. Pass a Dataset to have finetune shard it.", stacklevel=4)
            self.per_rank_batch = self.loader.batch_size
            try:
                self.steps_per_epoch = len(self.loader)
            except TypeError:
                self.steps_per_epoch = None
        epochs, steps = o["epochs"], o["steps"]
        if steps is not None:
            self.total = int(steps)
        else:
            if self.steps_per_epoch is None:
                raise ValueError("train_data: a loader without a length needs steps=")
            self.total = int(epochs if epochs is not None else 1) * self.steps_per_epoch
        if self.total < 1:
            raise ValueError(f"nothing to train: {self.total} steps")
        if o["warmup_steps"] >= self.total:  # (a warning: layerwise's short per-layer runs
            # share the final fine-tuning's options)
            warnings.warn(f"warmup_steps: {o['warmup_steps']} is not below the run's "
                          f"{self.total} steps: the rate never reaches lr", stacklevel=4)

    def _epoch_batches(self, epoch: int, start: int):
        if self.loader is None:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            b = self.per_rank_batch
            chunks = [order[i * b:(i + 1) * b] for i in range(start, self.steps_per_epoch)]
            # workers seeded per run, process and epoch (the same in a resumed run)
            seed = ((self.o["seed"] * 1_000_003 + self.env.rank) * 10_007 + epoch) % 2**63
            return fetch(self.data, chunks, num_workers=self.o["num_workers"],
                         pin_memory=self.device.type == "cuda", seed=seed)
        for sampler in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        own = _loader_generators(self.loader)
        if start == 0:
            # a loader draws its order and its workers' seeds from the global generators (or
            # from generators of its own) as the epoch begins: their state then is kept for a
            # resume mid-epoch
            self.epoch_rng = ckpt.capture_rng(self.device)
            self.epoch_loader_rng = [g.get_state() for g in own]
            return iter(self.loader)
        # A loader is used as given: resuming mid-epoch rebuilds its order from the generators
        # as they were when the epoch began, reads past the batches already seen, then puts the
        # generators back as they were at the checkpoint, so the next batch (and its random
        # augmentation) is the uninterrupted run's (a checkpoint without that state: the order
        # is drawn anew)
        at_checkpoint = ckpt.capture_rng(self.device)
        if self.epoch_rng is not None:
            ckpt.restore_rng(self.epoch_rng, self.device)
        if self.epoch_loader_rng is not None and len(self.epoch_loader_rng) == len(own):
            for g, state in zip(own, self.epoch_loader_rng, strict=True):
                g.set_state(state)  # (drawn from only as the epoch begins: left where replayed)
        batches = iter(self.loader)
        for _ in itertools.islice(batches, start):
            pass
        ckpt.restore_rng(at_checkpoint, self.device)
        return batches

    # ---- setup ------------------------------------------------------------------------
    def _setup_training(self) -> None:
        o, device = self.o, self.device
        kind = o["optimizer"]
        name = kind if isinstance(kind, str) else "sgd"
        lr = DEFAULT_LR[name] if o["lr"] is None else float(o["lr"])
        wd = DEFAULT_WEIGHT_DECAY[name] if o["weight_decay"] is None else float(o["weight_decay"])

        # what refuses the settings, found before the model moves (a refused run leaves the
        # caller's model where it was)
        frozen = _frozen_names(self.model, o["freeze"])
        # (Module.to keeps the Parameter objects: these are the ones trained after the move)
        named = [(n, p) for n, p in self.model.named_parameters()
                 if p.requires_grad and n not in frozen]
        if not named:
            raise ValueError("freeze: every parameter is frozen; nothing to train")
        if kind == "sgd" and o["nesterov"] and not o["momentum"]:
            raise ValueError("nesterov: needs a momentum above 0 (momentum=0 was given)")
        amp = o["amp"] if o["amp"] is not None else device.type == "cuda"
        if amp and device.type == "cuda" and any(p.dtype == torch.float16 for _, p in named):
            # (the loss scaler cannot unscale float16 gradients: torch's error, after a step)
            raise ValueError("amp: mixed precision trains float32 weights, and the model has "
                             "float16 ones; train it in float32 (model.float()) or pass "
                             "amp=False to train it in float16 as it is")
        self.model.to(device)
        self.teacher = None
        if o["teacher"] is not None:  # a copy goes to the device: the caller's stays put
            self.teacher = _inference_copy(o["teacher"]).to(device)
        # the weights' (and inputs') memory format while training; "auto" is decided on the
        # first batch (_choose_layout)
        self.layout = None
        self.targets_checked = False  # a batch's labels fit the model's outputs
        # under torchrun "auto" keeps the layout: DDP's gradient buckets take the parameters'
        # strides when the model is wrapped, before the first batch could be probed
        self.layout_pending = (o["memory_format"] == "auto" and not self.env.active
                               and suits_channels_last(self.model, self.teacher))
        if o["memory_format"] in MEMORY_FORMATS:
            self._set_layout(MEMORY_FORMATS[o["memory_format"]])
        for t in ("transform", "val_transform"):
            if isinstance(o[t], nn.Module):
                # a copy: the caller's stays where it is (compress applies it to the CPU
                # calibration batches of a later round or layer too)
                o[t] = copy.deepcopy(o[t]).to(device)

        for n, p in self.model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        self.params = [p for _, p in named]
        # No weight decay on biases and normalisation scales (1-D): decaying them regularises
        # nothing and shrinks BatchNorm's gains.
        groups = [{"params": [p for _, p in named if p.ndim > 1], "weight_decay": wd},
                  {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
        if callable(kind) and o["weight_decay"] is None:  # the callable's own decay stands
            del groups[0]["weight_decay"]
        groups = [g for g in groups if g["params"]]
        self.optimizer = _make_optimizer(kind, groups, lr, o["momentum"], o["nesterov"])
        if callable(kind):  # what the user's optimizer is, for a resume to compare: its class
            name = f"callable: {type(self.optimizer).__name__}"  # and groups' settings
            built = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                      if k != "params" and k not in IMPLEMENTATION_KEYS
                      and isinstance(v, int | float | bool | str | tuple | type(None))}
                     for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(o["lr_schedule"], self.total, o["warmup_steps"]))

        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.autocast = (lambda: torch.autocast(device.type, dtype=self.amp_dtype)) if amp \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        self.tcache = None
        if o["teacher_cache"] is not None:  # keyed by the teacher, autocast and process
            self.tcache = TeacherCache(o["teacher_cache"], self.teacher, tag=(
                f"|amp={self.amp_dtype if amp else None}|rank={self.env.rank}"))
        # loss sum, correct, samples, grad-norm sum: accumulated on the device between log lines
        self.window = torch.zeros(4, dtype=sum_dtype(device), device=device)
        self.window_steps = 0
        self.stopped = False  # by the callback, before the end
        self.epoch_rng = None  # the generators' state as the epoch began (a loader's order)
        self.epoch_loader_rng = None  # and those of the loader's own generators
        self.settings = {
            "total_steps": self.total, "batch_size": o["batch_size"],
            "world_size": self.env.world_size, "seed": o["seed"], "shuffle": o["shuffle"],
            "steps_per_epoch": self.steps_per_epoch, "optimizer": name,
            # the schedule: a run resumed at another rate would end where no run does
            "lr": lr, "lr_schedule": o["lr_schedule"], "warmup_steps": o["warmup_steps"],
            "train_size": None if self.loader is not None else len(self.data),
            # the precision it trains in (float16 with a loss scaler on CUDA by default, float32
            # on the CPU): a run resumed on the other kind of device would change it midway
            "amp": str(self.amp_dtype) if amp else None,
            # what each step computes: the optimizer's other settings (a resume would restore
            # the checkpoint's), the loss, what is trained and the teacher
            "weight_decay": wd, "momentum": o["momentum"], "nesterov": o["nesterov"],
            "label_smoothing": o["label_smoothing"], "kd_alpha": o["kd_alpha"],
            "kd_temperature": o["kd_temperature"], "clip_grad_norm": o["clip_grad_norm"],
            "frozen": sorted(frozen), "freeze_bn_stats": o["freeze_bn_stats"],
            # (hashing a teacher's weights takes about a second per 500 MB: only when kept)
            "teacher": (model_fingerprint(o["teacher"]) if o["teacher"] is not None
                        and o["checkpoint_dir"] is not None else None)}
        if callable(kind):
            self.settings["optimizer_groups"] = built
            del self.settings["lr"], self.settings["weight_decay"]  # (the callable's own)

    def _seed(self) -> None:
        seed = self.o["seed"] + self.env.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 (the global one user code draws from)
        random.seed(seed)

    # ---- checkpoints --------------------------------------------------------------------
    def _save(self) -> None:
        if self.tcache is not None:
            self.tcache.save()
        states = dist_util.gather({"rng": ckpt.capture_rng(self.device),
                                   "epoch_rng": self.epoch_rng,
                                   "epoch_loader_rng": self.epoch_loader_rng,
                                   "window": self.window.cpu(),
                                   "window_steps": self.window_steps}, self.env)
        if self.env.is_main:
            ckpt.write(self.o["checkpoint_dir"], {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "per_rank": states, "history": self.history, "settings": self.settings})
        self.saved_at = self.step

    def _load(self) -> bool:
        payload = ckpt.read(self.o["checkpoint_dir"])
        if payload is None:
            return False
        path = ckpt.path_in(self.o["checkpoint_dir"])
        ckpt.check_compatible(payload["settings"], self.settings, path)
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as err:
            raise ValueError(f"{path}: the checkpoint does not fit this model (pass the same "
                             f"architecture, e.g. the same compressed model): {err}") from None
        built = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g}
                 for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(payload["optimizer"])
        for group, flags in zip(self.optimizer.param_groups, built, strict=True):
            group.update(flags)  # the implementation built here, not the checkpoint's
        self._align_optimizer_state()  # (saved in the layout the run trained in then)
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        mine = payload["per_rank"][self.env.rank]
        ckpt.restore_rng(mine["rng"], self.device)
        self.epoch_rng = mine.get("epoch_rng")  # (checkpoints before it was kept: None)
        self.epoch_loader_rng = mine.get("epoch_loader_rng")
        self.window = mine["window"].to(self.device)
        self.window_steps = mine["window_steps"]
        self.step, self.epoch = payload["step"], payload["epoch"]
        self.batch_in_epoch = payload["batch_in_epoch"]
        self.history = list(payload["history"])
        self.saved_at = self.step
        # (validated at this step before the checkpoint: not again)
        val_steps = [e.get("step") for e in self.history if e.get("split") == "val"]
        self.validated_at = val_steps[-1] if val_steps else None
        return True

    # ---- logging ------------------------------------------------------------------------
    def _open_outputs(self, resumed: bool) -> None:
        o = self.o
        self.log_file = self.tb = self.bar = None
        if not self.env.is_main:
            return
        if o["log"] is not None:
            path = Path(o["log"])
            # Start the file afresh, or (resuming) from the entries the checkpoint holds: lines
            # a killed run wrote after its last checkpoint are dropped, not repeated.
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(e) + "\n" for e in self.history))
            self.log_file = path.open("a")
        if o["tensorboard"] is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard= was given but the tensorboard package is not "
                              "installed; logging to TensorBoard is skipped", stacklevel=3)
            else:
                self.tb = SummaryWriter(str(o["tensorboard"]),
                                        purge_step=self.step if resumed else None)
        if o["progress"]:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step",
                            dynamic_ncols=True)

    def _close_outputs(self) -> None:
        for thing in (self.log_file, self.tb, self.bar):
            if thing is not None:
                thing.close()

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()
        if self.tb is not None:
            for key, value in entry.items():
                if key not in ("split", "step", "epoch", "time") and isinstance(value, float):
                    self.tb.add_scalar(f"{entry['split']}/{key}", value, entry["step"])
        if self.bar is not None:
            self.bar.set_postfix({f"{entry['split']}_{k}": f"{entry[k]:.4g}"
                                  for k in ("loss", "accuracy")})

    def _epoch_position(self) -> float:
        if self.steps_per_epoch:
            return round(self.step / self.steps_per_epoch, 4)
        return float(self.epoch)

    def _log_train(self, lr: float) -> None:
        window = dist_util.all_sum(self.window.clone(), self.env)
        loss_sum, correct, count, norm_sum = window.tolist()
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.step}: lower lr, "
                                     "add warmup_steps or clip_grad_norm")
        entry = {"split": "train", "step": self.step, "epoch": self._epoch_position(),
                 "loss": loss, "accuracy": 100.0 * correct / count, "lr": lr,
                 "time": round(time.perf_counter() - self.t0, 3)}
        if self.o["clip_grad_norm"] is not None:
            entry["grad_norm"] = norm_sum / self.env.world_size / self.window_steps
        self._record(entry)
        self.window.zero_()
        self.window_steps = 0

    def _validate(self) -> None:
        o = self.o
        dist_util.broadcast_buffers(self.model, self.env)  # rank 0's, as checkpointed
        transform = o["val_transform"] if o["val_transform"] is not None else o["transform"]
        metrics = evaluate(self.model, o["val_data"], device=self.device, transform=transform,
                           batch_size=o["eval_batch_size"], num_workers=o["num_workers"],
                           distributed=self.env.active)
        self._record({"split": "val", "step": self.step, "epoch": self._epoch_position(),
                      "loss": metrics["loss"], "accuracy": metrics["top1"],
                      "top5": metrics["top5"], "n": metrics["n"],
                      "time": round(time.perf_counter() - self.t0, 3)})
        self.validated_at = self.step

    # ---- training -----------------------------------------------------------------------
    def _train_step(self, batch) -> float:
        o = self.o
        x, y = to_device(*split_batch(batch), self.device)
        if o["transform"] is not None:
            x = o["transform"](x)
        if self.layout_pending:
            self._choose_layout(x)
        if self.layout is not None and x.ndim == 4:
            x = x.contiguous(memory_format=self.layout)
        with self.autocast():
            # the model failing on the data, named (not where channels_last was asked for:
            # that forward's failure is the layout's, and stays torch's own)
            with (contextlib.nullcontext() if o["memory_format"] == "channels_last"
                  else forward_on(x, "train_data (after transform)"
                                  if o["transform"] is not None else "train_data")):
                logits = logits_of(self.net(x))
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = (self._teacher_logits(x) if self.tcache is None
                                      else self.tcache.outputs(x, self._teacher_logits))
        # every batch on the CPU; elsewhere the first only (the check reads two numbers from
        # the device: a synchronisation per step)
        if not self.targets_checked or self.device.type == "cpu":
            check_targets(logits, y)
            self.targets_checked = True
        loss = training_loss(logits, y, teacher_logits, label_smoothing=o["label_smoothing"],
                             kd_alpha=o["kd_alpha"], kd_temperature=o["kd_temperature"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = torch.zeros((), device=self.device)
        if o["clip_grad_norm"] is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, o["clip_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = float(self.optimizer.param_groups[0]["lr"])  # (a tensor for some optimizers)
        self.scheduler.step()
        with torch.no_grad():
            n, dtype = y.shape[0], self.window.dtype
            self.window += torch.stack([loss.detach().to(dtype) * n,
                                        (logits.argmax(1) == y).sum().to(dtype),
                                        torch.tensor(float(n), dtype=dtype, device=self.device),
                                        norm.detach().to(dtype)])
        self.window_steps += 1
        self.last_loss = loss.detach()
        return lr

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with forward_on(x, "teacher"):  # (a teacher that cannot take the inputs: named)
            return logits_of(self.teacher(x), "teacher")

    def _set_layout(self, fmt: torch.memory_format) -> None:
        self.layout = fmt
        for module in (self.model, self.teacher):
            if module is not None:
                module.to(memory_format=fmt)
        self._align_optimizer_state()

    def _align_optimizer_state(self) -> None:
        """Each optimizer state tensor shaped as its parameter in the parameter's layout: a
        fused kernel pairs a parameter's elements with its momentum's (or Adam's moments') by
        memory order, so a run resumed in another layout than its checkpoint's (or whose layout
        changed after its state was made) would update every weight with another's state."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return
        for p, state in optimizer.state.items():
            for key, v in state.items():
                if (isinstance(v, torch.Tensor) and v.shape == p.shape and v.ndim > 1
                        and v.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def _choose_layout(self, x: torch.Tensor) -> None:
        """memory_format="auto": channels_last (on the 2-core CPU 1.3-1.9x faster steps for
        factorized CNNs, and a faster teacher) unless the model's or the teacher's forward
        cannot take it (a ``.view`` of a channels_last activation); probed once, in eval mode
        without gradients on two of the first batch's inputs, so no statistics or random state
        change."""
        self.layout_pending = False
        if x.ndim != 4:
            return
        try:
            self._set_layout(torch.channels_last)
            with torch.no_grad(), eval_mode(self.model), self.autocast():
                for module in (self.model, self.teacher):
                    if module is not None:
                        module(x[:2].contiguous(memory_format=torch.channels_last))
        except FORWARD_ERRORS as err:  # (a model's own assert too, as forward_on's)
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            self._set_layout(torch.contiguous_format)  # the teacher's copy included
            _restore_layouts(self.layouts)
            self.layout = None
            # the model (or the teacher) cannot take these inputs at all (uint8 images,
            # another size, another dtype), in any layout: said as that (by the forwards
            # below), not as a layout problem
            with torch.no_grad(), eval_mode(self.model), self.autocast():
                with forward_on(x[:2], "train_data"):
                    self.model(x[:2])
                if self.teacher is not None:
                    with forward_on(x[:2], "teacher"):
                        self.teacher(x[:2])
            warnings.warn(f"memory_format='auto': a forward fails on channels_last "
                          f"inputs ({str(err).splitlines()[0]}); training in its own layout",
                          stacklevel=6)  # finetune's caller

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def run(self) -> TrainResult:
        o = self.o
        # restored at the end: freezing and the train/eval switches are for this run only
        flags = [(m, m.training) for m in self.model.modules()]
        grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.layouts = _layouts(self.model) + _layouts(o["teacher"])
        self.log_file = self.tb = self.bar = self.tcache = None  # (set up in the try below)
        try:
            self._setup_training()
            self._seed()
            self.saved_at = self.validated_at = None
            resumed = bool(o["resume"]) and o["checkpoint_dir"] is not None and self._load()
            self.net = self.model
            if self.env.active:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self.t0 = time.perf_counter()
            self._open_outputs(resumed)
            teacher_ctx = eval_mode(self.teacher) if self.teacher is not None \
                else contextlib.nullcontext()
            with teacher_ctx:
                self._loop()
        finally:
            if self.tcache is not None:  # what was computed is kept, even if the run failed
                self.tcache.save()
            self._close_outputs()
            for m, training in flags:
                m.training = training
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)
            _restore_layouts(self.layouts)
        return self._result()

    def _train_mode(self) -> None:
        self.model.train()
        if self.o["freeze_bn_stats"]:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _loop(self) -> None:
        o = self.o
        self._train_mode()
        stop = self.step >= self.total
        while not stop:
            seen = 0
            for batch in self._epoch_batches(self.epoch, self.batch_in_epoch):
                seen += 1
                lr = self._train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                if self.bar is not None:
                    self.bar.update(1)
                last = self.step >= self.total
                epoch_end = (self.steps_per_epoch is not None
                             and self.batch_in_epoch >= self.steps_per_epoch)
                if self._due(o["log_every"]) or last:
                    self._log_train(lr)
                if o["val_data"] is not None and (last or self._due(o["eval_every"]) or (
                        o["eval_every"] is None and epoch_end)):
                    self._validate()
                if epoch_end:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if o["checkpoint_dir"] is not None and (
                        last or self._due(o["checkpoint_every"])
                        or (o["checkpoint_every"] is None and epoch_end)):
                    self._save()
                if o["callback"] is not None:
                    wants = bool(o["callback"]({
                        "step": self.step, "epoch": self._epoch_position(),
                        "loss": self.last_loss,
                        "model": self.model, "optimizer": self.optimizer}))
                    if dist_util.any_true(wants, self.env, self.device) and not last:
                        stop = self.stopped = True
                        if o["checkpoint_dir"] is not None and self.saved_at != self.step:
                            self._save()
                        if self.window_steps:
                            self._log_train(lr)
                        if o["val_data"] is not None and self.validated_at != self.step:
                            self._validate()
                        break
                if last:
                    stop = True
                    break
                if epoch_end:  # the next epoch draws a new order
                    break
            else:
                # (a loader without a length resumed where it had ended: it yields nothing, and
                # the next epoch begins)
                if seen == 0 and self.batch_in_epoch == 0:
                    raise ValueError(f"train_data yielded no batch in epoch {self.epoch}")
                if self.steps_per_epoch is not None:  # (a sized epoch ends by its count)
                    raise ValueError(
                        f"train_data yielded {self.batch_in_epoch} batches in epoch "
                        f"{self.epoch}, but its len() says {self.steps_per_epoch}: a loader "
                        "whose length overstates its batches (an IterableDataset's __len__ "
                        "counting what it filters out?)")
                # a loader without a length ran out: the epoch's end, validated (as of the
                # next epoch, as a sized one's end is) and checkpointed, also where a resumed
                # run found nothing left of the epoch
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if (o["val_data"] is not None and o["eval_every"] is None
                        and self.validated_at != self.step):
                    self._validate()
                if o["checkpoint_dir"] is not None and o["checkpoint_every"] is None:
                    self._save()
        if self.env.active:
            dist_util.broadcast_buffers(self.model, self.env)  # one model on every process
            dist_util.barrier(self.env)

    def _result(self) -> TrainResult:
        final: dict[str, Any] = {"step": self.step, "epoch": self._epoch_position()}
        for entry in self.history:
            prefix = entry["split"]
            for key in ("loss", "accuracy", "top5", "n"):
                if key in entry:
                    final[f"{prefix}_{key}"] = entry[key]
        if self.tcache is not None:
            final["teacher_cache"] = {"hits": self.tcache.hits, "misses": self.tcache.misses}
        path = None
        if self.o["checkpoint_dir"] is not None:
            path = ckpt.path_in(self.o["checkpoint_dir"])
        return TrainResult(self.model, self.history, final, self.step, path, self.stopped)


def finetune(model: nn.Module, train_data, *, epochs: int | None = None,
             steps: int | None = None, batch_size: int = 128, optimizer="sgd",
             lr: float | None = None, momentum: float = 0.9, nesterov: bool = False,
             weight_decay: float | None = None, lr_schedule: str = "cosine",
             warmup_steps: int = 0,
             label_smoothing: float = 0.0, clip_grad_norm: float | None = None,
             amp: bool | None = None, freeze=None, freeze_bn_stats: bool = False,
             teacher: nn.Module | None = None, kd_alpha: float = 0.5,
             kd_temperature: float = 4.0, transform: Callable | None = None, val_data=None,
             val_transform: Callable | None = None, eval_every: int | None = None,
             eval_batch_size: int = 256, device=None, seed: int = 0,
             shuffle: bool = True, num_workers: int = 0, checkpoint_dir=None,
             checkpoint_every: int | None = None, resume: bool = False, log=None,
             log_every: int = 50, tensorboard=None, progress: bool = True,
             memory_format: str | None = "auto", teacher_cache=None,
             callback: Callable[[dict], Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` (in place) on ``train_data``; see docs/training.md.

    ``train_data`` is a Dataset (read in a seeded order that a resumed run reproduces exactly;
    a DistributedSampler shards it under torchrun), a DataLoader (used as given), or an
    (inputs, targets) pair of tensors. Training runs ``epochs`` epochs (default 1) or ``steps``
    optimizer steps; ``batch_size`` is the global batch, split evenly over the processes. The
    last incomplete batch of an epoch is dropped (each epoch reshuffles).

    Loss: cross-entropy with ``label_smoothing``; with a ``teacher`` (run in eval mode without
    gradients) ``(1 - kd_alpha) * CE + kd_alpha * T² KL(teacher/T ‖ student/T)``.
    ``teacher_cache``: a folder where the teacher's outputs are kept, keyed by its weights and
    the exact input batch, so that later runs on the same batches (same data, seed and
    augmentation: the runs of one experiment) do not compute them again
    (:mod:`rankcut.train.teacher_cache`).
    ``optimizer``: "sgd" (lr 0.01, weight decay 5e-4, ``momentum``), "adamw" (lr 1e-4, weight
    decay 0.01) or a callable taking the parameter groups (the weights' group carries
    ``weight_decay`` only when it is given here, so the callable's own stands); biases and norm
    scales get no weight decay. ``lr_schedule`` (the learning rate's; not to be confused with
    :func:`rankcut.compress`'s ``schedule``): "cosine" (to zero) or "constant", after
    ``warmup_steps`` of linear warm-up. ``freeze``: parameter-name glob patterns (a pattern
    also matches the parameters below a module name) or a predicate on names; frozen
    parameters are not updated. Every setting is checked before any work (a ValueError names
    the one out of range: ``lr`` must be finite and > 0, ``momentum`` in [0, 1), ...).
    ``transform`` is applied to each batch of inputs on the device (``val_transform``, default
    ``transform``, to validation batches). ``amp``: autocast (+ GradScaler with float16) —
    default on for CUDA, off on the CPU. ``memory_format``: the layout of the 4-D weights (the
    model's and the teacher's) and inputs while training, "channels_last" or "contiguous";
    "auto" (default): channels_last for a model with convolutions, unless a probe forward on the
    first batch fails in it (then the model's own layout, with a warning); None: as they are.
    The weights are put back in their own layout afterwards.

    ``checkpoint_dir`` with ``checkpoint_every`` steps (default: every epoch) writes
    ``last.pt`` atomically; ``resume=True`` continues from it (or starts afresh when there is
    none) and ends where an uninterrupted run would. ``log``: JSON-lines file, one entry per
    ``log_every`` steps and per validation. ``callback(info)`` runs after every step; returning
    True stops the run (after a checkpoint, so it can be resumed).

    The model's train/eval flags and ``requires_grad`` flags are restored afterwards; the model
    and teacher stay on the training device. Returns a :class:`TrainResult`.
    """
    opts = {k: v for k, v in locals().items() if k not in ("model", "train_data")}
    check_module(model)
    _check_arguments(opts)  # (and the paths in it expanded)
    # NumPy numbers, accepted, as Python's: they are kept in checkpoints (which load only plain
    # types) and seed Python's random module
    opts = {k: v.item() if isinstance(v, np.generic) else v for k, v in opts.items()}
    if val_data is not None:
        opts["val_data"] = as_data(val_data, "val_data")
        if not isinstance(opts["val_data"], DataLoader) and len(opts["val_data"]) == 0:
            raise ValueError("val_data: no samples to evaluate on")
    # settings that would be ignored: said
    for name, value, other, given in (
            ("checkpoint_every", checkpoint_every, "checkpoint_dir", checkpoint_dir),
            ("eval_every", eval_every, "val_data", val_data),
            ("val_transform", val_transform, "val_data", val_data)):
        if value is not None and given is None:  # (a warning: settings shared by runs with
            # and without it, as a resumed run's reference, are fine)
            warnings.warn(f"{name} without {other}: it does nothing", stacklevel=2)
    if isinstance(train_data, DataLoader):
        own = {"batch_size": train_data.batch_size, "shuffle": None, "num_workers":
               train_data.num_workers}
        for name, value, default in (("batch_size", batch_size, 128), ("shuffle", shuffle, True),
                                     ("num_workers", num_workers, 0)):
            if value != default and value != own[name]:
                raise ValueError(f"{name}: train_data is a DataLoader, which batches itself; "
                                 f"set {name} on the DataLoader, or pass its Dataset")
    return _Run(model, train_data, opts).run()
