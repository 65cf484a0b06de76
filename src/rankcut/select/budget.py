"""Spend a global budget (params or MACs) across layers where it does the least damage.

Each layer offers a Pareto frontier of candidates (cost up, error down; the dense layer is the
last, error 0). Choosing one per layer to minimise the total damage Σ error² under
Σ cost <= budget is a multiple-choice knapsack. It is solved by Lagrangian relaxation (for a
price λ each layer independently takes argmin error² + λ·cost; a bisection on λ finds the
cheapest price that fits), then the slack left by the discrete choice is spent greedily on the
upgrades with the best damage reduction per unit cost that still fit.
"""

from __future__ import annotations

from ..curves import Candidate


def _pick(frontier: list[Candidate], kind: str, price: float) -> int:
    return min(range(len(frontier)),
               key=lambda i: frontier[i].error ** 2 + price * frontier[i].cost(kind))


def allocate(frontiers: dict[str, list[Candidate]], kind: str, budget: float,
             fixed: float = 0.0) -> dict[str, Candidate]:
    """One candidate per layer with ``fixed + Σ cost <= budget`` and least ``Σ error²``.

    ``frontiers`` must each be Pareto-sorted (cheapest first). ``fixed`` is the cost of
    everything not being planned. Raises ``ValueError`` when even the cheapest choice is over.
    """
    room = budget - fixed
    cheapest = sum(f[0].cost(kind) for f in frontiers.values())
    if cheapest > room:
        raise ValueError(
            f"target: cannot be met; the cheapest plan over the eligible layers costs "
            f"{cheapest + fixed:,.0f} {kind} against a budget of {budget:,.0f} "
            f"({fixed:,.0f} of it in layers left dense)")
    if not frontiers:
        return {}

    def total(choice):
        return sum(frontiers[n][i].cost(kind) for n, i in choice.items())

    lo, hi = 0.0, 1.0
    while total({n: _pick(f, kind, hi) for n, f in frontiers.items()}) > room:
        hi *= 4.0
    for _ in range(100):  # bisection on the price of one unit of cost
        mid = (lo + hi) / 2
        if total({n: _pick(f, kind, mid) for n, f in frontiers.items()}) > room:
            lo = mid
        else:
            hi = mid
    choice = {n: _pick(f, kind, hi) for n, f in frontiers.items()}

    # Spend the slack: the best error² reduction per unit of cost that still fits.
    slack = room - total(choice)
    while True:
        best, best_gain = None, 0.0
        for name, i in choice.items():
            frontier = frontiers[name]
            for j in range(i + 1, len(frontier)):
                extra = frontier[j].cost(kind) - frontier[i].cost(kind)
                if extra > slack:
                    break
                gain = (frontier[i].error ** 2 - frontier[j].error ** 2) / max(extra, 1e-12)
                if gain > best_gain:
                    best, best_gain = (name, j, extra), gain
        if best is None:
            break
        name, j, extra = best
        choice[name] = j
        slack -= extra
    return {n: frontiers[n][i] for n, i in choice.items()}
