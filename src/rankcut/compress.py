"""``rankcut.compress``: plan, apply and fine-tune, on one of three schedules.

- ``one_shot`` (Kim et al.; seed 002): plan the whole model, apply every layer at once, then
  fine-tune (``epochs`` / ``steps``).
- ``layerwise`` (Astrid & Lee; seed 000, done right): plan once, then factorize one layer at a
  time in forward order, fine-tuning ``steps_per_layer`` steps after each, the last layer
  included (layer i's steps draw their batches with the fine-tuning seed + i: a stage of a few
  steps restarts its sampler, and with one seed every layer would train on the same first
  batches). Data-aware layers take their input statistics from the model as compressed and
  fine-tuned so far, and are fitted to their own dense outputs on them (not sequentially
  toward the dense network's: the fine-tuning between layers does that work). Forward order is
  read on ``example_inputs``; a model with several inputs goes in the plan's order.
- ``multistage`` (MUSCO): ``rounds`` rounds toward the target along a geometric path
  (round i keeps ``fraction ** (i / rounds)`` of the cost), fine-tuning between rounds. Each round
  folds the model's factorized layers back into dense ones (exactly: a factorized layer's
  product is a dense kernel of low rank) and plans that model afresh, so later rounds
  re-factorize the fine-tuned weights at lower rank. It stops early when the accuracy on
  ``val_data`` falls below ``min_accuracy`` and returns the last round that stayed above it,
  and when a later round's target cannot be planned (beyond the cheapest plan), returning the
  rounds done with ``met_target`` False.

Every schedule returns a model with the original architecture's layer names, so
``rc.save(result.model, out, plan=result.plan)`` and ``rc.load(original, out)`` work as usual.
Under ``torchrun`` the plan is made on rank 0 and sent to the other processes (timings, hence
latency-guarded plans, differ between processes), and fine-tuning runs distributed.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._fingerprint import model_fingerprint
from ._modes import as_inputs, as_path, check_module, on_model_device
from .atomic import atomic_path
from .calibrate import (
    TransformedBatches,
    calibration_batches,
    check_reusable,
    forward_order,
    reestimate_batchnorm,
)
from .defaults import COMPRESS
from .io import PLAN_FILE, WEIGHTS_FILE, load, load_plan, save, save_plan
from .layers import CPConv2d, FactorizedLayer, LowRankLinear
from .plans import Plan
from .select import (
    CandidateCache,
    SlowerThanDense,
    TargetUnreachable,
    parse_rank,
    parse_target,
)
from .select import plan as make_plan
from .select.planner import LATENCY_TOLERANCE
from .surgery import _check_plan, apply, set_submodule
from .train import DEFAULT_LR, check_finetune_options, evaluate, finetune
from .train.batches import as_data
from .train.checkpoint import FILENAME as CHECKPOINT_FILE
from .train.distributed import setup

SCHEDULES = ("one_shot", "layerwise", "multistage")
# SGD's default 0.01 breaks CP layers (their rank-1 terms cancel, and a step that upsets the
# balance costs a lot: ResNet-20 at 2x fewer MACs, mostly CP, fell from 89.6% to 57.4% in one
# epoch at 0.01 and rose to 91.7% at 0.001; experiments/finetune_resnet20.py). Lebedev et al.
# (2015) report the same instability. A model with CP layers gets this rate unless one is given.
CP_SGD_LR = 1e-3
# Training examples that BatchNorm statistics are re-estimated on after factorization.
BN_SAMPLES = 2048
# With checkpoints, the subfolder of checkpoint_dir that keeps one_shot's factorized model as it
# was before fine-tuning (rc.save's plan.json + model.safetensors), for resume=True.
START = "start"


# In a multistage round's folder: the round's target refused (so a resumed run stops there too)
REFUSED_FILE = "refused.json"


def _write_refusal(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"stopped": text}) + "\n")


def _saved(folder: Path) -> bool:
    """Whether ``rc.save`` finished writing into ``folder``: the weights, then the plan that
    records their hash (a run killed between the two left the plan stored before applying)."""
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / PLAN_FILE).is_file():
        return False
    return "weights_sha256" in load_plan(folder).meta


def _check_resumed(path: Path, meta: dict, method, target, rank=None) -> None:
    """Refuse to resume from the plan stored at ``path`` (its ``meta``, as the planner wrote
    it) where it was made for another method, rank rule or target than this call's: the run
    would go on with the old plan under the new settings."""
    rule = None if rank is None else str(parse_rank(rank))
    if "method" in meta and isinstance(method, str) and meta["method"] != method:
        theirs, ours = f"method {meta['method']!r}", f"method {method!r}"
    elif "target" in meta and (meta["target"] is None) != (target is None):
        theirs, ours = f"target {meta['target']}", f"target {target}"
    elif meta.get("target") is not None and target is not None and (
            parse_target(meta["target"])[0] != parse_target(target)[0]
            or not math.isclose(parse_target(meta["target"])[1], parse_target(target)[1],
                                rel_tol=1e-6)):
        theirs, ours = f"target {meta['target']}", f"target {target}"
    elif "rank" in meta and meta["rank"] != rule:
        theirs, ours = f"rank {meta['rank']}", f"rank {rule}"
    else:
        return
    raise ValueError(f"resume: {path} was planned for {theirs}, this call asks for {ours}; "
                     "resume with the same settings, or use a fresh checkpoint_dir")


# what a stored plan records of the dense model it was made for (its weights' SHA-256), which a
# resumed run compares: a checkpoint_dir of another model's run is not continued
MODEL_KEY = "planned_for_model"


def _planned_with(plan_kwargs: dict) -> dict:
    """The planning settings a stored plan was made with, as JSON (what a resumed run compares:
    other excluded layers, another min_params or solver option would go on with the old plan);
    the method, rank and target are checked by :func:`_check_resumed`, the data and objects
    (a cache, a latency table) are not compared. A setting not given counts as its default
    (:func:`rankcut.plan`'s), so naming a default is no change."""
    defaults = {k: p.default for k, p in inspect.signature(make_plan).parameters.items()
                if p.default is not inspect.Parameter.empty}
    out = {}
    for key, value in sorted({**defaults, **plan_kwargs}.items()):
        if key in ("method", "rank", "target", "calib_data", "progress", "cache",
                   "latency_table"):
            continue
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return out


def _layers(plan: Plan, model: nn.Module | None = None) -> dict:
    """Each active layer's (method, ranks, form); with ``model`` (the dense one), the ranks as
    the built layers have them (capped at the method's largest, as a stored plan records)."""
    def ranks(name, lp):
        if model is None:
            return tuple(lp.ranks)
        return tuple(lp.spec.capped(model.get_submodule(name), lp.ranks, lp.form))

    return {n: (lp.method, ranks(n, lp), lp.form) for n, lp in plan.active.items()}


def default_lr(model: nn.Module, optimizer="sgd") -> float | None:
    """The learning rate rankcut fine-tunes ``model`` at when none is given: ``CP_SGD_LR`` for
    SGD on a model with CP layers, else None (:func:`rankcut.train.finetune`'s own default)."""
    if optimizer == "sgd" and any(isinstance(m, CPConv2d) for m in model.modules()):
        return CP_SGD_LR
    return None


@dataclass
class CompressResult:
    """``model``: the compressed (and fine-tuned) model; ``plan``: what was applied (the last
    accepted round's for ``multistage``); ``stages``: one entry per stage (what was factorized,
    training figures, validation accuracy); ``met_target``: False when ``multistage`` stopped
    before the target, a fine-tuning callback stopped a stage (its ``train`` entry says
    ``"stopped": true``; the stages after it did not run), or a latency target's plan measured
    slower than its goal (``plan.meta["latency"]``: kept, with a warning, when it still runs
    faster than dense)."""

    model: nn.Module
    plan: Plan
    stages: list[dict[str, Any]] = field(default_factory=list)
    met_target: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "stages": self.stages,
                "met_target": self.met_target}


