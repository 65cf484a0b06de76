"""Error-versus-cost curves of one layer under each factorization, computed cheaply.

A :class:`Candidate` is one way to replace a layer (method, ranks, form) with its predicted
params, MACs and relative weight error ||W - W~||_F / ||W||_F. The curves come from one
decomposition per layer and method wherever the mathematics allows:

- channel SVD and spatial SVD: the tail energy of the singular values gives the error of every
  rank at once (Eckart-Young);
- Tucker-2: with U_T, U_S the full eigenbases of the mode-T and mode-S Gram matrices and
  G = W ×_T U_Tᵀ ×_S U_Sᵀ, truncated HOSVD at (r_T, r_S) keeps G[:r_T, :r_S], so a 2-D cumulative
  sum of the squared core gives the error of every rank pair (HOOI, used to build the layer,
  can only do better);
- CP and CUR: the decomposition at a handful of ranks (no closed form).

Each method of the registry (:mod:`rankcut.methods`) names its ``curve_fn`` and ``at_fn``
here; both take the :class:`~rankcut.methods.Method` itself first, which prices a candidate
(``method.cost``), so no layer configuration is spelled out twice. ``shape`` is a layer's
recorded input: (H, W) for a Conv2d, (rows per sample,) for a Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .decompose.svd import reuse_svds, tail_errors, truncation_errors, whitened_spectrum
from .layers import group_matrices, weight_blocks
from .layers.base import decomposition_dtype

# The plan option (and candidate mark) of a layer factorized on its input statistics
DATA_AWARE = "data_aware"

# Solver settings for scoring candidates: enough to rank them; the planned layer gets the full
# run. CP-ALS: 50 sweeps, fewer where a sweep is large (at most 2.5e10 multiply-adds a candidate:
# every CIFAR ResNet kernel gets its 50, a 512x512x3x3 kernel at rank 1145 gets 4). The planned
# layer starts from the same point and only improves on it, so a capped score is an upper bound
# on the error the plan will have: large CP candidates are rated pessimistically, never
# optimistically. Data-aware Tucker-2: the closed-form start and two alternating sweeps,
# within 0.1% of the converged relative output error on the ResNet-20 layers (HOOI gains little
# after its first sweep there), at a quarter of the time.
CP_SCORING = {"max_iter": 50, "tol": 1e-5, "max_work": 2.5e10}

# Ranks that suit the kernels are multiples of this: on the development CPU a whole ResNet-20 or
# VGG-11-BN at batch 32 and 2x fewer MACs with every rank a multiple of 8 ran 1.1-1.5x faster in
# eager and 1.5-2.4x in ONNX Runtime than the same target at any rank (an ad-hoc run with
# rank_multiple=8, docs/planning.md). The Tucker-2 curve
# keeps the best such rank pairs beside the best of all pairs, CP is scored at such ranks, and
# the latency table times a rank as its next multiple (so the planner, pricing time, sees why).
RANK_ALIGN = 8
TUCKER_SCORING = {"max_iter": 2}


COST_KINDS = ("params", "macs", "latency")  # what a candidate's cost() is counted in


@dataclass(frozen=True)
class Candidate:
    method: str  # "dense" or a registry name ("svd", "cur", "spatial_svd", "cp", "tucker")
    ranks: tuple[int, ...]
    form: str | None
    params: int
    macs: int
    error: float  # relative weight (or output) error; 0 for dense
    extra: dict = field(default_factory=dict, compare=False)
    # predicted time as a fraction of the dense model's (rankcut.select.latency), once timed
    latency: float | None = field(default=None, compare=False)

    def cost(self, kind: str) -> float:
        if kind == "latency":
            if self.latency is None:
                raise ValueError(f"{self.describe()}: not timed")
            return self.latency
        if kind not in COST_KINDS:  # (a misspelt kind was read as MACs)
            raise ValueError(f"kind: expected one of {', '.join(COST_KINDS)}, got {kind!r}")
        return self.params if kind == "params" else self.macs

    def describe(self) -> str:
        """``"cp/cp4 at 8"``: how reasons and vetoes name a candidate."""
        return f"{self.method}{'/' + self.form if self.form else ''} at " \
               f"{','.join(map(str, self.ranks))}"


def priced(method, module, shape, ranks, form, error, extra=None) -> Candidate:
    """The candidate ``method`` at ``ranks``, priced by the method's layer."""
    cost = method.cost(module, ranks, form, shape)
    return Candidate(method.name, tuple(ranks), form, cost.params, cost.macs, float(error),
                     dict(extra or {}))


