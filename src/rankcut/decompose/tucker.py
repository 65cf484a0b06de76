"""Tucker decomposition, full or partial: X ≈ G ×_{n∈modes} U_n, U_n with orthonormal columns.

``"hosvd"``
    Truncated higher-order SVD (De Lathauwer, De Moor & Vandewalle 2000, SIAM J. Matrix Anal.
    Appl. 21(4)): U_n = leading left singular vectors of the mode-n unfolding; G = X ×_n U_nᵀ.
``"hooi"``
    Higher-order orthogonal iteration (same authors, "On the best rank-(R1,...,RN)
    approximation"): start from HOSVD, then for each mode in turn U_n = leading left singular
    vectors of (X ×_{m≠n} U_mᵀ)_(n), until the relative error changes by less than ``tol``.

A partial Tucker leaves the modes outside ``modes`` uncompressed: Tucker-2 of a conv kernel
(T, S, kh, kw) uses ``modes=(0, 1)`` (Kim et al. 2016, arXiv 1511.06530). Because the factors are
orthonormal, ||X - X̂||² = ||X||² - ||G||², so the error of every sweep is free.

``cov`` (data-aware Tucker-2)
    With Σ, the second moment of the patches a conv kernel X (T, S, kh, kw) multiplies (ordered
    as the columns of X.reshape(T, -1)), the factors minimise the output error
    ||(X - X̂)_(T) L||_F, L Lᵀ = Σ + ridge, instead of the weight error. X̂_(T) = U_T G (B ⊗ I)
    with B (R_S x S) the input projection (the first 1x1 convolution) and U_T (T x R_T) the
    output one. Given B the rest is a reduced-rank regression, solved exactly: with
    K = (B⊗I) Σ (B⊗I)ᵀ and Y = X_(T) Σ (B⊗I)ᵀ, U_T = leading eigenvectors of Y K⁻¹ Yᵀ and
    G = U_Tᵀ Y K⁻¹. Given U_T, B comes from the Kronecker model Σ ≈ A ⊗ P (A = Σ's channel block
    summed over kernel positions, P = its position block averaged over channels), under which
    the best input projection is closed form: with Gram = Σ_{p,q} P[p,q] V_pᵀ V_q of
    V = U_Tᵀ X (V_p its (R_T x S) slice at kernel position p) and L_A = chol(A), the rows of B
    span L_A⁻ᵀ × the leading R_S eigenvectors of L_Aᵀ Gram L_A (the truncated SVD of
    Gram^½ L_A). The first B is computed from X itself; each sweep then alternates the two
    steps and is kept only if it lowers the exact output error. B's rows are orthonormalised (only
    their span matters), so both factors are orthonormal.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import (
    check_choice,
    check_positive,
    check_rank,
    check_tensor,
    clamp_rank,
    resolvable_error,
)
from ._tensor import leading_left_singular_vectors, multi_mode_product, unfold
from .svd import factorable_moment

TUCKER_METHODS = ("hooi", "hosvd")


@dataclass(frozen=True)
class TuckerResult:
    """Core G and orthonormal factors U_n (I_n x R_n), one per entry of ``modes``."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    modes: tuple[int, ...]
    rel_error: float
    n_iter: int
    converged: bool
    method: str
    errors: list[float] = field(default_factory=list)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(f.shape[1] for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        return multi_mode_product(self.core, dict(zip(self.modes, self.factors, strict=True)))


def _check_modes(modes, ndim) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, int):
        modes = (modes,)
    try:  # integers only: "01" or (0.7, 1.2) are not modes 0 and 1
        if isinstance(modes, str | bytes) or any(isinstance(m, bool) for m in modes):
            raise TypeError
        modes = tuple(operator.index(m) for m in modes)
    except TypeError:
        raise ValueError(f"modes: expected a sequence of mode indices, got {modes!r}") from None
    normal = tuple(m % ndim if -ndim <= m < ndim else None for m in modes)
    if None in normal or len(set(normal)) != len(normal) or not normal:
        raise ValueError(
            f"modes: expected distinct mode indices in [-{ndim}, {ndim - 1}], got {modes!r}"
        )
    return normal


