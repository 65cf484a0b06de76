"""Spend a global budget (params, MACs or time) across layers where it does the least damage.

Each layer offers a Pareto frontier of candidates (cost up, error down; the dense layer is the
last, error 0). Choosing one per layer to minimise the total damage Σ error² under
Σ cost <= budget is a multiple-choice knapsack. It is solved by Lagrangian relaxation (for a
price λ each layer independently takes argmin error² + λ·cost; a bisection on λ finds the
cheapest price that fits), then the slack left by the discrete choice is spent greedily on the
upgrades with the best damage reduction per unit cost that still fit.

With a ``score`` other than error² (the planner adds μ·time to keep a MACs-budgeted plan no
slower than dense), the frontiers are re-drawn on that score.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from ..curves import COST_KINDS, Candidate


class TargetUnreachable(ValueError):
    """A target no plan meets: below the cheapest plan over the eligible layers, or (the
    latency guard on) not without running slower than the dense model. Callers that sweep
    targets end a series or skip a point on it; any other ValueError is a fault."""


class SlowerThanDense(TargetUnreachable):
    """A target that, with the latency guard on, only plans measured slower than the dense
    model meet (a params or MACs target; a latency target whose plans all measured slower than
    dense); ``allow_slower=True`` (``--allow-slower``) plans it without the guard."""


def _damage(c: Candidate) -> float:
    return c.error ** 2


def frontier(cands: list[Candidate], kind: str, score: Callable = _damage) -> list[Candidate]:
    """The candidates not beaten on both cost and ``score``, cheapest first; one whose score is
    NaN (a failed solve) is left out, even the cheapest (:func:`rankcut.curves.pareto`)."""
    scored = [(c.cost(kind), value, i) for i, c in enumerate(cands)  # each score once
              if not math.isnan(value := score(c))]
    out: list[Candidate] = []
    last = None
    for _, value, i in sorted(scored, key=lambda t: (t[0], t[1])):
        if last is None or value < last - 1e-15:
            out.append(cands[i])
            last = value
    return out


def _pick(scores: np.ndarray, costs: np.ndarray, price: float) -> int:
    """The first index of the least ``score + price·cost`` (float64, as Python computes it; a
    NaN score, from a failed solve, is never the least)."""
    values = scores + price * costs
    return int(np.argmin(np.where(np.isnan(values), np.inf, values)))


def allocate(frontiers: dict[str, list[Candidate]], kind: str, budget: float,
             fixed: float = 0.0, score: Callable | None = None) -> dict[str, Candidate]:
    """One candidate per layer with ``fixed + Σ cost <= budget`` and a low ``Σ score``
    (default: ``Σ error²``), by Lagrangian relaxation (a price per unit of cost, bisected) and
    greedy filling of what budget is left: never over the budget, not always the exact
    optimum of this knapsack.

    ``frontiers`` must each be Pareto-sorted (cheapest first) unless ``score`` is given (they
    are then re-drawn on it). ``fixed`` is the cost of everything not being planned. Raises
    ``ValueError`` when even the cheapest choice is over.
    """
    if kind not in COST_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(COST_KINDS)}, got {kind!r}")
    for what, value in (("budget", budget), ("fixed", fixed)):
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value)):
            raise ValueError(f"{what}: expected a finite number, got {value!r}")
    empty = [n for n, f in frontiers.items() if not f]
    if empty:
        raise ValueError(f"frontiers: layer {empty[0]!r} has no candidate (each layer needs "
                         "at least one, e.g. the dense layer)")
    if score is not None:
        frontiers = {n: frontier(f, kind, score) for n, f in frontiers.items()}
    score = score or _damage
    room = budget - fixed
    cheapest = sum(f[0].cost(kind) for f in frontiers.values())
    if cheapest > room:
        def amount(v):
            return f"{v:.3f} of the dense model's time" if kind == "latency" else \
                f"{v:,.0f} {kind}"
        raise TargetUnreachable(
            f"target: cannot be met; the cheapest plan over the eligible layers costs "
            f"{amount(cheapest + fixed)} against a budget of {amount(budget)} "
            f"({amount(fixed)} of it outside the eligible layers)")
    if not frontiers:
        return {}

    scores = {n: np.array([score(c) for c in f], dtype=np.float64) for n, f in frontiers.items()}
    costs = {n: np.array([c.cost(kind) for c in f], dtype=np.float64)
             for n, f in frontiers.items()}

    def total(choice):
        return sum(costs[n][i] for n, i in choice.items())

    def picks(price):
        return {n: _pick(scores[n], costs[n], price) for n in frontiers}

    lo, hi = 0.0, 1.0
    while total(picks(hi)) > room:
        hi *= 4.0
    for _ in range(100):  # bisection on the price of one unit of cost
        mid = (lo + hi) / 2
        if total(picks(mid)) > room:
            lo = mid
        else:
            hi = mid
    choice = picks(hi)

    # Spend the slack: the best error² reduction per unit of cost that still fits.
    slack = room - total(choice)
    scores = {n: a.tolist() for n, a in scores.items()}  # element access in Python loops
    costs = {n: a.tolist() for n, a in costs.items()}
    while True:
        best, best_gain = None, 0.0
        for name, i in choice.items():
            front = frontiers[name]
            for j in range(i + 1, len(front)):
                extra = costs[name][j] - costs[name][i]
                if extra > slack:
                    break
                gain = (scores[name][i] - scores[name][j]) / max(extra, 1e-12)
                if gain > best_gain:
                    best, best_gain = (name, j, extra), gain
        if best is None:
            break
        name, j, extra = best
        choice[name] = j
        slack -= extra
    return {n: frontiers[n][i] for n, i in choice.items()}
