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
"""

from __future__ import annotations

import math
import re
import warnings

from torch import nn

from .. import methods
from .._modes import as_inputs, batch_of, run_watching_layers
from ..calibrate import input_second_moments
from ..curves import Candidate, measured, pareto, whitened_svd_errors
from ..layers import cost_at, input_shape
from ..methods import DATA_AWARE
from ..plans import LayerPlan, Plan
from ..profile import compare_latency, count_params
from ..surgery import check_weights, structure, target_layers
from . import damage
from .budget import allocate
from .latency import LatencyGuard, drop_slower
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


def layer_input_shapes(model: nn.Module, example_inputs) -> dict[str, tuple]:
    """Per Conv2d/Linear that runs on ``example_inputs``: its input (H, W), or for a Linear the
    rows per sample (the sequence length of a transformer, 1 for a classifier)."""
    inputs = as_inputs(example_inputs)
    batch = batch_of(inputs)
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output):  # returns None: the output is left alone
            seen.setdefault(name, input_shape(module, args[0], batch))
        return hook

    run_watching_layers(model, inputs, record)
    return seen


def _within_rule(c: Candidate, cap: tuple[int, ...] | None) -> bool:
    return cap is None or all(r <= m for r, m in zip(c.ranks, cap, strict=False))


def _round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def _check_solver_options(options) -> dict:
    """``options``: {method: {solver option: value}}, each method's options checked against its
    solver before any work."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options: expected a dict of solver options per method (e.g. "
                         f"{{'cp': {{'max_iter': 100}}}}), got {type(options).__name__}")
    for name, opts in options.items():
        if name not in methods.names():
            raise ValueError(f"options: {name!r} is not a method; keys are method names: "
                             f"{', '.join(methods.names())}")
        if not isinstance(opts, dict):
            raise ValueError(f"options[{name!r}]: expected a dict, got {type(opts).__name__}")
        try:
            methods.get(name).check_options(opts)
        except ValueError as err:
            raise ValueError(f"options[{name!r}]: {err}") from None
    return dict(options)


def _solver_options(spec: methods.Method, options: dict, scoring: bool = False) -> dict:
    """The solver options a method's layers get: the registry's planning defaults (CUR plans
    with the deterministic DEIM; with ``scoring``, the cheaper settings candidates are scored
    with), overridden by the user's ``options[method]``."""
    return {**spec.planning_options, **(spec.scoring_options if scoring else {}),
            **options.get(spec.name, {})}


def _rescore(module, spec, cands, covs, options, kind, most: int = 24):
    """Candidates re-measured in the output norm on calibration statistics. SVD becomes the
    data-aware (whitened) SVD at every rank; other methods build up to ``most`` candidates
    (spread over their weight-norm frontier; Tucker-2 factorized data-aware) and measure
    ||(W - W~) L|| / ||W L||."""
    if spec.name == "svd":  # the costs stand; only the errors change, all from one spectrum
        errs = whitened_svd_errors(module, covs)
        return [Candidate(c.method, c.ranks, c.form, c.params, c.macs,
                          float(errs[c.ranks[0] - 1]), {DATA_AWARE: True}) for c in cands]
    if len(cands) > most:
        front = pareto(cands, kind)
        step = (len(front) - 1) / (most - 1)
        cands = [front[round(i * step)] for i in range(most)]
    opts = _solver_options(spec, options, scoring=True)
    return measured(spec, [(module, c, covs if spec.data_aware else None) for c in cands], opts)


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
                ranks = layer_ranks(module, spec.name, rule, form=form or "cp4", input_hw=hw)
            except ValueError:
                if method != "auto":
                    raise
                continue  # energy / vbmf are not defined for CP: auto leaves CP out
            ranks = tuple(_round_up(r, rank_multiple) for r in ranks)
        opts = _solver_options(spec, options)
        if not with_target:
            cost = spec.cost(module, ranks, form, shape)
            if cost.params >= dense.params and cost.macs >= dense.macs:
                continue
            if spec.grid_fn is not None:
                found = [Candidate(spec.name, ranks, form, cost.params, cost.macs, math.nan)]
            else:
                found = [spec.candidate_at(module, shape, ranks, form, opts)]
        else:
            grid = (spec.grid(module, shape, form) if spec.grid_fn is not None
                    else spec.candidates(module, shape, form, opts, kind))
            found = [c for c in grid
                     if all(r % rank_multiple == 0 for r in c.ranks) and _within_rule(c, ranks)]
        if spec.grid_fn is not None:
            pending += [(spec, c, covs if spec.data_aware else None) for c in found]
        elif covs is not None:
            cands += _rescore(module, spec, found, covs, options, kind)
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
        done = measured(spec, [(layers[n].module, c, covs) for n, c, covs in items], opts)
        for (name, _, _), c in zip(items, done, strict=True):
            layers[name].cands.append(c)


