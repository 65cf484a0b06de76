"""Error-versus-cost curves of one layer under each factorization, computed cheaply.

A :class:`Candidate` is one way to replace a layer (method, ranks, form) with its predicted
params, MACs and relative weight error ||W - W~||_F / ||W||_F. The curves come from one
decomposition per layer and method wherever the mathematics allows:

- channel SVD / CUR-sized SVD and spatial SVD: the tail energy of the singular values gives the
  error of every rank at once (Eckart-Young);
- Tucker-2: with U_T, U_S the full eigenbases of the mode-T and mode-S Gram matrices and
  G = W ×_T U_Tᵀ ×_S U_Sᵀ, truncated HOSVD at (r_T, r_S) keeps G[:r_T, :r_S], so a 2-D cumulative
  sum of the squared core gives the error of every rank pair (HOOI, used to build the layer,
  can only do better);
- CP: ALS at a handful of ranks (no closed form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import decompose as dec
from ..decompose.svd import whitening_factor
from ..layers import layer_cost
from ..plans import LayerPlan

AUTO_METHODS = ("svd", "spatial_svd", "cp3", "cp4", "tucker")
# CP-ALS settings for scoring candidates: enough to rank them; the planned layer gets the full run
CP_SCORING = {"max_iter": 50, "tol": 1e-5}


@dataclass(frozen=True)
class Candidate:
    method: str  # "dense", "svd", "spatial_svd", "cp", "tucker"
    ranks: tuple[int, ...]
    form: str | None
    params: int
    macs: int
    error: float  # relative weight error (0 for dense)
    extra: dict = field(default_factory=dict, compare=False)

    def cost(self, kind: str) -> int:
        return self.params if kind == "params" else self.macs

    def layer_plan(self, **kwargs) -> LayerPlan:
        return LayerPlan(self.method, self.ranks, form=self.form,
                         predicted={"params": self.params, "macs": self.macs,
                                    "error": self.error, **self.extra}, **kwargs)


def _groups(module: nn.Module) -> list[torch.Tensor]:
    W = module.weight.detach().double()
    if isinstance(module, nn.Linear):
        return [W]
    g = module.groups
    t = module.out_channels // g
    return [W[i * t:(i + 1) * t] for i in range(g)]


def _candidate(module, method, ranks, form, error, input_hw) -> Candidate:
    lp = LayerPlan(method, ranks, form=form)
    cost = layer_cost(module, lp.layer_config(module), input_hw=input_hw)
    return Candidate(method, lp.ranks, lp.form, cost.params, cost.macs, float(error))


def _tail_errors(mats: list[torch.Tensor]) -> torch.Tensor:
    """err[r-1] = relative error of keeping r singular triplets in every matrix."""
    tails = []
    for M in mats:
        s2 = torch.linalg.svdvals(M).pow(2)
        tail = s2.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i >= r} s_i²
        tails.append(torch.cat([tail[1:], tail.new_zeros(1)]))
    total = sum(M.pow(2).sum() for M in mats)
    summed = torch.stack(tails).sum(0)
    return (summed / total.clamp_min(1e-300)).clamp_min(0).sqrt()


def svd_curve(module: nn.Module, input_hw=None, method: str = "svd") -> list[Candidate]:
    """Channel SVD at every rank (also the sizes of CUR with as many columns)."""
    mats = [b.reshape(b.shape[0], -1) for b in _groups(module)]
    errs = _tail_errors(mats)
    return [_candidate(module, method, (r,), None, errs[r - 1], input_hw)
            for r in range(1, len(errs) + 1)]


def spatial_curve(module: nn.Conv2d, input_hw) -> list[Candidate]:
    mats = [b.permute(1, 2, 0, 3).reshape(b.shape[1] * b.shape[2], -1) for b in _groups(module)]
    errs = _tail_errors(mats)
    return [_candidate(module, "spatial_svd", (r,), None, errs[r - 1], input_hw)
            for r in range(1, len(errs) + 1)]


def tucker_errors(module: nn.Conv2d) -> torch.Tensor:
    """E[r_T-1, r_S-1] = relative error of truncated HOSVD at (r_T, r_S), all groups alike."""
    kept = None
    total = 0.0
    for W in _groups(module):
        t, s = W.shape[:2]
        _, Ut = torch.linalg.eigh(W.reshape(t, -1) @ W.reshape(t, -1).mT)
        Ws = W.transpose(0, 1).reshape(s, -1)
        _, Us = torch.linalg.eigh(Ws @ Ws.mT)
        Ut, Us = Ut.flip(1), Us.flip(1)  # leading directions first
        core = torch.einsum("ta,tsij,sb->abij", Ut, W, Us)
        energy = core.pow(2).sum((2, 3)).cumsum(0).cumsum(1)
        kept = energy if kept is None else kept + energy
        total += float(W.pow(2).sum())
    return ((total - kept) / max(total, 1e-300)).clamp_min(0).sqrt()


def tucker_candidate(module: nn.Conv2d, ranks, error, input_hw) -> Candidate:
    return _candidate(module, "tucker", tuple(ranks), None, error, input_hw)


def tucker_curve(module: nn.Conv2d, input_hw, kind: str = "params") -> list[Candidate]:
    """The Pareto frontier (on ``kind``) of Tucker-2 over every rank pair (r_T, r_S).

    A Tucker-2 layer's params and MACs are bilinear in the ranks, a·r_S + b·r_T·r_S + c·r_T + d,
    so four priced configurations give the coefficients and every pair is priced at once.
    """
    E = tucker_errors(module)
    t, s = E.shape

    def price(r_t, r_s):
        return getattr(layer_cost(module, {"layer": "TuckerConv2d", "ranks": [r_t, r_s]},
                                  input_hw=input_hw), kind)

    c11, c21, c12, c22 = price(1, 1), price(2, 1), price(1, 2), price(2, 2)
    b = c22 - c21 - c12 + c11
    c, a = c21 - c11 - b, c12 - c11 - b
    d = c11 - a - b - c
    r_t = torch.arange(1, t + 1, dtype=torch.float64)[:, None]
    r_s = torch.arange(1, s + 1, dtype=torch.float64)[None, :]
    cost = (a * r_s + b * r_t * r_s + c * r_t + d).flatten()
    order = torch.argsort(cost * (1 + 1e-12) + E.flatten() * 1e-30, stable=True)
    best = torch.cummin(E.flatten()[order], 0).values
    improves = torch.cat([torch.tensor([True]), best[1:] < best[:-1] - 1e-12])
    keep = order[improves & (E.flatten()[order] <= best + 1e-15)]
    return [tucker_candidate(module, (int(i) // s + 1, int(i) % s + 1), E.flatten()[i], input_hw)
            for i in keep.tolist()]


def cp_candidate(module: nn.Conv2d, input_hw, rank: int, form: str = "cp4",
                 options: dict | None = None) -> Candidate:
    """CP-ALS of every group at ``rank``; the error is measured, not predicted."""
    g = module.groups
    t, s = module.out_channels // g, module.in_channels // g
    kh, kw = module.kernel_size
    opts = {**CP_SCORING, **(options or {})}
    lost = total = 0.0
    for W in _groups(module):
        X = W.float() if form == "cp4" else W.float().reshape(t, s, kh * kw)
        res = dec.cp(X, rank, **opts)
        energy = float(W.pow(2).sum())
        lost += res.rel_error**2 * energy
        total += energy
    return _candidate(module, "cp", (rank,), form, math.sqrt(lost / max(total, 1e-300)), input_hw)


def cp_curve(module: nn.Conv2d, input_hw, form: str = "cp4", n_ranks: int = 8,
             options: dict | None = None) -> list[Candidate]:
    """CP-ALS at ``n_ranks`` ranks spaced geometrically up to the rank whose layer has half the
    dense layer's parameters (beyond that CP rarely pays)."""
    g = module.groups
    t, s = module.out_channels // g, module.in_channels // g
    kh, kw = module.kernel_size
    per_rank = s + (kh + kw if form == "cp4" else kh * kw) + t
    top = max(1, (t * s * kh * kw) // (2 * per_rank))
    ranks = sorted({max(1, round(top ** (i / (n_ranks - 1)))) for i in range(n_ranks)})
    return [cp_candidate(module, input_hw, r, form, options) for r in ranks]


def pareto(cands: list[Candidate], kind: str) -> list[Candidate]:
    """The candidates not beaten on both cost and error, cheapest first."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.cost(kind), c.error)):
        if not out or c.error < out[-1].error - 1e-12:
            out.append(c)
    return out


def whitened_svd_errors(module: nn.Module, covs: list[torch.Tensor]) -> torch.Tensor:
    """err[r-1] = output-norm error ||(W - W~) L|| / ||W L|| of data-aware channel SVD at rank r
    (every group at rank r), L the whitening factor of each group's input second moment."""
    mats = [b.reshape(b.shape[0], -1) @ whitening_factor(c, device=b.device)
            for b, c in zip(_groups(module), covs, strict=True)]
    return _tail_errors(mats)


def output_error(module: nn.Module, approx: torch.Tensor, covs: list[torch.Tensor]) -> float:
    """||(W - W~) L|| / ||W L|| over the groups, for the dense weight W and an approximation."""
    lost = kept = 0.0
    t = approx.shape[0] // len(covs)
    for g, (W, C) in enumerate(zip(_groups(module), covs, strict=True)):
        D = (W - approx[g * t:(g + 1) * t].double()).reshape(t, -1)
        Wm = W.reshape(t, -1)
        C = C.to(W.device)
        lost += float(((D @ C) * D).sum())
        kept += float(((Wm @ C) * Wm).sum())
    return math.sqrt(max(lost, 0.0) / max(kept, 1e-300))