def geometric_ranks(top: int, n: int = 8) -> list[int]:
    """``n`` ranks spaced geometrically from 1 to ``top`` (fewer when they coincide)."""
    return sorted({max(1, round(top ** (i / (n - 1)))) for i in range(n)})


def geometric_aligned_ranks(top: int, n: int = 8) -> list[int]:
    """:func:`geometric_ranks`, those from :data:`RANK_ALIGN` up rounded to its multiples
    (the ranks that suit the kernels, and a ``rank_multiple`` of 2, 4 or 8)."""
    return sorted({r if r < RANK_ALIGN else round(r / RANK_ALIGN) * RANK_ALIGN
                   for r in geometric_ranks(top, n)})


# ------------------------------------------------------------------------- SVD and spatial SVD

def _spectral_curve(method, module, shape, matrices: str) -> list[Candidate]:
    errs = truncation_errors(group_matrices(module, matrices, torch.float64))
    return [priced(method, module, shape, (r,), None, errs[r - 1])
            for r in range(1, len(errs) + 1)]


def svd_curve(method, module, shape, form=None, options=None, kind="params"):
    """Channel SVD at every rank."""
    return _spectral_curve(method, module, shape, "channel")


def spatial_curve(method, module, shape, form=None, options=None, kind="params"):
    """Spatial SVD at every rank."""
    return _spectral_curve(method, module, shape, "spatial")


def from_curve_at(method, module, shape, ranks, form=None, options=None) -> Candidate:
    """The curve's candidate at ``ranks[0]`` (clamped to the full rank)."""
    curve = method.candidates(module, shape, form, options)
    return curve[min(ranks[0], len(curve)) - 1]


# -------------------------------------------------------------------------------- Tucker-2

def tucker_errors(module: nn.Conv2d) -> torch.Tensor:
    """E[r_T-1, r_S-1] = relative error of truncated HOSVD at (r_T, r_S), all groups alike; on
    the CPU whatever the layer's device (a small table, indexed beside the CPU cost grids)."""
    kept = None
    total = 0.0
    for W in weight_blocks(module, torch.float64):
        t, s = W.shape[:2]
        _, Ut = torch.linalg.eigh(W.reshape(t, -1) @ W.reshape(t, -1).mT)
        Ws = W.transpose(0, 1).reshape(s, -1)
        _, Us = torch.linalg.eigh(Ws @ Ws.mT)
        Ut, Us = Ut.flip(1), Us.flip(1)  # leading directions first
        core = torch.einsum("ta,tsij,sb->abij", Ut, W, Us)
        energy = core.pow(2).sum((2, 3)).cumsum(0).cumsum(1)
        kept = energy if kept is None else kept + energy
        total += float(W.pow(2).sum())
    return ((total - kept) / max(total, 1e-300)).clamp_min(0).sqrt().cpu()


def _core_bound(module: nn.Conv2d) -> int:
    """How many times one Tucker-2 rank may exceed the other: kh·kw (a mode's rank is at most
    the product of the others' core sizes; a layer built higher holds fewer)."""
    return module.kernel_size[0] * module.kernel_size[1]


def tucker_at(method, module, shape, ranks, form=None, options=None) -> Candidate:
    E = tucker_errors(module)
    r_out, r_in = min(ranks[0], E.shape[0]), min(ranks[1], E.shape[1])
    k = _core_bound(module)
    r_out, r_in = min(r_out, r_in * k), min(r_in, r_out * k)
    return priced(method, module, shape, (r_out, r_in), None, E[r_out - 1, r_in - 1])