def plan(model: nn.Module, example_inputs, method: str = "auto", rank=None, target=None, *,
         calib_data=None, max_batches: int | None = None, include=None, exclude=None,
         min_params: int = 1024, rank_multiple: int = 1, options: dict | None = None,
         allow_slower: bool = False, latency_margin: float = 0.05,
         loss_aware: bool | None = None, progress: bool = False) -> Plan:
    """Plan the factorization of ``model`` (see the module docstring).

    Args:
        example_inputs: a tensor or tuple of tensors for one forward pass (shapes, and the
            user's batch size for latency).
        method: ``"auto"`` or one of ``svd``, ``spatial_svd``, ``cp`` (= ``cp4``), ``cp3``,
            ``tucker``.
        rank: a rank rule (``64``, ``"vbmf"``, ``"energy=0.95"``, ``"params=0.25"``, ...).
        target: ``"macs=4x"`` / ``"params=2x"`` (or a fraction, ``"macs=0.25"``) of the whole
            model, met from below within about 1% where the layers' ranks allow; or
            ``"latency=2x"``: the model measured on this device at the batch of
            ``example_inputs`` runs in at most half the dense time (MACs are allocated, and their
            budget searched until the measured latency meets the target).
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
        allow_slower: by default every chosen factorization is timed against its dense layer
            on the model's device (batch 1 and the batch of ``example_inputs``) and one measured
            slower by more than ``latency_margin`` (a fraction, for timing noise) is vetoed;
            the budget is then spent elsewhere. ``True`` skips the timing.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if method not in method_choices():
        raise ValueError(f"method: expected one of {', '.join(method_choices())}, got "
                         f"{method!r}")
    if rank is None and target is None:
        raise ValueError("rank, target: give a rank rule, a target, or both")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple: expected an int >= 1, got {rank_multiple!r}")
    rule = parse_rank(rank) if rank is not None else None
    kind, fraction = parse_target(target) if target is not None else (None, None)
    cost_kind = "macs" if kind == "latency" else kind  # what the allocation spends
    options = _check_solver_options(options)
    inputs = as_inputs(example_inputs)
    guard = None if allow_slower else LatencyGuard((1, batch_of(inputs)), margin=latency_margin)

    eligible = target_layers(model, include, exclude, min_params=min_params)
    for name, reason in eligible.items():
        if reason is None:
            check_weights(name, model.get_submodule(name))
    shapes = layer_input_shapes(model, inputs)
    covs = {}
    if calib_data is not None:
        names = [n for n, r in eligible.items() if r is None and n in shapes]
        covs = input_second_moments(model, names, calib_data, max_batches=max_batches)
    result = Plan(meta={"method": method, "rank": None if rule is None else str(rule),
                        "target": None if target is None else str(target)})
    layers: dict[str, _Layer] = {}
    pending: dict[str, list[tuple]] = {}
    for name, reason in _steps(eligible.items(), progress, "planning: scoring candidates"):
        module = model.get_submodule(name)
        if reason is None and name not in shapes:
            reason = "not called in the forward pass on example_inputs"
        if reason is not None:
            result[name] = LayerPlan.skipped(reason, type(module).__name__)
            continue
        shape = shapes[name]
        cands, pending[name] = _layer_candidates(module, shape, method, rule, target is not None,
                                                 cost_kind, rank_multiple, options,
                                                 covs.get(name))
        dense_cost = cost_at(module, shape)
        dense = Candidate("dense", (), None, dense_cost.params, dense_cost.macs, 0.0)
        layers[name] = _Layer(module, shape, cands, dense)
    _measure(layers, pending, options, progress)

    if loss_aware is None:
        loss_aware = calib_data is not None and target is not None
    if loss_aware and (calib_data is None or target is None):
        raise ValueError("loss_aware: needs calib_data and a target")
    if target is not None and not layers:
        why = sorted({r for r in (lp.reason for lp in result.values()) if r})
        raise ValueError("target: nothing to factorize: " + (
            f"every Conv2d/Linear layer is skipped ({'; '.join(why[:3])})" if why
            else "the model has no Conv2d or Linear layer"))
    choose = _Chooser(layers, cost_kind, guard)
    if target is None:
        chosen = choose(None)
    else:
        fixed = {"params": count_params(model), "macs": 0}
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d | nn.Linear) and name in shapes:
                fixed["macs"] += cost_at(module, shapes[name]).macs
        fixed[cost_kind] -= sum(layer.dense.cost(cost_kind) for layer in layers.values())
        choose.fixed = fixed[cost_kind]
        whole = fixed[cost_kind] + sum(layer.dense.cost(cost_kind) for layer in layers.values())
        if loss_aware:
            weights = _damage_weights(model, layers, covs, calib_data, cost_kind,
                                      fraction * whole, choose.fixed, options, progress)
            for name, w in weights.items():
                layers[name].cands = damage.weighted(layers[name].cands, w)
            result.meta["damage_weights"] = weights
        if kind == "latency":
            chosen, budget, timing = _meet_latency(model, example_inputs, result, choose,
                                                   whole, fraction, options)
            result.meta["latency"] = timing
        else:
            budget = fraction * whole
            chosen = choose(budget)
        result.meta["budget"] = {cost_kind: budget}
    _fill(result, chosen, layers, options, guard)
    if target is None and layers and not result.active:
        why = ("every factorization was measured slower than its dense layer on this device "
               "(pass allow_slower=True to keep them)" if choose.vetoed
               else "no layer's factorization is smaller than the dense layer")
        warnings.warn(f"rank: at the ranks of {rule} {why}; nothing is factorized",
                      stacklevel=2)
    if guard is not None:
        result.meta["latency_guard"] = {**guard.settings(), "vetoed": choose.vetoed}
    _summarise(result, model, shapes)
    return result


def _damage_weights(model, layers, covs, calib_data, kind, budget, fixed, options,
                    progress=False) -> dict:
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
    return damage.layer_weights(model, probes, errors, calib_data, progress=progress)


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


class _Chooser:
    """One candidate per layer: the least error (``budget=None``) or the allocation under a
    budget; with a latency guard, repeated until no chosen factorization is measured slower
    than its dense layer (each veto removes candidates, so this ends)."""

    def __init__(self, layers: dict[str, _Layer], kind, guard: LatencyGuard | None):
        self.layers, self.kind, self.guard = layers, kind, guard
        self.fixed = 0.0
        self.vetoed: dict[str, list[str]] = {}

    def _pick(self, budget) -> dict[str, Candidate]:
        if budget is None:
            return {n: min(layer.cands, key=lambda c: c.error, default=layer.dense)
                    for n, layer in self.layers.items()}
        frontiers = {n: pareto([*layer.cands, layer.dense], self.kind)
                     for n, layer in self.layers.items()}
        try:
            return allocate(frontiers, self.kind, budget, self.fixed)
        except ValueError as err:
            if self.vetoed:
                raise ValueError(f"{err}; {sum(map(len, self.vetoed.values()))} factorizations "
                                 "were vetoed as slower than dense on this device (pass "
                                 "allow_slower=True to allow them)") from None
            raise

    def __call__(self, budget) -> dict[str, Candidate]:
        while True:
            chosen = self._pick(budget)
            if self.guard is None:
                return chosen
            slow = [(n, c) for n, c in chosen.items() if c.method != "dense" and self.guard.slower(
                n, self.layers[n].module, self.layers[n].shape, c)]
            if not slow:
                return chosen
            for n, c in slow:
                self.layers[n].cands = drop_slower(self.layers[n].cands, c)
                self.vetoed.setdefault(n, []).append(c.describe())


def _meet_latency(model, example_inputs, result, choose, whole, fraction, options):
    """Bisection on the MACs budget for the largest one whose plan, timed on this device at the
    batch of ``example_inputs`` interleaved with the dense model, runs within ``fraction`` of
    the dense model's latency."""

    def timed(budget):
        chosen = choose(budget)
        trial = Plan(dict(result.layers))
        _fill(trial, chosen, choose.layers, options, None)
        dense, small = compare_latency(model, structure(model, trial), example_inputs)
        return chosen, small.median_ms / dense.median_ms, (dense, small)

    lo = choose.fixed + sum(pareto([*layer.cands, layer.dense], choose.kind)[0].cost(choose.kind)
                            for layer in choose.layers.values())
    chosen, ratio, times = timed(lo)
    if ratio > fraction:
        raise ValueError(f"target: latency {1 / fraction:.3g}x cannot be met on this device: the "
                         f"cheapest plan runs at {ratio:.2f} of the dense model's time "
                         f"({times[1].median_ms:.3f} ms against {times[0]})")
    best, hi = (chosen, lo, ratio, times), float(whole)
    for _ in range(10):
        mid = (lo + hi) / 2
        chosen, ratio, times = timed(mid)
        if ratio <= fraction:
            best, lo = (chosen, mid, ratio, times), mid
        else:
            hi = mid
    chosen, budget, ratio, (dense, small) = best
    return chosen, budget, {"dense_ms": dense.median_ms, "planned_ms": small.median_ms,
                            "ratio": ratio, "goal_ratio": fraction, "batch": dense.batch,
                            "threads": dense.threads, "device": dense.device}


