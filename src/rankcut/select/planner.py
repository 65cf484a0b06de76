"""``rankcut.plan``: from a model, example inputs and a target to a Plan.

1. ``target_layers`` picks the eligible layers (the rest are recorded as skipped, with why).
2. One forward pass on ``example_inputs`` records each layer's input size (for MACs).
3. Each eligible layer gets error-versus-cost curves for the candidate methods (``method="auto"``:
   channel SVD, spatial SVD, CP-3, CP-4 and Tucker-2 for a k x k convolution; SVD for Linear
   and 1x1 layers), see :mod:`rankcut.curves`.
4. With a ``target`` ("macs=4x", "params=0.3"), the budget is spent across layers by
   :func:`.budget.allocate` (least total squared relative error; with calibration data each
   layer's squared error weighted by what it costs the network, :mod:`.damage`); with only a
   ``rank`` rule,
   each layer takes the rule's ranks under the method (for ``auto``: the method with the least
   error at that rule). With both, the rule's ranks cap each layer's candidates.
5. Unless ``allow_slower``, every layer's dense form and candidates are timed through a
   :class:`~.latency.LatencyTable` (measured once per device and reused), and the plan is kept no
   slower than the dense model: with a rule, no factorization slower than its dense layer is
   taken (layer by layer, by the table: a rule's plan is not timed whole, and may still run
   slower as a whole model); with a params or MACs target, the allocation minimises Σ error² +
   μ·time, μ the least price of time that brings the predicted model time within the dense
   model's, and the plan is then timed whole. A target whose plan measures slower than dense,
   timed whole, when no plan within the guard's bound on damage (:data:`GUARD_DAMAGE` times the
   least) measures no slower, is refused with a :class:`~.budget.SlowerThanDense` (a ValueError)
   that says how much slower it would run. A ``latency`` target is a budget of time itself, spent
   by the same allocation, and timed whole too (refused likewise if it measures slower than
   dense).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import methods
from .._fingerprint import update as fingerprint_update
from .._modes import (
    as_inputs,
    batch_of,
    check_module,
    leaves_parametrizations_as_they_were,
    model_device,
    model_dtype,
    run_watching_layers,
)
from ..calibrate import calibration_inputs, check_reusable, input_second_moments
from ..curves import Candidate, aligned, measured, pareto, whitened_svd_errors
from ..decompose.svd import reuse_svds
from ..defaults import COMPRESS
from ..layers import cost_at, input_shape
from ..methods import DATA_AWARE
from ..plans import LayerPlan, Plan
from ..profile import allocator_advice, count_params, layer_macs, with_batch
from ..surgery import check_weights, target_layers, weight_shape
from . import damage
from .budget import SlowerThanDense, allocate
from .cache import CandidateCache, data_fingerprint, model_fingerprint
from .latency import LatencyTable, as_table
from .rules import layer_ranks, parse_rank


def method_choices() -> tuple[str, ...]:
    """What ``rc.plan(method=...)`` accepts: "auto" and every registered method and form."""
    return ("auto", *methods.aliases())


def parse_target(target) -> tuple[str, float]:
    """("params" | "macs" | "latency", fraction of the original cost to keep) from "macs=4x",
    "latency=2x" or "params=0.25"."""
    m = re.fullmatch(r"\s*(params|macs|latency)\s*=\s*([0-9.]+)\s*(x?)\s*",
                     str(target).lower())
    bad = ValueError(f"target: expected 'params=Nx', 'macs=Nx', 'latency=Nx' (N > 1: the "
                     f"compressed cost is 1/N of the original) or 'params=F', 'macs=F', "
                     f"'latency=F' (0 < F < 1), got {target!r}")
    if not m:
        raise bad
    try:
        value = float(m.group(2))
    except ValueError:
        raise bad from None
    if m.group(3):
        if value <= 1:
            raise bad
        return m.group(1), 1.0 / value
    if not 0 < value < 1:
        raise bad
    return m.group(1), value


def layer_calls(model: nn.Module, example_inputs) -> dict[str, list[tuple]]:
    """Per Conv2d/Linear that runs on ``example_inputs``: the input size of each of its calls,
    in order ((H, W), or for a Linear the rows per sample: the sequence length of a
    transformer, 1 for a classifier). (A convolution run on k times the batch, test-time
    augmentation or frames folded into the batch inside the forward, is priced as one call:
    its MACs counted once; not handled.)"""
    inputs = as_inputs(example_inputs)
    batch = batch_of(inputs)
    seen: dict[str, list[tuple]] = {}

    def record(name):
        def hook(module, args, output):  # returns None: the output is left alone
            seen.setdefault(name, []).append(input_shape(module, args[0], batch))
        return hook

    run_watching_layers(model, inputs, record)
    return seen


def _input_digests(model: nn.Module, calib_data, max_batches) -> tuple:
    """A SHA-256 of each Conv2d/Linear's first input on the first calibration batch: what the
    layers see, for a cache key (the same weights and data behind a forward changed since, e.g.
    a flag that scales a layer's input, are another computation)."""
    digests: dict[str, str] = {}

    def record(name):
        def hook(module, args, output):
            if name not in digests:
                h = hashlib.sha256()
                fingerprint_update(h, args[0])
                digests[name] = h.hexdigest()
        return hook

    first = next(calibration_inputs(calib_data, max_batches), None)
    if first is not None:
        run_watching_layers(model, (first,), record)
    return tuple(sorted(digests.items()))


def _macs(module: nn.Module, shapes: list[tuple]) -> int:
    """The dense layer's MACs over all its calls (each at its own input size)."""
    return sum(cost_at(module, shape).macs for shape in shapes)


def _within_rule(c: Candidate, cap: tuple[int, ...] | None) -> bool:
    return cap is None or all(r <= m for r, m in zip(c.ranks, cap, strict=False))


def _round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def _options_key(options: dict) -> tuple[str | None, bool]:
    """(the solver options as a cache key, whether an entry under it may be kept on disk):
    JSON, kept; with a torch.Generator (a seed option), keyed by the generator's state, in
    memory only; anything else that is not JSON cannot be told apart from another of its kind
    (its repr is an address, which a new object may reuse): None, no caching."""
    try:
        return json.dumps(options, sort_keys=True), True
    except (TypeError, ValueError):
        pass

    def state(value):
        if isinstance(value, torch.Generator):
            digest = hashlib.sha256(value.get_state().numpy().tobytes()).hexdigest()
            return f"torch.Generator {value.device} {digest}"
        raise TypeError(type(value).__name__)

    try:
        return json.dumps(options, sort_keys=True, default=state), False
    except (TypeError, ValueError):
        return None, False


def _solver_options(spec: methods.Method, options: dict, scoring: bool = False) -> dict:
    """The solver options a method's layers get: the registry's planning defaults (CUR plans
    with the deterministic DEIM; with ``scoring``, the cheaper settings candidates are scored
    with), overridden by the user's ``options[method]``."""
    return {**spec.planning_options, **(spec.scoring_options if scoring else {}),
            **options.get(spec.name, {})}


def _rescore(module, shape, spec, cands, covs, options, kind, most: int = 24):
    """Candidates re-measured in the output norm on calibration statistics. SVD becomes the
    data-aware (whitened) SVD at every rank; other methods build up to ``most`` candidates
    (spread over their weight-norm frontier; Tucker-2 factorized data-aware) and measure
    ||(W - W~) L|| / ||W L||."""
    if spec.name == "svd" and "ridge" not in options.get("svd", {}):
        # the costs stand; only the errors change, all from one spectrum (of Σ + the default
        # ridge: a ridge of the user's is measured candidate by candidate, below, on Σ itself)
        errs = whitened_svd_errors(module, covs)
        return [Candidate(c.method, c.ranks, c.form, c.params, c.macs,
                          float(errs[c.ranks[0] - 1]), {DATA_AWARE: True}) for c in cands]
    if len(cands) > most:  # spread over the frontier, and over that of the aligned ranks
        fit = [c for c in cands if aligned(c.ranks, spec.max_rank(module, c.form))]
        cands = list(dict.fromkeys(
            _spread(pareto(cands, kind), most) + _spread(pareto(fit, kind), most // 3)))
    opts = _solver_options(spec, options, scoring=True)
    # (a method without a data-aware form is built from the weights, measured in the output
    # norm like the others)
    return measured(spec, [(module, shape, c, covs) for c in cands], opts)


def _spread(front: list, n: int) -> list:
    """At most ``n`` of ``front``, evenly spaced along it, both ends included."""
    if len(front) <= n:
        return front
    step = (len(front) - 1) / (n - 1)
    return [front[round(i * step)] for i in range(n)]


def _layer_candidates(module, shape, method, rule, with_target, kind, rank_multiple, options,
                      covs) -> tuple[list[Candidate], list[tuple]]:
    """One layer's candidates: the rule's ranks exactly (no target), or every point of each
    method's curve within the rule's ranks (with a target); rescored on data when ``covs``.
    Without a target, a candidate that would be no smaller than the dense layer (in params and
    in MACs) is dropped before it is computed. Returned with the candidates still to measure
    (``(method, candidate, covs)`` of methods with a grid, CP: measured for all layers at once,
    :func:`_measure`)."""
    hw = shape if isinstance(module, nn.Conv2d) else None
    dense = cost_at(module, shape)
    cands: list[Candidate] = []
    pending: list[tuple] = []
    for spec, form in methods.variants(method, module):
        ranks = None
        if rule is not None:
            try:
                ranks = layer_ranks(module, spec.name, rule, form=form, input_hw=hw)
            except ValueError:
                if method != "auto":
                    raise
                continue  # energy / vbmf are not defined for CP: auto leaves CP out
            # to a multiple: up for energy / vbmf (at least that much kept), down for a params /
            # macs rule (at most that much spent; the multiple itself at least)
            down = rule.kind in ("params", "macs")
            ranks = tuple(max(rank_multiple, r // rank_multiple * rank_multiple) if down
                          else _round_up(r, rank_multiple) for r in ranks)
            # at most what the layer holds (a Tucker rank past a mode's channels), as the
            # layer would clamp it: priced, compared with the dense layer and planned as built
            # (a full rank need not be a multiple). (CP's bound is break-even, not what it
            # holds: a CP rank past it is priced as asked, larger than dense, and left out.)
            if spec.name != "cp":
                ranks = spec.capped(module, ranks, form)
        opts = _solver_options(spec, options)
        if not with_target:
            cost = spec.cost(module, ranks, form, shape)
            if cost.params >= dense.params and cost.macs >= dense.macs:
                continue
            if spec.grid_fn is not None or (covs is not None and spec.data_aware):
                # measured below: CP for all layers at once; on data, rebuilt data-aware (a
                # data-free solve first would be thrown away: for CUR of a 4096 x 25,088 layer,
                # a full SVD)
                found = [Candidate(spec.name, ranks, form, cost.params, cost.macs, math.nan)]
            else:
                found = [spec.candidate_at(module, shape, ranks, form, opts)]
        else:
            grid = (spec.grid(module, shape, form) if spec.grid_fn is not None
                    else spec.candidates(module, shape, form, opts, kind))
            found = [c for c in grid
                     if all(r % rank_multiple == 0 for r in c.ranks) and _within_rule(c, ranks)]
        if spec.grid_fn is not None:
            pending += [(spec, c, covs) for c in found]
        elif covs is not None:
            cands += _rescore(module, shape, spec, found, covs, options, kind)
        else:
            cands += found
    return cands, pending


def _measure(layers: dict[str, _Layer], pending: dict[str, list[tuple]], options,
             progress: bool = False) -> None:
    """The pending candidates of every layer measured (:func:`rankcut.curves.measured`: in the
    output norm where the layer has calibration statistics), those of one method, ranks and form
    together so that their solves batch across layers, and added to the layers' candidates."""
    groups: dict[tuple, list[tuple]] = {}
    for name, items in pending.items():
        for spec, c, covs in items:
            groups.setdefault((spec.name, c.ranks, c.form), []).append((name, c, covs))
    steps = [(items[0][1].describe(), methods.get(m), items)
             for (m, _, _), items in groups.items()]
    for _, spec, items in _steps(steps, progress, "planning: measuring candidates"):
        opts = _solver_options(spec, options, scoring=True)
        done = measured(spec, [(layers[n].module, layers[n].shape, c, covs)
                               for n, c, covs in items], opts)
        for (name, _, _), c in zip(items, done, strict=True):
            layers[name].cands.append(c)


@leaves_parametrizations_as_they_were
def plan(model: nn.Module, example_inputs, method: str = "auto", rank=None, target=None, *,
         calib_data=None, max_batches: int | None = None, include=None, exclude=None,
         min_params: int = COMPRESS["min_params"], rank_multiple: int = 1,
         options: dict | None = None,
         allow_slower: bool = False, latency_margin: float = 0.0,
         speed_slack: float = COMPRESS["speed_slack"],
         latency_table: LatencyTable | str | Path | None = None,
         latency_batch: int | None = None, loss_aware: bool | None = None,
         cache: CandidateCache | None = None, progress: bool = False) -> Plan:
    """Plan the factorization of ``model`` (see the module docstring).

    Args:
        example_inputs: a tensor or tuple of tensors for one forward pass (shapes, and the
            user's batch size for latency).
        method: ``"auto"`` or one of ``svd``, ``spatial_svd``, ``cp`` (= ``cp4``), ``cp3``,
            ``tucker``.
        rank: a rank rule (``64``, ``"vbmf"``, ``"energy=0.95"``, ``"params=0.25"``, ...).
        target: ``"macs=4x"`` / ``"params=2x"`` (or a fraction, ``"macs=0.25"``) of the whole
            model, met from below within about 1% where the layers' ranks allow; or
            ``"latency=2x"``: the model's predicted time on this device (from the latency
            table, at the batch of ``example_inputs`` or ``latency_batch``) at most half the
            dense model's; the plan is then timed whole, chosen again while it misses, and
            ``meta["latency"]`` reports the measured ratio beside the predicted one.
        rank_multiple: keep only ranks that are multiples of this (8 suits real hardware).
        options: solver options per method, e.g. ``{"cp": {"max_iter": 100}}``; passed on to
            the layers through the plan.
        calib_data: batches of inputs (or (inputs, targets)); the planner then measures every
            candidate's error in the output norm on these inputs' statistics, and SVD and
            Tucker-2 layers become data-aware (apply the plan with the same ``calib_data``).
        max_batches: at most this many calibration batches.
        loss_aware: weigh each layer's errors by what they cost the whole network (measured on
            ``calib_data`` by replacing each layer alone with a probe factorization, see
            :mod:`.damage`), so the budget goes where it does least damage to the network's
            output; default: on when ``calib_data`` and a ``target`` are given.
        progress: show a progress bar per stage (scoring candidates, probing the network),
            with the layer at hand.
        allow_slower: by default the plan is kept no slower than the dense model on the
            model's device (step 5 of the module docstring; at the batch of ``example_inputs``
            or ``latency_batch``), and a target that cannot be met so is a
            :class:`~.budget.SlowerThanDense`; ``True`` skips all timing (but a latency
            target's, whose plan is then kept even if it measures slower than dense).
        latency_margin: how much slower than dense (a fraction of its time) the plan, predicted
            and timed whole, or a factorized layer under a rank rule, may be.
        speed_slack: with a params or MACs target and the guard on, how much more predicted
            damage (Σ error², a fraction of that of the most accurate plan the target and the
            guard allow) the plan may take on to run faster by the latency table: it is then
            the fastest plan within that bound (``meta["latency"]["speed"]`` says what it
            traded). 0: the most accurate plan no slower than dense.
        latency_table: the :class:`~.latency.LatencyTable` to price layers with (times missing
            from it are measured and added; one from ``LatencyTable.at`` or ``.cached`` is
            written back to its file), or a path to a saved table (loaded; created when
            absent; saved back with what was added), or None: this machine's cached table
            (``LatencyTable.cached()``: under ``$RANKCUT_CACHE``, else ``~/.cache/rankcut``;
            ``RANKCUT_CACHE=off``: a new table for this call), extended likewise.
        latency_batch: the batch the plan is timed (and kept no slower than dense) at; default:
            that of ``example_inputs``.
        cache: a :class:`~.cache.CandidateCache`: the calibration moments and every layer's
            candidates are kept there and reused by later calls on the same model, inputs,
            data and settings with any target of the same kind (a sweep of ratios plans once);
            ``CandidateCache.cached()`` also keeps the candidates on this machine's disk, for
            later processes (the command line uses it).
    """
    if cache is not None and not isinstance(cache, CandidateCache):
        raise ValueError(f"cache: expected a rankcut.select.CandidateCache or None, got "
                         f"{type(cache).__name__}")
    check_module(model)
    if method not in method_choices():
        raise ValueError(f"method: expected one of {', '.join(method_choices())}, got "
                         f"{method!r}")
    if rank is None and target is None:
        raise ValueError("rank, target: give a rank rule, a target, or both")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple: expected an int >= 1, got {rank_multiple!r}")
    rule = parse_rank(rank) if rank is not None else None
    kind, fraction = parse_target(target) if target is not None else (None, None)
    grid_kind = "macs" if kind == "latency" else kind  # what candidate grids are drawn on
    try:
        options = methods.check_solver_options(options)
    except ValueError as err:
        raise ValueError(f"options: {err}") from None
    if calib_data is not None:
        check_reusable(calib_data)
    inputs = as_inputs(example_inputs)
    if (isinstance(latency_margin, bool) or not isinstance(latency_margin, int | float)
            or not latency_margin >= 0):
        raise ValueError(f"latency_margin: expected a number >= 0, got {latency_margin!r}")
    if (isinstance(speed_slack, bool) or not isinstance(speed_slack, int | float)
            or not speed_slack >= 0 or speed_slack == math.inf):
        raise ValueError(f"speed_slack: expected a finite number >= 0, got {speed_slack!r}")
    if latency_batch is not None and (isinstance(latency_batch, bool) or not isinstance(
            latency_batch, int) or latency_batch < 1):
        raise ValueError(f"latency_batch: expected an int >= 1, got {latency_batch!r}")
    if loss_aware is None:
        loss_aware = calib_data is not None and target is not None
    if loss_aware and (calib_data is None or target is None):  # before any layer is scored
        raise ValueError("loss_aware: needs calib_data and a target")
    timed = kind == "latency" or not allow_slower
    table = as_table(latency_table, model_device(model), model_dtype(model)) if timed else None

    eligible = target_layers(model, include, exclude, min_params=min_params)
    for name, reason in eligible.items():
        if reason is None:
            check_weights(name, model.get_submodule(name))
    calls = layer_calls(model, inputs)
    attention_macs = _attention_macs(model, inputs, calls)
    shapes = {name: c[0] for name, c in calls.items()}  # (a planned layer runs once)
    key = hit = None
    opts_key, persist = _options_key(options) if cache is not None else (None, False)
    if opts_key is None:  # options that cannot be told apart: not cached
        cache = None
    if cache is not None:  # everything the moments and candidates depend on, not the target
        key = (model_fingerprint(model), hashlib.sha256(repr(model).encode()).hexdigest(),
               data_fingerprint(calib_data, max_batches),
               tuple(sorted((n, tuple(c)) for n, c in calls.items())),  # every call's size
               # what the layers see of the calibration data (moments are kept with a hit)
               None if calib_data is None else _input_digests(model, calib_data, max_batches),
               method, None if rule is None else (rule.kind, repr(rule.value)),
               target is not None, grid_kind, rank_multiple, opts_key,
               tuple(eligible.items()), str(model_device(model)))
        hit = cache.get(key, disk=persist, layers=[n for n, r in eligible.items()
                                                   if r is None and n in calls
                                                   and len(calls[n]) == 1])
    covs = {}
    if hit is not None and hit[0] is not None:
        covs = hit[0]
    elif calib_data is not None:  # (a hit from disk holds no moments: measured again)
        names = [n for n, r in eligible.items() if r is None and n in shapes]
        covs = input_second_moments(model, names, calib_data, max_batches=max_batches)
        if hit is not None and not cache.same_moments(key, covs):
            hit = None  # the layers see other inputs than when the candidates were scored
    result = Plan(meta={"method": method, "rank": None if rule is None else str(rule),
                        "target": None if target is None else str(target)})
    # a layer's spectra and whitened Gram (4096 x 25,088 x 25,088 products for a VGG's
    # first classifier layer: minutes on a CPU) computed while scoring are reused by the
    # network-damage probes instead of computed again; the same numbers, bit for bit
    with reuse_svds(max_entries=4 * len(eligible) + 8):
        layers: dict[str, _Layer] = {}
        pending: dict[str, list[tuple]] = {}
        for name, reason in _steps(eligible.items(), progress, "planning: scoring candidates"):
            module = model.get_submodule(name)
            if reason is None and name not in shapes:
                reason = "not called in the forward pass on example_inputs"
            elif reason is None and len(calls[name]) > 1:
                # each call costs its MACs, and its input may differ: priced as one, a plan
                # would meet its target on paper only
                reason = (f"called {len(calls[name])} times in one forward pass (a "
                          "layer reused: left dense)")
            if reason is not None:
                result[name] = LayerPlan.skipped(reason, type(module).__name__)
                continue
            shape = shapes[name]
            if hit is not None:
                cands, pending[name] = list(hit[1][name]), []
            else:
                cands, pending[name] = _layer_candidates(module, shape, method, rule,
                                                         target is not None, grid_kind,
                                                         rank_multiple, options, covs.get(name))
            dense_cost = cost_at(module, shape)
            dense = Candidate("dense", (), None, dense_cost.params, dense_cost.macs, 0.0)
            layers[name] = _Layer(module, shape, cands, dense)
        _measure(layers, pending, options, progress)
        if cache is not None and (hit is None or hit[0] is None):
            cache.put(key, (covs, {name: list(layer.cands) for name, layer in layers.items()}),
                      disk=persist)
        clock = None
        if table is not None and layers:
            clock = _Clock(table, model, inputs, latency_batch or batch_of(inputs), layers,
                           grid_kind or "macs", progress)

        try:
            if not layers:
                why = sorted({r for r in (lp.reason for lp in result.values()) if r})
                said = "nothing to factorize: " + (
                    f"every Conv2d/Linear layer is skipped ({'; '.join(why[:3])})" if why
                    else "the model has no Conv2d or Linear layer")
                if target is not None:
                    raise ValueError(f"target: {said}")
                warnings.warn(f"rank: {said}", stacklevel=2)  # a rule alone: an empty plan
            limit = None if allow_slower or clock is None else 1 + latency_margin
            choose = _Chooser(layers, kind, limit, clock, 0.0 if kind == "latency" else speed_slack)
            checks: list[dict] = []
            if target is None:
                chosen = choose(None)
            else:
                fixed = {"params": count_params(model), "macs": attention_macs,
                         "latency": clock.rest if clock is not None else 0.0}
                for name, module in model.named_modules():
                    if isinstance(module, nn.Conv2d | nn.Linear) and name in calls:
                        # (a layer run k times, left dense, costs each call's MACs)
                        fixed["macs"] += _macs(module, calls[name])
                if kind != "latency":
                    fixed[kind] -= sum(layer.dense.cost(kind) for layer in layers.values())
                choose.fixed = fixed[kind]
                whole = fixed[kind] + sum(layer.dense.cost(kind) for layer in layers.values())
                budget = fraction * whole
                if loss_aware:
                    weights = _damage_weights(model, layers, covs, calib_data, kind, budget,
                                              choose.fixed, options, max_batches, progress)
                    for name, w in weights.items():
                        layers[name].cands = damage.weighted(layers[name].cands, w)
                    result.meta["damage_weights"] = weights
                chosen = choose(budget)
                if clock is not None and (limit is not None or kind == "latency"):
                    chosen, budget, checks = _checked(choose, chosen, budget, kind, fraction, clock,
                                                      model, result, options)
                if limit is not None:
                    _refuse_slower(target, limit, choose, chosen, checks, clock)
                result.meta["budget"] = {kind: budget}
            _fill(result, chosen, layers, options, choose.vetoed,
                  ruled=rule is not None or rank_multiple > 1)
        except BaseException:
            # (a refused or unreachable target too: what was timed is kept, so that a rerun
            # decides on the same timings, and does not pay for them again)
            if clock is not None:
                table.write_back()
            raise
    if clock is not None:
        result.meta["latency"] = _latency_meta(clock, choose, chosen, checks, kind, fraction,
                                              limit)
        table.write_back()
    if target is None and layers and not result.active:
        why = ("every factorization was measured slower than its dense layer on this device "
               "(pass allow_slower=True to keep them)" if choose.vetoed
               else "no layer's factorization is smaller than the dense layer")
        warnings.warn(f"rank: at the ranks of {rule} {why}; nothing is factorized",
                      stacklevel=2)
    _summarise(result, model, calls, attention_macs)
    return result


def _damage_weights(model, layers, covs, calib_data, kind, budget, fixed, options,
                    max_batches=None, progress=False) -> dict:
    """Each layer's network-damage weight (:func:`.damage.layer_weights`), probed at its
    operating point: the candidate that the unweighted allocation picks for the budget (for a
    layer it keeps dense, the candidate at the budget's cost fraction), factorized as the plan
    would apply it."""
    frontiers = {n: pareto([*layer.cands, layer.dense], kind) for n, layer in layers.items()}
    try:
        start = allocate(frontiers, kind, budget, fixed)
    except ValueError:
        start = {}
    whole = fixed + sum(layer.dense.cost(kind) for layer in layers.values())
    probes, errors = {}, {}
    for name, layer in _steps(layers.items(), progress, "planning: probing factorizations"):
        c = start.get(name)
        if c is None or c.method == "dense":
            c = damage.probe(layer.cands, layer.dense, kind, budget / max(whole, 1))
        if c is None:
            continue
        spec = methods.get(c.method)
        opts = _solver_options(spec, options, scoring=True)
        cov = covs.get(name) if c.extra.get(DATA_AWARE) else None
        probes[name] = spec.from_dense(layer.module, c.ranks, c.form, cov, opts)
        errors[name] = c.error
    return damage.layer_weights(model, probes, errors, calib_data, max_batches=max_batches,
                                progress=progress)


def _steps(items, progress: bool, stage: str):
    """``items`` ((layer name, ...) pairs), behind a progress bar naming ``stage`` and the
    layer at hand when ``progress``."""
    if not progress:
        yield from items
        return
    from tqdm.auto import tqdm

    items = list(items)
    with tqdm(items, desc=stage, unit="layer") as bar:
        for item in bar:
            bar.set_postfix_str(item[0])
            yield item


class _Layer:
    def __init__(self, module, shape, cands, dense):
        self.module, self.shape, self.cands, self.dense = module, shape, cands, dense


def _latency_meta(clock, choose, chosen, checks, kind, fraction, limit) -> dict:
    """The plan's ``meta["latency"]``; warns when a latency target's plan, timed whole, missed
    its goal."""
    meta = {**clock.summary(chosen, limit, choose.vetoed),
            **({"aimed_limit": choose.limit} if limit is not None and choose.limit != limit
               else {}),
            **({"guard": choose.cost} if choose.cost else {}),
            **({"speed": choose.speed} if choose.speed else {})}
    if checks:
        last = checks[-1]
        meta.update(checks=checks, measured_ms={str(clock.batch): last["ms"]},
                    measured_ratio={str(clock.batch): last["measured"]}, ratio=last["measured"])
        if kind == "latency" and last["measured"] > fraction:
            warnings.warn(
                f"target: the plan measured {last['measured']:.2f} of the dense model's time at "
                f"batch {clock.batch} on this device, against a goal of {fraction:.2f} (predicted "
                f"{last['predicted']:.2f}; {len(checks)} plan{'s' if len(checks) > 1 else ''} "
                f"timed whole)", stacklevel=3)
    if kind == "latency":
        meta["goal_ratio"] = fraction
    return meta


def _refuse_slower(target, limit, choose, chosen, checks, clock) -> None:
    """With the latency guard on, the plan :func:`_checked` ends with, timed whole, decides:
    measured slower than ``limit`` (1 + ``latency_margin``), it is refused (a compressed model
    that runs slower than the original defeats the purpose; ``allow_slower=True`` plans without
    the guard). A plan the table prices slower but that measured within the limit stands. A
    latency target's plan that measured slower than dense is refused likewise (one that misses
    its goal but runs faster than dense stands, with a warning)."""
    if not checks or checks[-1]["measured"] <= limit:
        return
    measured = checks[-1]["measured"]
    where = f"batch {clock.batch} on this device"
    faults = checks[-1].get("page_faults")  # (an eager CPU pass paying glibc's malloc: said)
    advice = (allocator_advice(*faults, device=clock.table.device, engine=clock.table.engine)
              if faults else None)
    also = "" if advice is None else f". Timed whole, {advice}"
    if choose.kind == "latency":  # its re-aimed plans all measured slower than dense
        raise SlowerThanDense(
            f"target: {target} cannot be met on this device at batch {clock.batch}: the plan "
            f"measured {measured:.2f} of the dense model's time there, timed whole (predicted "
            f"{checks[-1]['predicted']:.2f}; {len(checks)} plan{'s' if len(checks) > 1 else ''}"
            f" timed): slower than the dense model, not faster. Pass allow_slower=True (on the "
            f"command line --allow-slower) to keep it anyway, plan with example_inputs of the "
            f"batch the model will run at (or latency_batch), or compress by params or MACs"
            f"{also}")
    # (given way at an aim below the limit, the plan may be predicted within the limit itself)
    if choose.cost and not choose.cost["met"] and clock.ratio(chosen) > limit:
        why = (f"the plan that meets it is predicted at {clock.ratio(chosen):.2f} of the dense "
               f"model's time there (measured whole: {measured:.2f}), and " + (
                   "no plan for it is predicted no slower, at any price of time"
                   if choose.cost.get("priced_out") else
                   f"keeping it no slower would raise its predicted error by more than "
                   f"{GUARD_DAMAGE - 1:.0%} (sum of squares)"))
    else:
        why = (f"the plan that meets it measured {measured:.2f} of the dense model's time "
               f"there, timed whole (predicted {checks[-1]['predicted']:.2f}; "
               f"{len(checks)} plan{'s' if len(checks) > 1 else ''} timed), and no plan tried "
               f"within the guard's bound on error ({GUARD_DAMAGE - 1:.0%} more predicted error, "
               f"sum of squares) measured no slower")
    raise SlowerThanDense(
        f"target: {target} cannot be met no slower than the dense model at {where}: {why}. "
        f"Pass allow_slower=True (on the command line --allow-slower) to plan without the "
        f"guard (the most accurate plan for the target, not timed), plan with example_inputs "
        f"of the batch the model will run at (or latency_batch), or ask for a smaller "
        f"reduction{also}")


def _checked(choose, chosen, budget, kind, fraction, clock, model, result, options,
             rounds: int | None = None):
    """``chosen`` timed whole against the dense model (:meth:`LatencyTable.compare_plan`). Layers
    timed alone miss part of what a whole model costs, in either direction, so while the measured
    time misses the goal (a latency target's fraction, or the guard's limit), or beats it by more
    than 5% where the goal shaped the plan (a latency target's; the guard's where it met its
    limit by pricing time: accuracy given for speed not needed), the allocation aims at goal ·
    predicted / measured instead and the plan is chosen again, at most ``rounds`` times. Where
    the guard gives way (no plan within its bound on damage is predicted to reach the limit),
    the fastest plan within that bound is measured as well, if it is predicted faster than the
    plan at hand, and the checks end there. The plan returned is the last that met the goal
    (else the last one). For a latency target: the plan measured closest to the goal among
    those that met it or missed it by at most :data:`LATENCY_TOLERANCE` (a timing's own noise;
    one that misses is warned about), so that a plan 3% slow is kept rather than one 30% fast
    that spent accuracy for it (else the last); and its budget is searched within the bracket
    its checks find, in predicted time (a plan that beat the goal by more than 5%, one that
    missed it): the measured time can jump with the prediction (VGG-11-BN at batch 1: predicted
    0.50 measured 0.26, predicted 0.97 measured 0.95), and the ratio step alone then swung
    between the two; once both ends are known, the next aim is the straight line's between
    them (regula falsi), or the middle when one end moved twice in a row, kept inside.
    Rounds: ``rounds``, by default 3 (5 for a latency target). The timings are kept in the
    table, so a table that holds them gives the same plan. Returns (chosen, budget, the checks,
    the final plan's check last)."""
    goal = fraction if kind == "latency" else choose.limit
    if rounds is None:
        rounds = 5 if kind == "latency" else 3
    checks, best, states = [], None, []
    fast = slow = None  # a latency target's (predicted, measured): beat the goal by > 5%; missed
    moved: list[str] = []  # which of the two each check moved
    for round_ in range(rounds + 1):
        trial = Plan(dict(result.layers))
        _fill(trial, chosen, choose.layers, options)
        dense_ms, planned_ms = clock.table.compare_plan(model, trial, clock.inputs, clock.batch,
                                                          goal=goal)
        predicted = clock.ratio(chosen)
        check = {"predicted": predicted, "measured": planned_ms / dense_ms,
                 "ms": [dense_ms, planned_ms]}
        faults = clock.table.plan_page_faults(model, trial, clock.inputs, clock.batch)
        if faults is not None:
            check["page_faults"] = list(faults)
        checks.append(check)
        state = (chosen, budget, choose.limit, dict(choose.cost), dict(choose.speed), check)
        states.append(state)
        met = check["measured"] <= goal
        if met:
            best = state
        on_target = False
        if kind == "latency":
            if met and (fast is None or predicted > fast[0]):
                fast = (predicted, check["measured"])
                moved.append("fast")
            if not met and (slow is None or predicted < slow[0]):
                slow = (predicted, check["measured"])
                moved.append("slow")
            on_target = 0.95 * goal <= check["measured"] <= (1 + LATENCY_TOLERANCE) * goal
        shaped = kind == "latency" or bool(choose.cost and choose.cost["met"])
        if (met and (not shaped or check["measured"] >= 0.95 * goal)) or on_target \
                or round_ == rounds:
            break
        if choose.cost and not choose.cost["met"]:
            # the guard gave way (by the table, nothing within its bound on damage reaches the
            # limit): the fastest plan within that bound is measured too, when it is predicted
            # faster than this one (the table may be pessimistic); then no more
            faster = choose.take_bounded(predicted)  # (a plan that met the goal broke above)
            if faster is None:
                break
            chosen = faster
            continue
        # aim the prediction where the measurement would meet the goal: measured ≈ predicted
        # times this plan's measured / predicted
        aim = goal * predicted / check["measured"]
        if fast is not None and slow is not None and fast[0] < slow[0]:
            (a1, m1), (a2, m2) = fast, slow  # the goal lies between: the line through them,
            # or the middle when one end moved twice in a row (a jump in the measured time
            # makes the line's steps from one side ever shorter)
            aim = (a1 + a2) / 2 if m2 <= m1 or moved[-2:] in (["fast"] * 2, ["slow"] * 2) \
                else a1 + (goal - m1) * (a2 - a1) / (m2 - m1)
            aim = min(max(aim, a1 + 0.1 * (a2 - a1)), a2 - 0.1 * (a2 - a1))
        now = budget if kind == "latency" else choose.limit
        if not met:  # a plan measured a hair slower is not refused for want of trying
            aim = min(aim, now - MIN_TIGHTEN * goal)
        if abs(aim - now) < 0.005 * goal:
            break  # choosing again would change nothing
        try:
            if kind == "latency":  # the budget of a latency target is the fraction itself
                again = choose(aim)
            else:
                choose.limit = aim
                again = choose(budget)
        except ValueError:  # nothing cheaper fits
            break
        if choose.cost and not choose.cost["met"]:  # the guard gives way at that aim
            again = choose.take_bounded(predicted)  # the fastest within its bound, measured
            if again is None:                       # next (and last), if predicted faster
                break
        chosen = again
        if kind == "latency":
            budget = aim
    if kind == "latency":  # closest to the goal, at most LATENCY_TOLERANCE slow
        near = [st for st in states if st[-1]["measured"] <= (1 + LATENCY_TOLERANCE) * goal]
        best = min(near, key=lambda st: abs(st[-1]["measured"] - goal), default=None)
    if best is not None and best[-1] is not checks[-1]:
        chosen, budget, choose.limit, choose.cost, choose.speed, check = best
        checks.append(check)
    else:
        chosen, budget, choose.limit, choose.cost, choose.speed, _ = state
    return chosen, budget, checks


class _Clock:
    """Every layer's dense form and candidates priced in time through ``table`` at ``batch``
    (that of the example inputs, or ``latency_batch``). A candidate's ``latency`` is its time
    relative to the dense model's (the cost a latency target spends: the dense layers and the
    rest of the model sum to 1); its time in ms is kept in ``extra["latency_ms"]``, keyed by the
    batch. Only each method's (and form's) Pareto candidates on ``kind`` and error are timed; the
    others, no faster than the cheaper and better ones of their form, are dropped."""

    def __init__(self, table: LatencyTable, model, inputs, batch: int,
                 layers: dict[str, _Layer], kind, progress: bool = False):
        self.table, self.inputs, self.batch = table, inputs, batch
        self.taken = table.measured  # timings the table held before this plan
        dense_ms, model_ms = table.dense_ms(
            model, inputs, {n: (layer.module, layer.shape) for n, layer in layers.items()},
            batch)
        layers_ms = math.fsum(dense_ms.values())
        self.model_ms = max(model_ms, layers_ms)  # (the rest of the model: at least 0)
        self.rest = 1 - layers_ms / self.model_ms
        for name, layer in _steps(layers.items(), progress, "planning: timing candidates"):
            layer.dense = self._priced(layer.dense, dense_ms[name], dense_ms[name])
            groups: dict[tuple, list[Candidate]] = {}
            for c in layer.cands:  # aligned ranks apart: timed, they may win at equal cost
                full = methods.get(c.method).max_rank(layer.module, c.form)
                groups.setdefault((c.method, c.form, aligned(c.ranks, full)), []).append(c)
            layer.cands = [self._priced(c, self._ms(layer, c), dense_ms[name])
                           for group in groups.values() for c in pareto(group, kind)]

    def _ms(self, layer: _Layer, c: Candidate) -> float:
        config = methods.get(c.method).config(layer.module, c.ranks, c.form)
        return self.table.layer_ms(layer.module, layer.shape, config, self.batch)

    def _priced(self, c: Candidate, ms: float, dense: float) -> Candidate:
        b = str(self.batch)
        return dataclasses.replace(c, latency=ms / self.model_ms, extra={
            **c.extra, "latency_ms": {b: ms}, "dense_latency_ms": {b: dense},
            "latency_ratio": ms / max(dense, 1e-9)})

    def ratio(self, chosen: dict[str, Candidate]) -> float:
        """The predicted model time relative to the dense model's."""
        return self.rest + math.fsum(c.latency for c in chosen.values())

    def summary(self, chosen: dict[str, Candidate], limit, vetoed) -> dict:
        b, ratio = str(self.batch), self.ratio(chosen)
        return {"table": self.table.setting, "batch": self.batch,
                "dense_ms": {b: self.model_ms}, "predicted_ms": {b: ratio * self.model_ms},
                "predicted_ratio": {b: ratio}, "limit": limit, "vetoed": vetoed,
                "timings_taken": self.table.measured - self.taken}


# The latency guard may raise a budgeted plan's predicted damage (Σ error²) by at most this
# factor; where keeping the plan no slower than dense would cost more, the fastest plan within
# the bound and the plan without the limit are timed whole, and if neither measures no slower
# the target is refused (a ValueError; allow_slower=True plans without the guard). (Part-way
# plans lose accuracy and are still slower: on ResNet-20 at batch 1, 2x fewer MACs, one at the
# bound kept 82.0% top-1 against 89.8% unguarded and was predicted at 1.57 of the dense time.)
GUARD_DAMAGE = 1.25
# A guarded plan measured slower than its limit is chosen again aiming at least this fraction of
# the limit lower (a whole-model timing is noisy by a few percent on a CPU).
MIN_TIGHTEN = 0.02
# A latency target's plan measured at most this fraction slower than its goal is on target, as
# one at most this much faster is (a whole-model timing moves by a few percent from run to run
# here): kept over one that beats the goal by more, and warned about.
LATENCY_TOLERANCE = 0.05


class _Chooser:
    """One candidate per layer: the least error (``budget=None``) or the allocation under a
    budget of ``kind``. With a ``limit`` (and the ``clock`` that timed the candidates), no
    slower than dense at the batch of the example inputs: under a rule, each layer's
    factorizations slower than its dense layer by more than ``limit`` are dropped; under a
    budget, the predicted model time is held within ``limit`` by pricing time at the least μ
    that does it, unless that raises the predicted damage beyond :data:`GUARD_DAMAGE` times
    that of the plan without a limit: then the plan is that one (``cost`` records the outcome
    and the damage with and without the limit; :func:`plan` times it whole and refuses it if
    it measures slower)."""

    def __init__(self, layers: dict[str, _Layer], kind, limit: float | None = None,
                 clock: _Clock | None = None, slack: float = 0.0):
        self.layers, self.kind, self.limit, self.clock = layers, kind, limit, clock
        self.slack = slack
        self.fixed = 0.0
        self.vetoed: dict[str, list[str]] = {}
        self.cost: dict[str, float] = {}
        self.speed: dict[str, float] = {}
        self.bounded: dict[str, Candidate] | None = None

    def _time(self, chosen: dict[str, Candidate]) -> float:
        return self.clock.ratio(chosen)

    def take_bounded(self, than: float) -> dict[str, Candidate] | None:
        """Where the guard gave way: the fastest plan it found within its bound on damage, if
        predicted faster than ``than`` (``cost`` then describes it), else None."""
        if self.bounded is None or self._time(self.bounded) >= than - 1e-9:
            return None
        self.cost = {**self.cost, "damage": _damage(self.bounded),
                     "ratio": self._time(self.bounded)}
        return self.bounded

    def __call__(self, budget) -> dict[str, Candidate]:
        self.cost, self.speed, self.bounded = {}, {}, None
        if budget is None:
            if self.limit is not None:
                for n, layer in self.layers.items():
                    slow = [c for c in layer.cands if c.latency > self.limit * layer.dense.latency]
                    if slow:
                        self.vetoed[n] = [c.describe() for c in slow]
                        layer.cands = [c for c in layer.cands if c not in slow]
            return {n: min((c for c in layer.cands if not math.isnan(c.error)),
                           key=lambda c: c.error, default=layer.dense)  # (NaN: a failed solve)
                    for n, layer in self.layers.items()}
        cands = {n: [*layer.cands, layer.dense] for n, layer in self.layers.items()}
        chosen = allocate({n: pareto(c, self.kind) for n, c in cands.items()}, self.kind,
                          budget, self.fixed)
        if self.limit is None:
            return chosen

        def at(price):
            return allocate(cands, self.kind, budget, self.fixed,
                            score=lambda c: c.error ** 2 + price * c.latency)

        price = 0.0
        if self._time(chosen) > self.limit:
            chosen, price = self._guarded(chosen, at)
        if self.slack > 0 and self._time(chosen) <= self.limit:
            chosen = self._faster(chosen, at, price)
        return chosen

    def _guarded(self, free, at) -> tuple[dict, float]:
        """The least price of time that brings the predicted time within the limit, and the
        plan at it; ``free`` (and 0) if that raises the damage beyond GUARD_DAMAGE, or if no
        price does it (``cost["priced_out"]``: even the plans priced highest are predicted
        slower than the limit)."""
        bound = GUARD_DAMAGE * _damage(free) + 1e-12
        self.bounded = free  # the fastest plan found within the damage bound

        def too_slow(trial):  # and still within the damage bound: price time higher
            slow = self._time(trial) > self.limit and _damage(trial) <= bound
            if slow and self._time(trial) < self._time(self.bounded):
                self.bounded = trial
            return slow

        lo, hi = 0.0, 1.0
        while too_slow(chosen := at(hi)) and hi < 1e8:
            lo, hi = hi, hi * 4
        for _ in range(30):  # bisection on the price of time
            mid = (lo + hi) / 2
            if too_slow(trial := at(mid)):
                lo = mid
            else:
                hi, chosen = mid, trial
        # no price reaches the limit (more damage for no speed that counts): the target wins
        priced_out = self._time(chosen) > self.limit and _damage(chosen) <= bound
        if _damage(chosen) > bound or priced_out:  # (or the limit costs too much error)
            chosen, hi = free, 0.0
        self.cost = {"met": self._time(chosen) <= self.limit, "damage": _damage(chosen),
                     "damage_if_slower": _damage(free), "ratio_if_slower": self._time(free),
                     "priced_out": priced_out}
        return chosen, hi

    def _faster(self, base, at, price: float) -> dict:
        """The fastest plan (by the table) at a higher price of time than ``price`` whose
        predicted damage is at most (1 + slack) times ``base``'s: speed bought with a bounded
        share of accuracy (``self.speed`` records the trade). The price is raised while the
        damage stays within that bound, then bisected on the bound; every plan tried within it
        competes (the fastest, then the least damage), so a price whose plan is no faster
        (a budget filled with slower candidates) does not end the search below the prices
        that buy speed."""
        bound = (1 + self.slack) * _damage(base) + 1e-12
        best = base

        def within(trial) -> bool:  # and the fastest plan within the bound kept
            nonlocal best
            if _damage(trial) > bound:
                return False
            if (self._time(trial), _damage(trial)) < (self._time(best), _damage(best)):
                best = trial
            return True

        lo, hi = price, max(2 * price, 1e-3)
        while within(at(hi)) and hi < 1e8:
            lo, hi = hi, hi * 4
        for _ in range(20):  # bisection on the price of time, geometric once above zero
            mid = (lo + hi) / 2 if lo == 0 else math.sqrt(lo * hi)
            if within(at(mid)):
                lo = mid
            else:
                hi = mid
        self.speed = {"slack": self.slack, "damage_before": _damage(base),
                      "ratio_before": self._time(base), "damage": _damage(best),
                      "ratio": self._time(best)}
        return best


def _damage(chosen: dict[str, Candidate]) -> float:
    return math.fsum(c.error ** 2 for c in chosen.values())


def _fill(result: Plan, chosen: dict[str, Candidate], layers: dict[str, _Layer], options,
          vetoed: dict | None = None, ruled: bool = True) -> None:
    """The plan of each layer: its chosen candidate, or dense with why (``vetoed``: the layers
    whose every candidate was measured slower; ``ruled``: a rank rule or multiple bounded the
    candidates)."""
    for name, cand in chosen.items():
        layer = layers[name]
        module_type = type(layer.module).__name__
        if cand.method != "dense":
            result[name] = _layer_plan(cand, layer.module, options)
            continue
        if not layer.cands and vetoed and name in vetoed:
            why = "kept dense: every factorization was measured slower than dense"
        elif not layer.cands and ruled:
            why = ("kept dense: no candidate within the rank rule (or multiple) smaller than "
                   "the dense layer")
        elif not layer.cands:
            why = "kept dense: no factorization smaller than the dense layer"
        else:
            why = "kept dense: the budget does less damage elsewhere"
        result[name] = LayerPlan.skipped(why, module_type)


def _layer_plan(c: Candidate, module: nn.Module, options: dict) -> LayerPlan:
    opts = _solver_options(methods.get(c.method), options)
    if c.extra.get(DATA_AWARE):
        opts[DATA_AWARE] = True
    extra = dict(c.extra)
    error = extra.pop("layer_error", c.error)
    if "damage_weight" in extra:
        extra["damage"] = c.error ** 2  # weight · error²: the predicted damage to the network
    return LayerPlan(c.method, c.ranks, form=c.form, options=opts,
                     predicted={"params": c.params, "macs": c.macs, "error": error, **extra,
                                "weight_shape": weight_shape(module)},
                     module_type=type(module).__name__,
                     reason=f"{c.describe()}: predicted error {error:.3f}")


def _attention_macs(model: nn.Module, inputs, calls: dict) -> int:
    """MACs (one sample) of nn.MultiheadAttention's own projections (its output projection
    included), which no Conv2d or Linear call runs: left as they are, but counted in a MACs
    target's whole and in the predicted totals, as :func:`rankcut.profile.count_macs` counts
    them."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return 0
    return sum(v for k, v in layer_macs(model, with_batch(inputs, 1)).items() if k not in calls)


def _summarise(result: Plan, model: nn.Module, calls: dict[str, list[tuple]],
               other_macs: int = 0) -> None:
    """Predicted whole-model params and MACs before and after, into the plan's meta (a layer
    run k times costs each call's MACs; such a layer is left dense; ``other_macs``: what no
    layer runs, the same before and after). A planned layer counts at its predicted cost,
    priced at the ranks it is built at (a rank the layer clamps, a sampled CUR's)."""
    before = {"params": count_params(model), "macs": other_macs}
    after = {"params": before["params"], "macs": other_macs}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear) or name not in calls:
            continue
        lp, macs = result.layers.get(name), _macs(module, calls[name])
        before["macs"] += macs
        if lp is None or lp.skip:
            after["macs"] += macs
            continue
        shape = calls[name][0]  # (a factorized layer runs once)
        if "params" in lp.predicted and "macs" in lp.predicted:
            new_params, new_macs = lp.predicted["params"], lp.predicted["macs"]
        else:
            new = lp.spec.cost(module, lp.ranks, lp.form, shape)
            new_params, new_macs = new.params, new.macs
        after["macs"] += new_macs
        after["params"] += new_params - cost_at(module, shape).params
    result.meta["predicted"] = {
        "params": [before["params"], after["params"]],
        "macs": [before["macs"], after["macs"]],
        "params_ratio": before["params"] / max(after["params"], 1),
        "macs_ratio": before["macs"] / max(after["macs"], 1),
        "error_sq_sum": math.fsum(lp.predicted.get("error", 0.0) ** 2
                                  for lp in result.layers.values() if not lp.skip),
    }
    if "damage_weights" in result.meta:  # Σ weight·error²: the network damage predicted
        result.meta["predicted"]["damage"] = math.fsum(
            lp.predicted.get("damage", 0.0) for lp in result.layers.values() if not lp.skip)
