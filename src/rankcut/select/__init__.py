"""Strategies that choose ranks and methods, and produce Plans.

The global planner :func:`plan` (also ``rankcut.plan``); per-layer rules (:mod:`.rules`): fixed,
params/MACs fraction, energy, EVBMF; sensitivity allocation (:mod:`.sensitivity`): Astrid &
Lee's / seed 000's total-rank budget split; the latency table the planner prices time with
(:mod:`.latency`); the candidate cache that lets plans of one model to several targets share
their costly part (:mod:`.cache`).
"""

from .budget import SlowerThanDense, TargetUnreachable, allocate
from .cache import CandidateCache
from .latency import LatencyTable
from .planner import parse_target, plan
from .rules import RankRule, layer_ranks, parse_rank
from .sensitivity import allocate_ranks, layer_sensitivities, mean_loss, sensitivity_plan

__all__ = [
    "CandidateCache",
    "LatencyTable",
    "RankRule",
    "SlowerThanDense",
    "TargetUnreachable",
    "allocate",
    "allocate_ranks",
    "layer_ranks",
    "layer_sensitivities",
    "mean_loss",
    "parse_rank",
    "parse_target",
    "plan",
    "sensitivity_plan",
]