def _check_ranks(ranks, modes, shape) -> tuple[int, ...]:
    if not isinstance(ranks, bool | Sequence):
        try:  # an int, a NumPy integer, a 0-d integer tensor: every mode's rank
            ranks = (operator.index(ranks),) * len(modes)
        except TypeError:
            pass
    if not isinstance(ranks, Sequence) or len(ranks) != len(modes):
        raise ValueError(
            f"ranks: expected an int or a sequence of {len(modes)} ints (one per mode in "
            f"{modes}), got {ranks!r}"
        )
    size = math.prod(shape)
    out = []
    for mode, rank in zip(modes, ranks, strict=True):
        rank = check_rank(rank, f"ranks[mode {mode}]")
        upper = min(shape[mode], size // shape[mode])
        out.append(clamp_rank(rank, upper, f"ranks[mode {mode}]", why=f"shape {tuple(shape)}"))
    # a mode's rank is at most the product of the other modes' core sizes (their ranks, or
    # their sizes where not decomposed): HOOI could find no more, and the layer would hold
    # fewer than asked (a 512x64x3x3 kernel at ranks (256, 16) is at most (144, 16))
    while True:
        core = [shape[m] for m in range(len(shape))]
        for mode, rank in zip(modes, out, strict=True):
            core[mode] = rank
        bounds = [math.prod(core) // core[mode] for mode in modes]
        if all(rank <= bound for rank, bound in zip(out, bounds, strict=True)):
            return tuple(out)
        out = [clamp_rank(rank, bound, f"ranks[mode {mode}]",
                          why=f"the other modes' core sizes {tuple(core)}")
               for mode, rank, bound in zip(modes, out, bounds, strict=True)]


@torch.no_grad()
def tucker(
    X: torch.Tensor,
    ranks,
    modes: Sequence[int] | int | None = None,
    *,
    method: str = "hooi",
    max_iter: int = 50,
    tol: float = 1e-7,
    cov: torch.Tensor | None = None,
    ridge: float = 1e-6,
) -> TuckerResult:
    """Tucker decomposition of ``X`` over ``modes`` (all modes when None).

    Args:
        X: a float32/float64 tensor of order >= 2.
        ranks: an int for every mode in ``modes``, or one per mode; each is clamped, with a
            warning, to what the unfolding can hold.
        modes: the modes to compress; Tucker-2 of a conv kernel is ``(0, 1)``.
        method: ``"hooi"`` (default) or ``"hosvd"``.
        max_iter, tol: HOOI sweeps and the stopping rule on the change of relative error.
        cov: the second moment Σ (n x n, n = X.shape[1] · kh · kw) of the input patches the
            kernel X (T, S, kh, ...) multiplies, in the order of X.reshape(T, -1)'s columns
            (:func:`rankcut.calibrate.input_second_moments`). Given, the Tucker-2
            (``modes=(0, 1)``) minimises the output error ||(X - X̂)_(T) L||_F (module docstring);
            ``method="hosvd"`` stops after the closed-form start, ``"hooi"`` alternates up to
            ``max_iter`` sweeps, each kept only if it lowers the error and stopping once a sweep
            gains less than ``tol``; ``rel_error`` and ``errors`` are then relative output errors
            ||(X - X̂)_(T) L|| / ||X_(T) L||, and the result's ``method`` is ``"whitened"``.
        ridge: regulariser of Σ, relative to its mean diagonal (as in ``svd``).

    Returns:
        :class:`TuckerResult` with the core, factors, modes, exact relative error, sweeps run,
        whether ``tol`` was met (HOSVD: True) and the per-sweep error history.
    """
    check_tensor(X, "X", min_ndim=2)
    modes = _check_modes(modes, X.ndim)
    ranks = _check_ranks(ranks, modes, X.shape)
    check_choice(method, "method", TUCKER_METHODS)
    check_positive(max_iter, "max_iter", integer=True)
    check_positive(tol, "tol", allow_zero=True)
    if cov is not None:
        if modes != (0, 1):
            raise ValueError(f"modes: data-aware Tucker (cov given) is the Tucker-2 of modes "
                             f"(0, 1), got {modes}")
        check_positive(ridge, "ridge")
        return _whitened_tucker2(X, ranks, cov, ridge, method, max_iter, tol)

    factors = {m: leading_left_singular_vectors(unfold(X, m), r) for m, r in zip(modes, ranks,
                                                                                   strict=True)}
    norm_sq = X.pow(2).sum()

    def rel_err(core):  # (an all-zero tensor: 0, not 0/0, so the sweeps converge)
        return float((norm_sq - core.pow(2).sum()).clamp_min(0).sqrt()
                     / norm_sq.sqrt().clamp_min(torch.finfo(norm_sq.dtype).tiny))

    errors: list[float] = []
    n_iter = 0
    converged = method == "hosvd"
    if method == "hooi":
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - reported after the loop
            for mode, rank in zip(modes, ranks, strict=True):
                others = {m: factors[m].mT for m in modes if m != mode}
                Y = multi_mode_product(X, others) if others else X
                factors[mode] = leading_left_singular_vectors(unfold(Y, mode), rank)
            core = multi_mode_product(Y, {mode: factors[mode].mT})
            err = rel_err(core)
            if err < resolvable_error(X.dtype):  # cancelled to noise: measured on the tensor
                approx = multi_mode_product(core, {m: factors[m] for m in modes})
                err = float((X - approx).norm() / norm_sq.sqrt().clamp_min(
                    torch.finfo(norm_sq.dtype).tiny))
            errors.append(err)
            if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
                converged = True
                break
    else:
        core = multi_mode_product(X, {m: factors[m].mT for m in modes})
        errors.append(rel_err(core))

    result_factors = [factors[m] for m in modes]
    approx = multi_mode_product(core, dict(zip(modes, result_factors, strict=True)))
    norm = norm_sq.sqrt()
    rel_error = float((X - approx).norm() / norm) if norm > 0 else 0.0
    return TuckerResult(
        core=core,
        factors=result_factors,
        modes=modes,
        rel_error=rel_error,
        n_iter=n_iter,
        converged=converged,
        method=method,
        errors=errors,
    )


@dataclass
class _Prepared:
    """What the data-aware Tucker-2 of one kernel X under one moment ``cov`` computes before
    any rank matters; the planner scores many rank pairs of the same layer in a row, and on a
    512x512x3x3 kernel this is most of each candidate's time (an n x n Cholesky, n = S·kh·kw,
    and ||W L||², whose product W Σ also gives every candidate's X_(T) Σ (B ⊗ I)ᵀ at a
    fraction of the cost). Kept for the last (X, cov, ridge) only, holding ``cov`` itself and a
    copy of X so that a match is the same data: ``cov`` the same object (held by a weak
    reference) at the same version (an in-place change bumps it), X equal element for element."""

    X: torch.Tensor
    cov_ref: weakref.ref
    version: int | None
    ridge: float
    W: torch.Tensor
    C: torch.Tensor
    WC: torch.Tensor  # W_(T) Σ, as (T, S, K)
    L_A: torch.Tensor
    P: torch.Tensor
    total: float

    def matches(self, X, cov, ridge) -> bool:
        # (an inference-mode moment has no version counter: never matched, recomputed)
        return (self.version is not None and self.cov_ref() is cov
                and self.version == _version(cov) and self.ridge == ridge
                and self.X.shape == X.shape and self.X.device == X.device
                and torch.equal(self.X, X))


_last_prepared: list[_Prepared] = []


def _version(cov: torch.Tensor) -> int | None:
    """``cov``'s version counter (bumped by every in-place change); None for an inference-mode
    tensor, which has none."""
    return None if cov.is_inference() else cov._version


def _prepare(X, cov, ridge) -> _Prepared:
    if _last_prepared and _last_prepared[0].matches(X, cov, ridge):
        return _last_prepared[0]
    T, S = X.shape[:2]
    K = math.prod(X.shape[2:])
    W = X.detach().to(torch.float64).reshape(T, S, K)
    Wm = W.reshape(T, S * K)
    # Σ + ridge = L Lᵀ of the whitening (jittered as the whitening was, where rounding left it
    # a hair short of positive definite: its blocks below are then factorable too)
    C = factorable_moment(cov, ridge, device=X.device)[0]
    C4 = C.reshape(S, K, S, K)  # as (channel, position) x (channel, position)
    L_A = torch.linalg.cholesky(torch.einsum("spqp->sq", C4))  # channel block, over positions
    P = torch.einsum("spsq->pq", C4) / S  # position block, over channels
    WC = Wm @ C
    total = float((WC * Wm).sum())  # ||W L||², L Lᵀ = Σ + ridge
    _last_prepared[:] = [_Prepared(X.detach().clone(), weakref.ref(cov), _version(cov), ridge,
                                   W, C, WC.reshape(T, S, K), L_A, P, total)]
    # the entry (C is as large as cov) goes with cov (if an older cov dies later, it drops a
    # newer entry: a miss, never a wrong hit)
    weakref.finalize(cov, _last_prepared.clear)
    return _last_prepared[0]


def _whitened_tucker2(X, ranks, cov, ridge, method, max_iter, tol) -> TuckerResult:
    """Tucker-2 of X (T, S, ...) in the output norm on inputs of second moment ``cov``."""
    T, S = X.shape[:2]
    K = math.prod(X.shape[2:])
    n = S * K
    check_tensor(cov, "cov", ndim=2)
    if cov.shape != (n, n):
        raise ValueError(f"cov: expected shape ({n}, {n}) (input channels x kernel positions "
                         f"of X), got {tuple(cov.shape)}")
    r_out, r_in = ranks
    prep = _prepare(X, cov, ridge)
    W, C, WC, L_A, P, total = prep.W, prep.C, prep.WC, prep.L_A, prep.P, prep.total
    C4 = C.reshape(S, K, S, K)  # as (channel, position) x (channel, position)

    def input_step(V):  # B (R_S x S, orthonormal rows) from V (R, S, K) under Σ ≈ A ⊗ P
        gram = torch.einsum("rsp,pq,ruq->su", V, P, V)
        _, vecs = torch.linalg.eigh(L_A.mT @ gram @ L_A)
        span = torch.linalg.solve_triangular(L_A.mT, vecs[:, -r_in:].flip(1), upper=True)
        return torch.linalg.qr(span).Q.mT

    def output_step(B):  # exact U_T and core given B; the output error (squared, relative)
        BC = torch.einsum("bs,spuq->bpuq", B, C4)  # (B ⊗ I) Σ
        K_ = torch.einsum("bpuq,cu->bpcq", BC, B).reshape(r_in * K, r_in * K)
        # X_(T) Σ (B ⊗ I)ᵀ from the kept X_(T) Σ (Σ is symmetric): T·n·r_in multiply-adds
        # instead of T·n·r_in·K through BC
        Y = torch.einsum("tsp,bs->tbp", WC, B).reshape(T, r_in * K)
        chol = torch.linalg.cholesky((K_ + K_.mT) / 2)
        Yw = torch.linalg.solve_triangular(chol, Y.mT, upper=False).mT
        vals, vecs = torch.linalg.eigh(Yw @ Yw.mT)
        U = vecs[:, -r_out:].flip(1)
        # U_Tᵀ Y K⁻¹ = (U_Tᵀ Yw) chol⁻¹: one triangular solve, not cholesky_solve's two
        G = torch.linalg.solve_triangular(chol.mT, (U.mT @ Yw).mT, upper=True).mT
        lost = max(total - float(vals[-r_out:].sum()), 0.0)
        return U, G, lost / total if total > 0 else 0.0, (Y, K_)

    B = input_step(W)
    U, G, err, products = output_step(B)
    errors = [math.sqrt(err)]
    n_iter, converged = 0, True
    if method == "hooi":
        converged = False
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - reported after the loop
            B_new = input_step(torch.einsum("ta,tsp->asp", U, W))
            U_new, G_new, err_new, products_new = output_step(B_new)
            gain = errors[-1] - math.sqrt(err_new)
            if gain > 0:
                B, U, G, products = B_new, U_new, G_new, products_new
                errors.append(math.sqrt(err_new))
            if gain <= tol:
                converged = True
                break
    # ||(W - Ŵ) L||² with Ŵ = U G (B ⊗ I), from the products output_step formed anyway:
    # ||W L||² - 2 <U G, W Σ (B ⊗ I)ᵀ> + <G K, G> (U has orthonormal columns), not from an
    # n x n product per candidate
    Y, K_ = products
    UG = U @ G
    lost = total - 2 * float((UG * Y).sum()) + float(((G @ K_) * G).sum())
    rel_error = math.sqrt(max(lost, 0.0) / total) if total > 0 else 0.0
    return TuckerResult(
        core=G.reshape(r_out, r_in, *X.shape[2:]).to(X.dtype),
        factors=[U.to(X.dtype), B.mT.contiguous().to(X.dtype)],
        modes=(0, 1),
        rel_error=rel_error,
        n_iter=n_iter,
        converged=converged,
        method="whitened",
        errors=errors,
    )