def tucker_curve(method, module, shape, form=None, options=None, kind="params"):
    """The Pareto frontier (on ``kind``) of Tucker-2 over every rank pair (r_T, r_S).

    A Tucker-2 layer's params and MACs are bilinear in the ranks, a·r_S + b·r_T·r_S + c·r_T + d,
    so four priced configurations give the coefficients and every pair is priced at once.
    """
    E = tucker_errors(module)
    t, s = E.shape
    priced_at = {(r_t, r_s): method.cost(module, (r_t, r_s), None, shape)
                 for r_t, r_s in ((1, 1), (2, 1), (1, 2), (2, 2))}
    r_t = torch.arange(1, t + 1, dtype=torch.float64)[:, None]
    r_s = torch.arange(1, s + 1, dtype=torch.float64)[None, :]

    def grid(which):  # every pair's params or MACs, from the bilinear form
        c11, c21, c12, c22 = (getattr(priced_at[k], which) for k in priced_at)
        b = c22 - c21 - c12 + c11
        c, a = c21 - c11 - b, c12 - c11 - b
        d = c11 - a - b - c
        return (a * r_s + b * r_t * r_s + c * r_t + d).flatten()

    cost, params, macs = grid(kind), grid("params"), grid("macs")
    flat = E.flatten()
    k = _core_bound(module)
    buildable = ((r_t <= r_s * k) & (r_s <= r_t * k)).flatten()
    aligned = (aligned_ranks(t)[:, None] & aligned_ranks(s)[None, :]).flatten() & buildable
    keep = sorted({*_front(cost, flat, buildable.nonzero().flatten()).tolist(),
                   *_front(cost, flat, aligned.nonzero().flatten()).tolist()})
    return [Candidate(method.name, (i // s + 1, i % s + 1), None, round(float(params[i])),
                      round(float(macs[i])), float(flat[i])) for i in keep]


def aligned(ranks, full=()) -> bool:
    """Whether every rank suits the kernels: a multiple of :data:`RANK_ALIGN`, or the full size
    ``full[i]`` of its mode (nothing is cut there: a Tucker-2 rank equal to the channels); the one
    definition the curves, the candidates' rescoring and the clock share. ``full`` is meant for
    the modes of a full factorization (``Method.max_rank`` of SVD, Tucker-2, ...); CP's is a
    break-even rank, above any CP candidate scored."""
    return all(r % RANK_ALIGN == 0 or (i < len(full) and r == full[i])
               for i, r in enumerate(ranks))


def aligned_ranks(n: int) -> torch.Tensor:
    """Which of the ranks 1..n of a mode of size n are :func:`aligned`."""
    return torch.tensor([aligned((r,), (n,)) for r in range(1, n + 1)])


def _front(cost: torch.Tensor, error: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """The indices in ``among`` not beaten on both ``cost`` and ``error`` by another of them
    (of equal costs, the lowest error only)."""
    by_error = among[torch.argsort(error[among], stable=True)]  # then by cost: a lexical sort
    order = by_error[torch.argsort(cost[by_error], stable=True)]
    best = torch.cummin(error[order], 0).values
    improves = torch.cat([torch.tensor([True]), best[1:] < best[:-1] - 1e-12])
    return order[improves & (error[order] <= best + 1e-15)]


# -------------------------------------------------------------------------------------- CP

def cp_at(method, module, shape, ranks, form="cp4", options=None) -> Candidate:
    """CP-ALS of every group at ``ranks[0]``; the error is measured, not predicted."""
    grid = [priced(method, module, shape, ranks[:1], form, math.nan)]
    return measured(method, [(module, shape, grid[0], None)],
                    {**CP_SCORING, **(options or {})})[0]


def cp_grid(method, module, shape, form="cp4", n_ranks: int = 8) -> list[Candidate]:
    """The CP ranks worth scoring, priced but not yet measured (error NaN): ``n_ranks`` spaced
    geometrically up to the rank whose layer has half the dense layer's parameters (beyond that
    CP rarely pays). :func:`measured` gives their errors, for many layers at once."""
    top = max(1, method.max_rank(module, form)[0] // 2)
    return [priced(method, module, shape, (r,), form, math.nan)
            for r in geometric_aligned_ranks(top, n_ranks)]


def cp_curve(method, module, shape, form="cp4", options=None, kind="params", n_ranks: int = 8):
    """:func:`cp_grid`, measured in the weight norm."""
    return measured(method, [(module, shape, c, None)
                             for c in cp_grid(method, module, shape, form, n_ranks)],
                    {**CP_SCORING, **(options or {})})


def measured(method, jobs, options=None) -> list[Candidate]:
    """Each ``(module, shape, candidate, covs)`` of ``jobs`` (``shape``: the layer's input
    height and width, or None) with its error measured on the layer ``method`` builds:
    relative output error ||(W - W~) L|| / ||W L|| where ``covs`` (the layer's input moments;
    the layer is then factorized data-aware and the candidate marked so, when ``method`` has a
    data-aware form: a method without one builds it from the weights alone and measures it
    in the output norm all the same, so that all candidates of a layer compare in one norm),
    relative weight error otherwise. The layers of one (ranks, form) are built together
    (``method.from_dense_many``: CP runs all their kernels of a shape as one batched solve). A
    layer built at other ranks than asked (CUR sampled by leverage scores keeps about as many
    columns as the rank) is priced at the ranks it has; the candidate keeps the ranks asked
    for, which rebuild it."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, c, covs) in enumerate(jobs):
        groups.setdefault((c.ranks, c.form, covs is None), []).append(i)
    out: list = [None] * len(jobs)
    norms: dict[int, float] = {}  # output_norm per layer, shared by its candidates
    for (ranks, form, plain), members in groups.items():
        aware = not plain and method.data_aware
        layers = method.from_dense_many([jobs[i][0] for i in members], ranks, form,
                                        [jobs[i][3] for i in members] if aware else None,
                                        options)
        for i, layer in zip(members, layers, strict=True):
            module, shape, c, covs = jobs[i]
            with torch.no_grad():
                approx = layer.dense_weight()
            if covs is None:
                W = module.weight.detach().double()
                error = float((W - approx.double()).norm() / W.norm().clamp_min(1e-300))
            elif aware and "output_error" in layer.info and (options or {}).get(
                    "ridge") is None:
                # the solver's own, exact for it at its default ridge (a larger ridge fits,
                # and measures, in the norm of Σ + ridge, not of the inputs' Σ)
                error = layer.info["output_error"]
            else:
                if id(module) not in norms:
                    norms[id(module)] = output_norm(module, covs)
                error = output_error(module, approx, covs, norms[id(module)])
            built = layer.built_ranks()
            params, macs = c.params, c.macs
            if built != tuple(c.ranks):
                cost = method.cost(module, built, c.form, shape)
                params, macs = cost.params, cost.macs
            out[i] = Candidate(c.method, c.ranks, c.form, params, macs, error,
                               {**c.extra, **({DATA_AWARE: True} if aware else {})})
    return out


# ------------------------------------------------------------------------------------- CUR

def cur_grid(method, module, shape, form=None, n_ranks: int = 8) -> list[Candidate]:
    """The CUR ranks worth scoring, priced but not yet measured (error NaN): ``n_ranks`` spaced
    geometrically up to the break-even rank (:func:`geometric_aligned_ranks`). :func:`measured`
    builds them (data-aware on calibration moments: no data-free solve first, which for a
    4096 x 25,088 layer is a full SVD), measures their errors and prices the width a sampled
    solver (leverage, CX) realises."""
    # up to the full rank or, below it, the rank whose layer has as many weights as the dense
    # one (beyond it the dense layer is cheaper and exact)
    per_rank = (method.cost(module, (2,), None, shape).params
                - method.cost(module, (1,), None, shape).params)
    top = max(1, min(method.max_rank(module)[0], module.weight.numel() // max(per_rank, 1)))
    # (rounding to the kernels' multiples can land above top: a rank the solver would clamp,
    # priced above the dense layer)
    return [priced(method, module, shape, (r,), None, math.nan)
            for r in sorted({min(r, top) for r in geometric_aligned_ranks(top, n_ranks)})]


def cur_at(method, module, shape, ranks, form=None, options=None) -> Candidate:
    """CUR at ``ranks[0]`` (clamped to the full rank), built as the layer is, its weight error
    measured."""
    r = min(ranks[0], method.max_rank(module)[0])
    return measured(method, [(module, shape, priced(method, module, shape, (r,), None,
                                                    math.nan), None)], options)[0]


def cur_curve(method, module, shape, form=None, options=None, kind="params", n_ranks: int = 8):
    """:func:`cur_grid`, measured in the weight norm (every rank beyond the randomized range
    finder's reach picks from one full SVD of each group's matrix, computed once for all)."""
    with reuse_svds(max_entries=2 * module.groups if isinstance(module, nn.Conv2d) else 2):
        return measured(method, [(module, shape, c, None)
                                 for c in cur_grid(method, module, shape, form, n_ranks)],
                        options)


# ------------------------------------------------------------------------- scoring helpers

def pareto(cands: list[Candidate], kind: str) -> list[Candidate]:
    """The candidates not beaten on both cost and error, cheapest first; one whose error is NaN
    (a failed solve) is no candidate: left out, even the cheapest (an allocation that needed it
    would otherwise take it once its price of cost overflowed)."""
    out: list[Candidate] = []
    for c in sorted((c for c in cands if not math.isnan(c.error)),
                    key=lambda c: (c.cost(kind), c.error)):
        if not out or c.error < out[-1].error - 1e-12:
            out.append(c)
    return out


def whitened_svd_errors(module: nn.Module, covs: list[torch.Tensor]) -> torch.Tensor:
    """err[r-1] = output-norm error ||(W - W~) L|| / ||W L|| of data-aware channel SVD at rank r
    (every group at rank r), L the whitening factor of each group's input second moment."""
    # in the dtype the factorization reads the weight in (the spectrum is computed in float64
    # either way), so that inside reuse_svds the factorization finds the Gram computed here
    mats = group_matrices(module, "channel", decomposition_dtype(module.weight))
    return tail_errors([whitened_spectrum(M, c) for M, c in zip(mats, covs, strict=True)])


def output_norm(module: nn.Module, covs: list[torch.Tensor]) -> float:
    """||W L||² over the groups: the dense layer's output energy on inputs of moments ``covs``
    (the denominator of :func:`output_error`, the same for every candidate of the layer)."""
    kept = 0.0
    for W, C in zip(weight_blocks(module, torch.float64), covs, strict=True):
        Wm = W.reshape(W.shape[0], -1)
        kept += float(((Wm @ C.to(W.device)) * Wm).sum())
    return kept


def output_error(module: nn.Module, approx: torch.Tensor, covs: list[torch.Tensor],
                 kept: float | None = None) -> float:
    """||(W - W~) L|| / ||W L|| over the groups, for the dense weight W and an approximation
    (``kept``: :func:`output_norm`, when already known)."""
    lost = 0.0
    t = approx.shape[0] // len(covs)
    for g, (W, C) in enumerate(zip(weight_blocks(module, torch.float64), covs, strict=True)):
        D = (W - approx[g * t:(g + 1) * t].double()).reshape(t, -1)
        lost += float(((D @ C.to(W.device)) * D).sum())
    if kept is None:
        kept = output_norm(module, covs)
    return math.sqrt(max(lost, 0.0) / max(kept, 1e-300))
