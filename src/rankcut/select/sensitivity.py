"""Ranks by sensitivity (Astrid & Lee 2017, arXiv 1701.07148; seed 000).

Each layer is decomposed alone at a small trial rank and the loss of the network on calibration
batches is measured; a layer whose damage hurts more gets more of a total-rank budget:

    share_i = (1 - λ) · loss_i / Σ loss + λ · size_i / Σ size
    rank_i  = floor(share_i · total), then the ranks left over are handed out one at a time to the
              layers in order (round-robin) until the ranks sum to the total.

With λ = 0 and seed 000's measured AlexNet losses this gives exactly its published ranks
(conv 164/147/169/140/130 of 750, FC 318/321/261 of 900; a test checks it). λ > 0 favours
large layers, as the size regulariser of Astrid & Lee does. Every rank is at least 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import methods
from .._modes import eval_mode, model_device
from ..calibrate import check_reusable
from ..decompose._checks import are_counts, is_count
from ..plans import LayerPlan, Plan
from ..surgery import _check_plan, apply
from .planner import parse_target


def allocate_ranks(losses: Sequence[float], sizes: Sequence[float], total: int,
                   lam: float = 0.0) -> list[int]:
    """Split ``total`` ranks over layers by sensitivity ``losses`` and ``sizes`` (see above)."""
    n = len(losses)
    if n == 0 or len(sizes) != n:
        raise ValueError(f"losses, sizes: expected two non-empty sequences of equal length, "
                         f"got {len(losses)} and {len(sizes)}")
    if (not all(math.isfinite(x) and x >= 0 for x in [*losses, *sizes]) or sum(losses) <= 0
            or sum(sizes) <= 0):  # (a NaN loss: a layer whose trial diverged)
        raise ValueError(f"losses, sizes: expected finite non-negative values with a positive "
                         f"sum, got {list(losses)} and {list(sizes)}")
    if total is None:
        raise ValueError(f"total: expected an int >= the number of layers ({n}), got None")
    _check_total_lam(n, total, lam)
    loss_sum, size_sum = float(sum(losses)), float(sum(sizes))
    shares = [(1 - lam) * loss / loss_sum + lam * size / size_sum
              for loss, size in zip(losses, sizes, strict=True)]
    # (a hair above the floor: a share times the total that is a whole number in exact
    # arithmetic can land just below it in floating point)
    ranks = [max(1, math.floor(share * total + 1e-9)) for share in shares]
    i = 0
    while sum(ranks) < total:  # leftovers, round-robin from the first layer
        ranks[i % n] += 1
        i += 1
    while sum(ranks) > total:  # only when the minimum of 1 overshot: take from the largest
        ranks[ranks.index(max(ranks))] -= 1
    return ranks


def _check_trial_rank(rank) -> None:
    if not (is_count(rank) or are_counts(rank)):
        raise ValueError(f"trial_rank: expected an int >= 1 (or a tuple of them, the method's "
                         f"ranks), got {rank!r}")


def _check_total_lam(n: int, total, lam) -> None:
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)
                              or total < n):
        raise ValueError(f"total: expected an int >= the number of layers ({n}), got {total!r}")
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
        raise ValueError(f"lam: expected a number in [0, 1], got {lam!r}")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, loss_fn: Callable) -> float:
    """Mean of ``loss_fn(model(x), y)`` over ``(x, y)`` batches, in eval mode (with
    cross-entropy, labels beyond the model's outputs refused by name, not an IndexError)."""
    from ..train.losses import check_targets

    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            out, y = model(x.to(device)), y.to(device)
            if loss_fn is nn.functional.cross_entropy and isinstance(out, torch.Tensor):
                check_targets(out, y)
            total += float(loss_fn(out, y)) * len(x)
            count += len(x)
    if count == 0:
        raise ValueError("batches: expected at least one (inputs, targets) batch")
    return total / count


def _uniform(module: nn.Module, method: str, rank, form, options, **fields) -> LayerPlan:
    """``method`` at ``rank`` (every rank of the method; a tuple: the method's ranks, when it
    has as many) for ``module``; a layer the method does not apply to (a Linear under CP) gets
    the registry's fallback, channel SVD, without the method's options."""
    fitting = methods.variants(method, module)
    if not fitting:  # ("auto" has no uniform rank: a depthwise conv has no method of it)
        raise ValueError(f"method: {method!r} gives no uniform factorization of this "
                         f"{type(module).__name__}; name one method (e.g. 'cp', 'tucker')")
    spec, default_form = fitting[0]
    asked = methods.resolve(method)[0]
    ranks = tuple(rank) if isinstance(rank, tuple | list) and len(rank) == spec.n_ranks else (
        (rank if isinstance(rank, numbers.Integral) else rank[0]),) * spec.n_ranks
    return LayerPlan(spec.name, ranks,
                     form=(form or default_form) if spec.forms else None,
                     options=dict(options or {}) if spec is asked else {}, **fields)


def layer_sensitivities(model: nn.Module, names: Sequence[str], batches: Sequence,
                        loss_fn: Callable = nn.functional.cross_entropy, *,
                        method: str = "cp", trial_rank: int | tuple[int, ...] = 5,
                        form: str | None = None,
                        options: dict | None = None) -> dict[str, float]:
    """Loss on ``batches`` after decomposing each layer alone at ``trial_rank`` (the others
    dense; a tuple: the method's ranks, e.g. Tucker's (R_out, R_in)). Linear layers use SVD
    whatever ``method`` is (a CP of a matrix is its SVD)."""
    _check_trial_rank(trial_rank)
    losses = {}
    for name in names:
        lp = _uniform(model.get_submodule(name), method, trial_rank, form, options)
        losses[name] = mean_loss(apply(model, Plan({name: lp})), batches, loss_fn)
    return losses


def _caps(model: nn.Module, names: Sequence[str], method: str, form) -> list[int]:
    """The largest rank worth giving each layer under ``method`` (its ``max_rank``: a full
    factorization; for CP the rank with the dense layer's parameters)."""
    caps = []
    for name in names:
        module = model.get_submodule(name)
        spec, default_form = methods.variants(method, module)[0]
        caps.append(min(spec.max_rank(module, (form or default_form) if spec.forms else None)))
    return caps


def _capped(ranks: Sequence[int], caps: Sequence[int]) -> list[int]:
    return [min(r, c) for r, c in zip(ranks, caps, strict=True)]


def _params(model: nn.Module, names: Sequence[str], ranks: Sequence[int], method: str,
            form) -> int:
    """Parameters of ``names`` factorized by ``method`` at ``ranks`` (weights and biases)."""
    total = 0
    for name, rank in zip(names, ranks, strict=True):
        module = model.get_submodule(name)
        spec, default_form = methods.variants(method, module)[0]
        # parameters do not depend on the input size; (1, 1) stands in for a conv's
        total += spec.cost(module, (rank,) * spec.n_ranks,
                           (form or default_form) if spec.forms else None,
                           (1, 1) if isinstance(module, nn.Conv2d) else (1,)).params
    return total


def _total_for(model, names, losses, sizes, lam, method, form, target) -> int:
    """The largest total rank whose allocation (each rank capped at the layer's ``_caps``)
    keeps ``names`` within ``target`` ("params=F" or "params=Nx" of their dense parameters).
    Ranks grow with the total, so a bisection; the leftover ranks go round-robin, so the
    parameters are not quite monotone in the total: a few totals above are tried too."""
    kind, fraction = parse_target(target)
    if kind != "params":
        raise ValueError(f"target: sensitivity ranks take a params target, got {target!r}")
    budget = fraction * sum(sizes)
    caps = _caps(model, names, method, form)

    def fits(total: int) -> bool:
        ranks = _capped(allocate_ranks(losses, sizes, total, lam), caps)
        return _params(model, names, ranks, method, form) <= budget

    low = len(names)
    if not fits(low):
        raise ValueError(f"target: {target} is below even rank 1 in every layer")
    high = low
    while fits(high * 2):
        high *= 2
        if high > 1 << 24:
            break
    high *= 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return max([t for t in range(low + 1, low + 2 * len(names) + 1) if fits(t)], default=low)


def sensitivity_plan(model: nn.Module, names: Sequence[str], batches: Sequence,
                     total: int | None = None, *,
                     loss_fn: Callable = nn.functional.cross_entropy, method: str = "cp",
                     trial_rank: int = 5, lam: float = 0.0, form: str | None = None,
                     options: dict | None = None, target: str | None = None) -> Plan:
    """A plan giving ``names`` ranks summing to ``total`` by sensitivity (seed 000 splits the
    convolutions (750) and the classifier layers (900) into two calls; a rank above a layer's
    full rank, its method's ``max_rank``, is capped there); or, with ``target``
    ("params=3x" or "params=0.33") instead of ``total``, the largest total whose plan keeps
    those layers within that share of their dense parameters."""
    if (total is None) == (target is None):
        raise ValueError("give total (a total rank) or target (e.g. 'params=3x'), not both")
    # every argument checked before the layers' trial decompositions (minutes)
    if isinstance(names, str) or not names:
        raise ValueError(f"names: expected a non-empty list of layer names, got {names!r}")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"names: the model has no module {name!r}") from None
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise ValueError(f"names: {name!r} is a {type(module).__name__}, not a Conv2d or "
                             "Linear")
    _check_total_lam(len(names), total, lam)
    _check_trial_rank(trial_rank)
    # the trial plans themselves (a layer the method cannot factorize at that rank: a 1-channel
    # input, a depthwise conv, shared or non-finite weights), refused now, not after the trials
    # of the layers before it
    _check_plan(model, Plan({name: _uniform(model.get_submodule(name), method, trial_rank, form,
                                            options) for name in names}))
    check_reusable(batches, "batches")  # read once per layer
    if target is not None and parse_target(target)[0] != "params":
        raise ValueError(f"target: sensitivity ranks take a params target, got {target!r}")
    losses = layer_sensitivities(model, names, batches, loss_fn, method=method,
                                 trial_rank=trial_rank, form=form, options=options)
    sizes = [sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names]
    if target is not None:
        total = _total_for(model, names, [losses[n] for n in names], sizes, lam, method, form,
                           target)
    # a rank past the layer's full rank (its max_rank) buys nothing: capped
    ranks = _capped(allocate_ranks([losses[n] for n in names], sizes, total, lam),
                    _caps(model, names, method, form))
    plan = Plan(meta={"rank": f"sensitivity total={total} lam={lam} trial_rank={trial_rank}",
                      "target": None if target is None else str(target)})
    for name, rank, size in zip(names, ranks, sizes, strict=True):
        module = model.get_submodule(name)
        plan[name] = _uniform(
            module, method, rank, form, options,
            predicted={"sensitivity_loss": losses[name], "dense_params": size},
            reason=f"sensitivity: loss {losses[name]:.4f} at trial rank {trial_rank}",
            module_type=type(module).__name__)
    return plan
