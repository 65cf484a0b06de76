"""Strategies that choose ranks and methods, and produce Plans.

Per-layer rules (:mod:`.rules`): fixed, params/MACs fraction, energy, EVBMF. Sensitivity
allocation (:mod:`.sensitivity`): Astrid & Lee's / seed 000's total-rank budget split.
"""

from .rules import RankRule, layer_ranks, parse_rank
from .sensitivity import allocate_ranks, layer_sensitivities, mean_loss, sensitivity_plan

__all__ = [
    "RankRule",
    "allocate_ranks",
    "layer_ranks",
    "layer_sensitivities",
    "mean_loss",
    "parse_rank",
    "sensitivity_plan",
]