def _latency_met(plan: Plan) -> bool:
    """False where ``plan`` was made for a latency target and its whole-model timing missed
    the goal by more than :data:`~rankcut.select.planner.LATENCY_TOLERANCE` (the planner warns
    and keeps such a plan when it still runs faster than dense)."""
    timing = plan.meta.get("latency") or {}
    goal, ratio = timing.get("goal_ratio"), timing.get("ratio")
    # (within the planner's own tolerance of the goal: a timing's noise)
    return goal is None or ratio is None or ratio <= (1 + LATENCY_TOLERANCE) * goal


def _stopped(stage: dict) -> bool:
    """Whether the stage's fine-tuning was stopped by the callback before its end: compress
    then returns the model as it stands (``met_target`` False); ``resume=True`` with the same
    ``checkpoint_dir`` goes on from there."""
    return bool((stage.get("train") or {}).get("stopped"))


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every factorized layer replaced by its equivalent dense layer."""
    if isinstance(model, FactorizedLayer):  # the layer is the whole model
        return model.to_dense()
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if isinstance(m, FactorizedLayer)]
    for name in names:
        set_submodule(out, name, out.get_submodule(name).to_dense())
    return out


def _distributed() -> bool:
    """Whether this process is one of several in a torch.distributed group (torchrun)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_first_process(fn) -> None:
    """``fn()`` on rank 0 only when running distributed (the others wait for it; an error
    there is raised on every process, as :func:`_broadcast`'s)."""
    def done() -> None:
        fn()

    _broadcast(done)


# the errors whose kind a distributed run's other processes raise too (most specific first);
# any other error on rank 0 reaches them as a RuntimeError naming it
_ERRORS = (SlowerThanDense, TargetUnreachable, ValueError)


def _broadcast(fn):
    """``fn()`` (a picklable value) computed on rank 0 and handed to every process when running
    distributed, so that all of them take the same decision. An error on rank 0 is raised on
    every process (rank 0's own, the others' of the same kind where it is one of ``_ERRORS``:
    a sweep's unreachable target stays one), so none waits forever for a value."""
    import torch.distributed as dist

    if not _distributed():
        return fn()
    box: list = [None]
    failed = None
    if dist.get_rank() == 0:
        try:
            box = [("value", fn())]
        except Exception as err:  # sent before it is raised here
            failed = err
            kind = next((k for k in _ERRORS if isinstance(err, k)), type(err))
            box = [("error", (kind.__name__, str(err)))]
    dist.broadcast_object_list(box, src=0)
    if failed is not None:
        raise failed
    kind, payload = box[0]
    if kind == "error":
        name, text = payload
        known = next((k for k in _ERRORS if k.__name__ == name), None)
        if known is not None:
            raise known(text)
        raise RuntimeError(f"rank 0 failed: {name}: {text}")
    return payload