def _fill(result: Plan, chosen: dict[str, Candidate], layers: dict[str, _Layer], options,
          guard: LatencyGuard | None) -> None:
    for name, cand in chosen.items():
        layer = layers[name]
        module_type = type(layer.module).__name__
        if cand.method != "dense":
            result[name] = _layer_plan(cand, layer.module, options)
            if guard is not None:
                result[name].predicted.update(guard.measure(name, layer.module, layer.shape,
                                                            cand))
            continue
        if not layer.cands and guard is not None:
            why = "kept dense: every factorization was measured slower than dense"
        elif not layer.cands:
            why = ("kept dense: no candidate within the rank rule smaller than the dense "
                   "layer")
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
                     predicted={"params": c.params, "macs": c.macs, "error": error, **extra},
                     module_type=type(module).__name__,
                     reason=f"{c.describe()}: predicted error {error:.3f}")


def _summarise(result: Plan, model: nn.Module, shapes) -> None:
    """Predicted whole-model params and MACs before and after, into the plan's meta."""
    before = {"params": count_params(model), "macs": 0}
    after = {"params": before["params"], "macs": 0}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear) or name not in shapes:
            continue
        dense = cost_at(module, shapes[name])
        lp = result.layers.get(name)
        new = dense if lp is None or lp.skip else lp.spec.cost(module, lp.ranks, lp.form,
                                                               shapes[name])
        before["macs"] += dense.macs
        after["macs"] += new.macs
        after["params"] += new.params - dense.params
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
