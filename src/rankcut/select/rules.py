"""Per-layer rank rules, and the one way to say them in Python and on the command line.

=====================  ========================================================================
spec                   rank chosen for each layer
=====================  ========================================================================
``64`` or ``"64"``     that rank (Tucker: both channel ranks)
``"params=0.25"``      the largest rank whose factorized layer keeps at most 25% of the dense
                       layer's parameters (``"params=4x"`` says the same); for CP the rule of
                       seed 000 / Astrid & Lee, R = p·floor(prod(dims) / sum(dims))
``"macs=0.25"``        the same on MACs (needs the layer's input size)
``"energy=0.95"``      the smallest rank keeping 95% of the squared singular values (Tucker:
                       per channel unfolding)
``"vbmf"``             the EVBMF rank (Nakajima et al. 2013) of the layer's matrix; Tucker: of the
                       mode-T and mode-S unfoldings (Kim et al. 2016); ``"vbmf=0.3"`` weakens it
                       toward the full rank (MUSCO)
=====================  ========================================================================

A params/MACs rule gives rank 1 when even rank 1 is over the fraction (the cheapest
factorization there is; the planner's targets price every rank instead), and CP's
Astrid & Lee rule counts the factors, not the bias, so it may exceed the fraction by the bias.

Energy and EVBMF need singular values, so they are defined for ``svd``, ``cur``,
``spatial_svd`` and ``tucker``; CP takes a fixed rank or a params/MACs fraction. For a grouped
convolution ranks are per group, and the data-driven rules take the largest over the groups.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import decompose as dec
from .. import methods
from ..decompose._checks import are_counts
from ..layers import group_matrices, layer_cost

KINDS = ("fixed", "params", "macs", "energy", "vbmf")
SPEC_HELP = ("an int >= 1, 'vbmf', 'vbmf=W' (0 <= W <= 1), 'energy=E' (0 < E <= 1), "
             "'params=F' or 'macs=F' (0 < F <= 1, or 'Nx' for 1/N)")


@dataclass(frozen=True)
class RankRule:
    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.value))
        if self.kind == "vbmf":
            return "vbmf" if self.value == 0 else f"vbmf={self.value:g}"
        return f"{self.kind}={self.value:g}"


def parse_rank(spec) -> RankRule:
    """A :class:`RankRule` from an int or a spec string (see the module docstring)."""
    if isinstance(spec, RankRule):
        return spec
    bad = ValueError(f"rank: expected {SPEC_HELP}; got {spec!r}")
    if isinstance(spec, bool):
        raise bad
    if not isinstance(spec, str | float):
        try:  # an int, a NumPy integer, a 0-d integer tensor
            spec = operator.index(spec)
        except TypeError:
            raise bad from None
        if spec < 1:
            raise bad
        return RankRule("fixed", spec)
    if not isinstance(spec, str):
        raise bad
    text = spec.strip().lower()
    if re.fullmatch(r"\d+", text):
        return parse_rank(int(text))
    if text == "vbmf":
        return RankRule("vbmf", 0.0)
    m = re.fullmatch(r"(params|macs|energy|vbmf)\s*=\s*([0-9.]+)\s*(x?)", text)
    if not m:
        raise bad
    kind, number, times = m.group(1), m.group(2), m.group(3)
    try:
        value = float(number)
    except ValueError:
        raise bad from None
    if times:
        if kind not in ("params", "macs") or value <= 1:
            raise bad
        value = 1.0 / value
    if kind == "vbmf" and not 0 <= value <= 1:
        raise bad
    if kind in ("params", "macs", "energy") and not 0 < value <= 1:
        raise bad
    return RankRule(kind, value)


def _spectral_rank(M: torch.Tensor, rule: RankRule) -> int:
    if rule.kind == "energy":
        return dec.energy_rank(torch.linalg.svdvals(M), rule.value)
    return max(1, dec.evbmf(M, weakening=rule.value).rank)


def _largest_within(budget: float, cost_of, upper: int) -> int:
    """The largest r in [1, upper] with cost_of(r) <= budget (cost increasing in r); 1 if none."""
    lo, hi = 1, upper
    if cost_of(1) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost_of(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def layer_ranks(module: nn.Module, method: str, rule, *, form: str | None = None,
                input_hw=None) -> tuple[int, ...]:
    """The ranks ``rule`` gives ``module`` under ``method`` (a method or form name, e.g. "cp3";
    Tucker: (R_out, R_in)). A method that does not apply to ``module`` is a ValueError saying
    why, whatever the rule."""
    rule = parse_rank(rule)
    if not isinstance(module, nn.Conv2d | nn.Linear):
        raise ValueError(f"module: expected a Conv2d or Linear, got {type(module).__name__}")
    # (a form's own name, "cp3", says its form; the method's name takes ``form``, its
    # default form when None)
    spec, form = methods.resolve(method, form if method in methods.REGISTRY else None)
    if (reason := spec.why_not(module)) is not None:
        raise ValueError(f"module: {reason}")
    method = spec.name
    if rule.kind == "fixed":
        r = int(rule.value)
        return (r, r) if spec.n_ranks == 2 else (r,)
    is_conv = isinstance(module, nn.Conv2d)
    g = module.groups if is_conv else 1
    t = (module.out_channels if is_conv else module.out_features) // g
    s = (module.in_channels if is_conv else module.in_features) // g
    kh, kw = module.kernel_size if is_conv else (1, 1)

    if rule.kind in ("energy", "vbmf"):
        if not spec.spectra:
            raise ValueError(f"rank: {rule} is not defined for {spec.name.upper()} (no singular "
                             "values); use a fixed rank, 'params=F' or 'macs=F'")
        ranks = tuple(max(_spectral_rank(M, rule) for M in group_matrices(module, matrices))
                      for matrices in spec.spectra)
        if len(ranks) == 2:  # (Tucker-2) a core holds no more than kh·kw times one rank
            k = kh * kw  # in the other
            ranks = (min(ranks[0], ranks[1] * k), min(ranks[1], ranks[0] * k))
        return ranks

    # params / macs fractions
    if rule.kind == "params" and spec.name == "cp":
        # seed 000's rule for CP: p times the break-even rank (max_rank), p·floor(prod/sum)
        return (max(1, int(rule.value * spec.max_rank(module, form)[0])),)
    if input_hw is not None and not are_counts(input_hw, 2):
        raise ValueError(f"input_hw: expected (H, W) of the input, got {input_hw!r}")
    if rule.kind == "macs" and is_conv and input_hw is None:
        raise ValueError("input_hw: the 'macs=' rule needs the convolution's input size")
    if rule.kind == "params" and is_conv and input_hw is None:
        input_hw = (1, 1)  # parameters do not depend on it
    budget = rule.value * getattr(layer_cost(module, input_hw=input_hw), rule.kind)

    def cost(ranks):
        return getattr(spec.cost(module, ranks, form, input_hw if is_conv else (1,)),
                       rule.kind)

    if spec.n_ranks == 2:
        # R_in in proportion to R_out, but within kh·kw times it either way: a Tucker-2 core
        # cannot hold a mode rank above the product of the others (it would be built lower)
        def pair(r: int) -> tuple[int, int]:
            k = kh * kw
            r_in = min(s, r * k, max(1, round(r * s / t), -(-r // k)))
            return (min(r, r_in * k), r_in)

        return pair(_largest_within(budget, lambda r: cost(pair(r)), t))
    return (_largest_within(budget, lambda r: cost((r,)), spec.max_rank(module, form)[0]),)