def _agreed(fn) -> Plan:
    """``fn()``'s plan, made on rank 0 only and broadcast when running distributed."""
    if not _distributed():
        return fn()
    return Plan.from_json(_broadcast(lambda: fn().to_json()))


def compress(model: nn.Module, example_inputs, *, method: str = COMPRESS["method"], rank=None,
             target=None, schedule: str = COMPRESS["schedule"], plan: Plan | None = None,
             calib_data=None, max_batches: int | None = None, train_data=None,
             epochs: int | None = None, steps: int | None = None,
             steps_per_layer: int | None = None, rounds: int = COMPRESS["rounds"],
             val_data=None, min_accuracy: float | None = None,
             distill: bool = COMPRESS["distill"],
             transform=None, plan_options: dict | None = None,
             finetune_options: dict | None = None, progress: bool = True,
             reestimate_bn: bool | None = None,
             sequential: bool | None = None) -> CompressResult:
    """Compress ``model`` (left untouched) on ``schedule`` (see the module docstring).

    Args:
        method, rank, target: as for :func:`rankcut.plan`; or give a ready ``plan`` (not with
            ``multistage``, which plans every round).
        calib_data: calibration batches for planning and data-aware layers.
        train_data: fine-tuning data (a Dataset, DataLoader or (inputs, targets)); without it,
            nothing is fine-tuned. ``epochs``/``steps``: fine-tuning after ``one_shot``, after
            each ``multistage`` round, and at the end of ``layerwise``; ``steps_per_layer``:
            after each layer of ``layerwise`` (layer i's at the fine-tuning seed + i).
        distill: fine-tune with the original model as teacher (knowledge distillation).
        transform: applied to every input batch when calibrating, training and evaluating
            (e.g. the normalisation the weights expect): to ``calib_data``'s inputs as well.
        val_data, min_accuracy: every schedule evaluates its result on ``val_data`` (a stage's
            ``"val"``; ``one_shot`` also before fine-tuning, ``"val_before"``); ``multistage``
            evaluates each round and stops when its top-1 (percent) falls below
            ``min_accuracy``.
        plan_options: more keyword arguments for :func:`rankcut.plan` (``allow_slower``,
            ``rank_multiple``, ``include``, ``exclude``, ``options``, ...).
        finetune_options: more keyword arguments for :func:`rankcut.train.finetune` (``lr``,
            ``batch_size``, ``optimizer``, ``checkpoint_dir``, ``log``, ...). With
            ``checkpoint_dir`` every stage can be resumed (``resume=True``): the plan is stored
            there (``plan.json``; ``one_shot``'s in ``start/``, a round's in ``round-<i>/``)
            and reused rather than made again; ``one_shot`` also keeps its factorized model
            from before fine-tuning in ``start/``, so a resumed run neither plans nor fits
            again; each ``layerwise`` layer and ``multistage`` round trains with its
            checkpoints in its own subfolder (``layer-<i>/``, ``round-<i>/``).
        sequential: fit each layer, in the order they run, to the inputs the factorized
            layers before it give it, with the dense layer's outputs as its target
            (:func:`rankcut.apply`'s ``sequential``); default: on with ``calib_data``.
            ``layerwise`` always fits each layer to the inputs of the model at hand.
        reestimate_bn: after factorizing, recompute the BatchNorm statistics on up to
            ``BN_SAMPLES`` examples of ``train_data`` (of a DataLoader, its first
            ``BN_SAMPLES // 128`` batches; augmented as the model was trained), before
            any fine-tuning; default: on when ``train_data`` is given and the layers were not
            fitted sequentially. (Sequential fitting already restores the dense layers'
            outputs, so the stored statistics hold: on the pretrained CIFAR-10 ResNet-20 at 3x
            fewer MACs, re-estimating after it costs 3 points. Calibration data is not used for
            this: without augmentation it moves the statistics away from the training ones;
            see :func:`rankcut.calibrate.reestimate_batchnorm`.)

    Both option dicts are checked against the functions they feed before any work starts. The
    defaults are :data:`rankcut.defaults.COMPRESS`, shared with the command line.
    """
    check_module(model)
    if plan is not None and not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut.Plan (rankcut.load_plan reads one from a "
                         f"file), got {type(plan).__name__}")
    if plan is not None and (rank is not None or target is not None):
        raise ValueError("plan: a ready plan cannot be combined with rank= or target= (the plan "
                         "already fixes every layer's method and ranks)")
    _check_options(plan_options, make_plan, "plan_options", taken=PLAN_OPTIONS_TAKEN)
    _check_options(finetune_options, finetune, "finetune_options",
                   taken=FINETUNE_OPTIONS_TAKEN)
    try:  # values too, before planning and fitting (finetune would refuse them after)
        check_finetune_options(finetune_options or {}, teacher=distill)
    except ValueError as err:
        raise ValueError(f"finetune_options: {err}") from None
    check_finetune_options({"epochs": epochs, "steps": steps})  # (one of them, each an int >= 1)
    if steps_per_layer is not None and (isinstance(steps_per_layer, bool) or not isinstance(
            steps_per_layer, int | np.integer) or steps_per_layer < 1):
        raise ValueError(f"steps_per_layer: expected an int >= 1, got {steps_per_layer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    for name, value in (("distill", distill), ("sequential", sequential),
                        ("reestimate_bn", reestimate_bn)):  # ("no" was read as on)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}: expected True, False or None, got {value!r}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform: expected a callable applied to each input batch, got "
                         f"{type(transform).__name__}")
    if schedule == "multistage" and (target is None or plan is not None):
        raise ValueError("schedule 'multistage': needs a target (and plans every round itself; "
                         "no plan=)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected an int >= 1, got {rounds!r}")
    if min_accuracy is not None and val_data is None:
        raise ValueError("min_accuracy: needs val_data to measure the accuracy on")
    if min_accuracy is not None and (
            isinstance(min_accuracy, bool) or not isinstance(min_accuracy, int | float)
            or not 1 < min_accuracy <= 100):
        raise ValueError(f"min_accuracy: expected top-1 in percent, above 1 and at most 100 "
                         f"(e.g. 90 for 90%), got {min_accuracy!r}")
    if val_data is not None:
        as_data(val_data, "val_data")  # (evaluated after planning and fitting: refused now)
    if min_accuracy is not None and schedule != "multistage":
        raise ValueError(f"min_accuracy: the floor of schedule 'multistage''s rounds; schedule "
                         f"{schedule!r} would ignore it")
    if sequential is not None and schedule == "layerwise":
        raise ValueError("sequential: schedule 'layerwise' fits each layer to the model at hand "
                         "(fine-tuned between layers); it would ignore it")
    if steps_per_layer is not None and schedule != "layerwise":
        raise ValueError(f"steps_per_layer: fine-tuning after each layer of schedule "
                         f"'layerwise'; schedule {schedule!r} would ignore it")
    tuning = [k for k, v in (("epochs", epochs), ("steps", steps),
                             ("steps_per_layer", steps_per_layer)) if v is not None]
    if tuning and train_data is None:
        raise ValueError(f"{tuning[0]}: fine-tuning needs train_data")
    if train_data is not None:
        as_data(train_data, "train_data")  # what finetune refuses, refused before any work
    if reestimate_bn and train_data is None:
        raise ValueError("reestimate_bn: needs train_data (examples distributed as in training)")
    if sequential and calib_data is None:
        raise ValueError("sequential: needs calib_data (the inputs each layer is fitted to)")
    if calib_data is not None:
        check_reusable(calib_data)
    if sequential is None:
        sequential = calib_data is not None
    if reestimate_bn is None:
        reestimate_bn = train_data is not None and (schedule == "layerwise" or not sequential)
    if train_data is not None and not tuning and not reestimate_bn:
        warnings.warn("train_data is not used: no epochs, steps or steps_per_layer to fine-tune "
                      "with, and no BatchNorm re-estimation (the layers are fitted sequentially "
                      "to calib_data; reestimate_bn=True asks for it)", stacklevel=2)
    if transform is not None and calib_data is not None:
        calib_data = TransformedBatches(calib_data, transform)
    setup()  # under torchrun: the process group exists before planning needs it
    job = _Job(model, example_inputs, dict(method=method, rank=rank, calib_data=calib_data,
                                           max_batches=max_batches, progress=progress,
                                           **(plan_options or {})),
               train_data, distill, transform, dict(finetune_options or {}), progress,
               reestimate_bn, sequential, val_data)
    job.start_afresh()
    if schedule == "one_shot":
        return job.one_shot(plan, target, epochs, steps)
    if schedule == "layerwise":
        return job.layerwise(plan, target, steps_per_layer, epochs, steps)
    return job.multistage(target, rounds, epochs, steps, min_accuracy)


# the arguments of rankcut.plan and rankcut.train.finetune that compress sets itself (not
# accepted in plan_options / finetune_options)
PLAN_OPTIONS_TAKEN = frozenset({"model", "example_inputs", "method", "rank", "target",
                                "calib_data", "max_batches", "progress"})
FINETUNE_OPTIONS_TAKEN = frozenset({"model", "train_data", "epochs", "steps", "teacher",
                                    "transform"})


def _check_options(options, fn, what: str, taken: frozenset[str]) -> None:
    """Refuse keys of ``options`` that ``fn`` does not take, or that compress sets itself."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"{what}: expected a dict of keyword arguments, got "
                         f"{type(options).__name__}")
    accepted = set(inspect.signature(fn).parameters) - taken
    unknown = sorted(set(options) - accepted)
    if unknown:
        own = [k for k in unknown if k in taken]
        hint = (f" ({', '.join(own)}: pass to rankcut.compress itself)" if own else "")
        raise ValueError(f"{what}: unknown keys {unknown} for {fn.__module__}.{fn.__name__}"
                         f"{hint}; accepted: {', '.join(sorted(accepted))}")


class _Job:
    def __init__(self, model, example_inputs, plan_kwargs, train_data, distill, transform,
                 finetune_options, progress, reestimate_bn=False, sequential=False,
                 val_data=None):
        self.model, self.x = model, example_inputs
        self.plan_kwargs = plan_kwargs
        self.train_data, self.transform = train_data, transform
        self.teacher = model if distill else None
        self.finetune_options = {"progress": progress, **finetune_options}
        self.progress = progress
        self.reestimate_bn = reestimate_bn
        self.sequential = sequential
        self.val_data = val_data
        ckpt = self.finetune_options.get("checkpoint_dir")
        self.folder = None if ckpt is None else as_path(ckpt, "checkpoint_dir")
        self.resume = bool(self.finetune_options.get("resume"))

    # ---- resuming: what each stage starts from is kept beside its training checkpoint -------
    def stored_plan(self, folder: Path | None, plan: Plan | None, make, target=None) -> Plan:
        """``plan``, or the one a resumed run stored in ``folder``, else ``make()`` (stored
        there when training checkpoints are kept, so a resumed run factorizes the same layers
        at the same ranks: a plan timed on the machine can differ between two calls). A stored
        plan made for another method or ``target`` than ``make`` would use is refused."""
        path = None if folder is None else folder / PLAN_FILE
        if plan is not None:  # (a layer it names that the model lacks: named, not a traceback)
            _check_plan(self.model, plan, weights=False)
        if path is not None and self.resume and path.is_file():
            stored = load_plan(path)
            try:  # a checkpoint_dir of another model's run
                _check_plan(self.model, stored, weights=False)
            except ValueError as err:
                raise ValueError(f"resume: {path} was planned for another model ({err}); "
                                 "use a fresh checkpoint_dir") from None
            then_model = stored.meta.get(MODEL_KEY)  # (plans stored before it: not compared)
            if then_model is not None and then_model != self.fingerprint:
                raise ValueError(f"resume: {path} was planned for a model with other weights "
                                 "(another model of the same architecture, or this one "
                                 "changed since); use a fresh checkpoint_dir")
            if plan is not None and _layers(plan, self.model) != _layers(stored, self.model):
                raise ValueError(f"resume: {path} holds another plan than the one given; "
                                 "resume with the same plan, or use a fresh checkpoint_dir")
            if plan is None:
                _check_resumed(path, stored.meta, self.plan_kwargs["method"], target,
                               self.plan_kwargs["rank"])
                then, now = stored.meta.get("planned_with"), _planned_with(self.plan_kwargs)
                if then is not None:  # (a plan stored before defaults were recorded)
                    then = _planned_with(then)
                changed = sorted(k for k in {*(then or {}), *now}
                                 if then is not None and then.get(k) != now.get(k))
                if changed:
                    raise ValueError(
                        f"resume: {path} was planned with other {', '.join(changed)} ("
                        + "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                                    for k in changed)
                        + "); resume with the same settings, or use a fresh checkpoint_dir")
            return stored
        if plan is None:
            plan = make()
            plan.meta["planned_with"] = _planned_with(self.plan_kwargs)
        if path is not None:
            _on_first_process(lambda: save_plan(self.recorded(plan), path))
        return plan

    def recorded(self, plan: Plan) -> Plan:
        """A copy of ``plan`` (the caller's is left as given) that records the dense model's
        fingerprint, as a checkpoint folder stores it (:data:`MODEL_KEY`)."""
        kept = Plan.from_json(plan.to_json())
        kept.meta[MODEL_KEY] = self.fingerprint
        return kept

    @cached_property
    def fingerprint(self) -> str:
        """The dense model's fingerprint (its weights' SHA-256), once per call of compress: the
        model is not changed by it, and every stage's stored plan records it."""
        return model_fingerprint(self.model)

    def start_afresh(self) -> None:
        """Without ``resume``: what an earlier run left in ``checkpoint_dir`` under the names
        compress's stages write there (``start/``, ``layer-<i>/``, ``round-<i>/``, the final
        ``last.pt``) is removed before this run writes any, so a later resume of this run
        never reads the earlier run's stages. Other files are kept (a ``plan.json`` there may
        be the user's; layerwise's own is written over when it plans)."""
        if self.folder is None or self.resume or not self.folder.is_dir():
            return
        ours = {CHECKPOINT_FILE}

        def clear() -> None:
            for path in self.folder.iterdir():
                if path.is_dir() and (path.name == START
                                      or re.fullmatch(r"(layer|round)-\d+", path.name)):
                    shutil.rmtree(path)
                elif path.is_file() and path.name in ours:
                    path.unlink()

        _on_first_process(clear)

    def checkpointed(self, name: str | None) -> dict:
        """Fine-tuning options whose checkpoints go to the stage's own subfolder ``name`` of
        ``checkpoint_dir`` (None: the folder itself), so stages do not resume each other's;
        likewise a ``log`` file (``LOG-NAME.SUFFIX`` beside it) and a ``tensorboard`` folder
        (its subfolder ``name``): each stage writes its own, none starts another's afresh."""
        options = dict(self.finetune_options)
        if name is None:
            return options
        if self.folder is not None:
            options["checkpoint_dir"] = str(self.folder / name)
        if options.get("log") is not None:
            log = Path(options["log"])
            options["log"] = str(log.with_name(f"{log.stem}-{name}{log.suffix}"))
        if options.get("tensorboard") is not None:
            options["tensorboard"] = str(Path(options["tensorboard"]) / name)
        return options

    def validate(self, model, stage: dict, key: str = "val") -> None:
        if self.val_data is not None:
            stage[key] = evaluate(model, self.val_data, transform=self.transform)

    def repair_bn(self, model) -> dict | None:
        """BatchNorm statistics recomputed on training examples (see ``reestimate_bn``)."""
        if not self.reestimate_bn:
            return None
        # (an (inputs, targets) pair as the Dataset finetune reads it)
        data = as_data(self.train_data, "train_data")
        # a seeded random draw, in a random order: examples in their own order may be a class
        # or two per batch (an image tree is sorted by class), and the statistics average the
        # batches' variances (a DataLoader is read as it shuffles)
        if not isinstance(data, DataLoader):
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
            data = Subset(data, pick[:BN_SAMPLES].tolist())
        batches = calibration_batches(data, BN_SAMPLES // 128, transform=self.transform,
                                      batch_size=128)  # (read once, streamed)
        count = reestimate_batchnorm(model, batches)
        return {"batchnorms": count} if count else None

    def plan(self, target, model=None, **overrides) -> Plan:
        """Rank 0's plan of ``model`` (default: the dense one) for ``target``, with the job's
        planning options (``overrides`` replacing some)."""
        model = model or self.model
        # (a later round's model is where fine-tuning left it, e.g. on the GPU)
        x = on_model_device(model, self.x)
        return _agreed(lambda: make_plan(model, x, target=target,
                                         **{**self.plan_kwargs, **overrides}))

    def tune(self, model, epochs=None, steps=None, folder: str | None = None,
             draw: int = 0) -> dict | None:
        """Fine-tune ``model`` (a stage of the schedule); ``draw``: an offset to the seed, so
        that a stage of a few steps reads other batches (and augmentations) than the stages
        before it (each stage's sampler restarts its epoch from its seed)."""
        if self.train_data is None or (epochs is None and steps is None):
            return None
        options = self.checkpointed(folder)
        if draw:
            options["seed"] = options.get("seed", 0) + draw
        if options.get("lr") is None:  # (None: the default, as finetune reads it)
            lr = default_lr(model, options.get("optimizer", "sgd"))
            if lr is not None:
                options["lr"] = lr
        start = time.perf_counter()
        result = finetune(model, self.train_data, epochs=epochs, steps=steps,
                          teacher=self.teacher, transform=self.transform, **options)
        # the rate it trained at (finetune's default for the optimizer when none was set)
        lr = options.get("lr", DEFAULT_LR.get(str(options.get("optimizer", "sgd"))))
        return {"steps": result.steps, "final": result.final, "lr": lr,
                "seconds": round(time.perf_counter() - start, 1),
                **({"stopped": True} if result.stopped else {})}

    def checks_weights(self, target) -> bool:
        """Whether :meth:`weights_checked` will compare plans: compress plans with loss-aware
        weights by default (calibration data, a params or MACs target, ``loss_aware`` not
        given) and fits sequentially. Not for a latency target, whose plans are timed against
        their goal: the nearer model could be the one that misses it."""
        return (target is not None and self.plan_kwargs.get("calib_data") is not None
                and self.plan_kwargs.get("loss_aware") is None and bool(self.sequential)
                and parse_target(target)[0] != "latency")

    def weights_checked(self, plan: Plan, small: nn.Module, target) -> tuple[Plan, nn.Module]:
        """A loss-aware plan (``plan``, applied sequentially: ``small``) against the plan made
        without the damage weights, applied the same way: the one whose applied model's
        outputs are the nearer the dense model's on the calibration inputs (mean KL,
        :func:`rankcut.select.damage.output_damage`) is kept. The weights are measured one
        layer at a time at one error each; at deep compression they can send the budget the
        wrong way (VGG-11-BN, Tucker-2 at 32x fewer params: 54.87% top-1 weighted, 78.37%
        unweighted; at 45x and 64x the weighted plans win; the KL of the applied models ranked
        all three pairs as their top-1 did: docs/planning.md). Only where
        :meth:`checks_weights`; ``meta["loss_aware_check"]`` records what was compared. The
        unweighted plan's own warnings are shown only if it is kept; where it cannot be made
        (e.g. the latency guard, timing it afresh, finds it slower than dense) the weighted
        plan is kept and the reason recorded. Under torchrun every process fits both plans
        and keeps rank 0's choice."""
        if ("damage_weights" not in plan.meta or "loss_aware_check" in plan.meta
                or not self.checks_weights(target)):
            return plan, small
        from .select import damage

        record: dict[str, Any] = {"kept": "weighted"}
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                plain = self.plan(target, loss_aware=False)
            except _ERRORS as err:
                plain, record["unweighted"] = None, f"not planned: {err}"
        if plain is not None and _layers(plain) != _layers(plan):
            other = apply(self.model, plain, calib_data=self.plan_kwargs["calib_data"],
                          max_batches=self.plan_kwargs["max_batches"], progress=self.progress,
                          sequential=True)
            record["damage"] = _broadcast(lambda: damage.output_damage(
                self.model, {"weighted": small, "unweighted": other},
                self.plan_kwargs["calib_data"], max_batches=self.plan_kwargs["max_batches"]))
            if record["damage"]["unweighted"] < record["damage"]["weighted"]:
                plain.meta["planned_with"] = plan.meta.get("planned_with")
                plan, small, record["kept"] = plain, other, "unweighted"
                for w in said:  # (the kept plan's warnings; the discarded one's are dropped)
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        plan.meta["loss_aware_check"] = record
        return plan, small

    def one_shot(self, plan, target, epochs, steps) -> CompressResult:
        tuning = self.train_data is not None and (epochs is not None or steps is not None)
        folder = self.folder / START if self.folder is not None and tuning else None
        start = time.perf_counter()
        if folder is not None and self.resume and _saved(folder):
            # resumed: the factorized model as it was before fine-tuning (plan, weights, and
            # the BatchNorm statistics), not planned and fitted again
            plan = self.stored_plan(folder, plan, None, target)
            small = load(self.model, folder)
            stage = {"stage": "one_shot", "layers": list(plan.active), "resumed": True}
        else:
            given = plan
            # the loss-aware check's second plan reuses the first's candidates (not the input
            # moments: a wide layer's are GBs), the cache dropped after it
            own_cache = (given is None and self.checks_weights(target)
                         and self.plan_kwargs.get("cache") is None)
            if own_cache:
                self.plan_kwargs["cache"] = CandidateCache(max_moment_bytes=0)
            try:
                plan = self.stored_plan(folder, plan, lambda: self.plan(target), target)
                small = apply(self.model, plan, calib_data=self.plan_kwargs["calib_data"],
                              max_batches=self.plan_kwargs["max_batches"],
                              progress=self.progress, sequential=self.sequential)
                if given is None:
                    plan, small = self.weights_checked(plan, small, target)
            finally:
                if own_cache:
                    del self.plan_kwargs["cache"]
            stage = {"stage": "one_shot", "layers": list(plan.active),
                     "reestimated_bn": self.repair_bn(small)}
            if folder is not None:
                _on_first_process(lambda: save(small, folder, plan=self.recorded(plan)))
        stage["seconds"] = round(time.perf_counter() - start, 1)
        if tuning:
            self.validate(small, stage, "val_before")
        stage["train"] = self.tune(small, epochs, steps)
        self.validate(small, stage)
        return CompressResult(small, plan, [stage],
                              met_target=not _stopped(stage) and _latency_met(plan))

    def layerwise(self, plan, target, steps_per_layer, epochs, steps) -> CompressResult:
        plan = self.stored_plan(self.folder, plan, lambda: self.plan(target), target)
        small = copy.deepcopy(self.model)
        stages = []
        # in the order the layers run (a model may register them otherwise); each layer's
        # fine-tuning keeps its checkpoints in its own subfolder: a resumed run factorizes each
        # layer again (the same fit, from the same weights) and reads its finished fine-tuning
        # back
        inputs = as_inputs(self.x)  # (several inputs, or raw ones: the plan's order)
        order = (forward_order(small, list(plan.active), [inputs[0]], sequential=False)
                 if len(inputs) == 1 and inputs[0].is_floating_point() else list(plan.active))
        for i, name in enumerate(order, 1):
            lp = plan.layers[name]
            apply(small, Plan({name: lp}), inplace=True,
                  calib_data=self.plan_kwargs["calib_data"],
                  max_batches=self.plan_kwargs["max_batches"], sequential=False)
            stages.append({"stage": f"layer {name}", "layers": [name],
                           "train": self.tune(small, None, steps_per_layer, f"layer-{i}",
                                              draw=i)})
            if _stopped(stages[-1]):  # the later layers are fitted to where it would end
                done = Plan({n: plan.layers[n] for n in order[:i]}, meta=plan.meta)
                return CompressResult(small, done, stages, met_target=False)
        final = {"stage": "final", "layers": [], "reestimated_bn": self.repair_bn(small)}
        if epochs is not None or steps is not None:
            final["train"] = self.tune(small, epochs, steps)
        self.validate(small, final)
        if _stopped(final):
            return CompressResult(small, plan, [*stages, final], met_target=False)
        if final["reestimated_bn"] or "train" in final or "val" in final:
            stages.append(final)
        return CompressResult(small, plan, stages, met_target=_latency_met(plan))

    def multistage(self, target, rounds, epochs, steps, min_accuracy):
        kind, fraction = parse_target(target)
        current, accepted, stages = self.model, None, []
        for i in range(1, rounds + 1):
            keep = math.exp(math.log(fraction) * i / rounds)
            round_target = f"{kind}={keep:.6g}" if keep < 1 else None
            view = densify(current)
            folder = None if self.folder is None else self.folder / f"round-{i}"
            refused = None if folder is None else folder / REFUSED_FILE
            if refused is not None and self.resume and accepted is not None and \
                    refused.is_file():  # (the guard's verdict, from timings, is not redone)
                stages.append({"stage": f"round {i}", "target": round_target, "layers": [],
                               "stopped": json.loads(refused.read_text())["stopped"],
                               "resumed": True})
                return CompressResult(*accepted, stages, met_target=False)
            try:
                plan = self.stored_plan(folder, None,
                                        lambda v=view, t=round_target: self.plan(t, model=v),
                                        round_target)
            except TargetUnreachable as err:
                # a round's target out of reach (the final one, often): the rounds done stand
                if accepted is None:
                    raise
                stages.append({"stage": f"round {i}", "target": round_target,
                               "layers": [], "stopped": str(err)})
                if refused is not None:  # a resumed run ends here too
                    _on_first_process(partial(_write_refusal, refused, str(err)))
                return CompressResult(*accepted, stages, met_target=False)
            small = apply(view, plan, calib_data=self.plan_kwargs["calib_data"],
                          max_batches=self.plan_kwargs["max_batches"], progress=self.progress,
                          sequential=self.sequential)
            stage = {"stage": f"round {i}", "target": round_target,
                     "layers": list(plan.active), "reestimated_bn": self.repair_bn(small),
                     "train": self.tune(small, epochs, steps, f"round-{i}")}
            self.validate(small, stage)
            stages.append(stage)
            if _stopped(stage):  # the next round is planned from where this one would end
                return CompressResult(small, plan, stages, met_target=False)
            if min_accuracy is not None and stage["val"]["top1"] < min_accuracy:
                stage["stopped"] = (f"top-1 {stage['val']['top1']:.2f}% < min_accuracy "
                                    f"{min_accuracy}%")
                if accepted is None:  # even the first round fell below: return it, flagged
                    accepted = (small, plan)
                return CompressResult(*accepted, stages, met_target=False)
            accepted, current = (small, plan), small
        return CompressResult(*accepted, stages, met_target=_latency_met(accepted[1]))


def find_head(model: nn.Module, head: str | None = None) -> str:
    """The name of ``model``'s classifier that :func:`transfer` replaces: ``head`` checked (a
    module of ``model`` that is an nn.Linear or a factorized one), or by default its last such
    module; a ValueError naming ``head`` otherwise."""
    if head is None:
        inside = {f"{n}." for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
        linears = [n for n, m in model.named_modules()
                   if (type(m) is nn.Linear and not any(n.startswith(p) for p in inside))
                   or isinstance(m, LowRankLinear)]
        if not linears:
            raise ValueError("head: the model has no nn.Linear; name the classifier module")
        return linears[-1]
    if not isinstance(head, str) or not head:
        raise ValueError(f"head: expected the name of a module (e.g. 'fc'), got {head!r}")
    try:
        old = model.get_submodule(head)
    except AttributeError:
        raise ValueError(f"head: the model has no module {head!r}") from None
    if not isinstance(old, nn.Linear | LowRankLinear):
        raise ValueError(f"head: {head!r} is a {type(old).__name__}, expected an nn.Linear")
    return head


def transfer(model: nn.Module, train_data, num_classes: int, *, head: str | None = None,
             epochs: int | None = None, steps: int | None = None, transform=None,
             **finetune_options):
    """Seed 000's transfer scenario: a copy of ``model`` (e.g. a compressed backbone) with its
    classifier ``head`` (default: the last ``nn.Linear``, or a factorized one,
    ``LowRankLinear``, replaced whole) replaced by a fresh Linear to ``num_classes``,
    everything else frozen (BatchNorm statistics included), and the head trained on
    ``train_data`` for ``epochs`` or ``steps`` (default one epoch). The new head's initial
    weights are drawn from finetune's ``seed`` (0 by default), not from torch's global random
    state, so a run is repeatable. Returns the :class:`rankcut.train.TrainResult`
    (``.model``)."""
    check_module(model)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    if epochs is None and steps is None:
        epochs = 1
    out = copy.deepcopy(model)
    head = find_head(out, head)
    old = out.get_submodule(head)
    ref = old.weight if isinstance(old, nn.Linear) else old.second.weight
    bias = (old.bias if isinstance(old, nn.Linear) else old.second.bias) is not None
    own = sorted(k for k in ("freeze", "freeze_bn_stats", "teacher") if k in finetune_options)
    if own:  # (a second value of a keyword: Python's TypeError; a teacher of a fresh head)
        raise ValueError(f"{own[0]}: transfer trains the new head alone, its backbone frozen "
                         "with its BatchNorm statistics, and distils from no teacher; it takes "
                         "no " + ", ".join(own))
    seed = finetune_options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not (
            0 <= seed < 2**63):
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    with torch.random.fork_rng(devices=[]):  # the head's initial weights follow ``seed``
        torch.manual_seed(int(seed))  # (finetune's, 0 by default)
        new = nn.Linear(old.in_features, num_classes, bias=bias)
    set_submodule(out, head, new.to(ref.device, ref.dtype))
    prefix = head + "."
    return finetune(out, train_data, epochs=epochs, steps=steps, transform=transform,
                    freeze=lambda name: not name.startswith(prefix), freeze_bn_stats=True,
                    **finetune_options)
