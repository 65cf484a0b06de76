"""CUR decompositions: W ≈ C @ U @ R with C actual columns and R actual rows of W.

Four ways to pick the columns and rows:

``"linear_time"``
    LinearTimeCUR of Drineas, Kannan & Mahoney (2006), "Fast Monte Carlo algorithms for matrices
    III", SIAM J. Comput. 36(1). Sample ``c`` columns i.i.d. with p_j = ||W_:j||² / ||W||_F² and
    scale each by 1/sqrt(c p_j) -> C; sample ``r`` rows i.i.d. with q_i = ||W_i:||² / ||W||_F² and
    scale by 1/sqrt(r q_i) -> R; the same rows of C with the same scaling -> Ψ (r x c);
    U = ([CᵀC]_k)⁺ Ψᵀ, with [·]_k the best rank-k part.
``"leverage"``
    Mahoney & Drineas (2009), "CUR matrix decompositions for improved data analysis", PNAS 106(3).
    With V_k the top-k right singular vectors, π_j = (1/k) Σ_ξ V_jξ²; keep column j with
    probability min(1, c π_j) -> C (unscaled); the same on Wᵀ with the left singular vectors -> R;
    U = C⁺ W R⁺. With c = O(k log k / ε²) the error is within (2 + ε) of the best rank-k error
    with high probability.
``"cx"``
    Columns only: C chosen as in ``"leverage"``, X = C⁺ W, so W ≈ C @ U with ``R`` None. This is
    what the code of seed 001 actually ran under the name CUR.
``"deim"``
    Deterministic: discrete empirical interpolation (Sorensen & Embree 2016, "A DEIM induced CUR
    factorization", SIAM J. Sci. Comput. 38(3)) on the leading singular vectors picks exactly
    ``n_cols`` columns and ``n_rows`` rows; U = C⁺ W R⁺. Reproducible without a seed.
``"rx"``
    Rows only, the transpose of CX (a row interpolative decomposition): R = ``n_rows`` actual
    rows picked by DEIM on the leading left singular vectors, W ≈ X R with X = W R⁺. For a layer,
    the picked output units are computed exactly and the others as combinations of them.

Data-aware (``cov``, the second moment Σ of the layer's inputs, as for :func:`svd`): the error
is the output error ||(W - W~) L|| / ||W L|| with L Lᵀ = Σ + ridge. Rows are picked on the
left singular vectors of W L (the output directions the inputs excite), columns on the right
singular vectors of U_kᵀ W (how each column reaches those directions; linear-time samples rows
by their output energy and columns by ||U_kᵀ W_:j||²), and the middle factor is the one that
minimises the output error for those rows and columns: U = C⁺ (W Σ Rᵀ)(R Σ Rᵀ)⁺ (CUR),
X = (W Σ Rᵀ)(R Σ Rᵀ)⁺ (RX), X = C⁺ W (CX, whose optimum does not depend on Σ). The rows and
columns are still W's own. With ``entries`` E they are E's instead while W is the map fitted:
sequential fitting fits the corrected weight W' (the best map from the inputs the layer really
gets to the dense outputs) with the dense weight's own rows and columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_positive,
    check_rank,
    check_tensor,
    clamp_rank,
    make_generator,
)
from .svd import (
    _gram_eigh,
    _reused,
    _squared_singular_values,
    full_svd,
    leading_singular_vectors,
    randomized_pays,
    ridge_of,
    whitening_factor,
)

CUR_METHODS = ("leverage", "linear_time", "cx", "deim", "rx")
_DEIM = ("deim", "rx")  # deterministic: rows (and columns) by DEIM of singular vectors


@dataclass(frozen=True)
class CURResult:
    """W ≈ C @ U @ R (C @ U for CX, U @ R for RX). ``col_idx``/``row_idx`` index the
    columns/rows of W. ``rel_error`` is the relative output error when fitted on data."""

    C: torch.Tensor | None
    U: torch.Tensor
    R: torch.Tensor | None
    col_idx: torch.Tensor | None
    row_idx: torch.Tensor | None
    rel_error: float
    method: str
    data_aware: bool = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with W ≈ A @ B: the two layers a factorized layer is built from (C and U R;
        C and U for CX; U and R for RX)."""
        if self.R is None:
            return self.C, self.U
        if self.C is None:
            return self.U, self.R
        return self.C, self.U @ self.R

    def to_matrix(self) -> torch.Tensor:
        A, B = self.factors()
        return A @ B


def _sample_iid(probs: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs.double().cpu(), count, replacement=True, generator=generator)


def _distribution(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` normalised to sum to 1; uniform where they are all zero (a zero matrix)."""
    total = weights.sum()
    if float(total) > 0:
        return weights / total
    return torch.full_like(weights, 1.0 / weights.numel())


def _sample_bernoulli(keep_prob: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    keep_prob = keep_prob.double().cpu()
    for _ in range(100):
        kept = torch.nonzero(torch.rand(keep_prob.shape, generator=generator, dtype=torch.float64)
                             < keep_prob).flatten()
        if kept.numel() > 0:
            return kept
    return keep_prob.argmax().reshape(1)  # only reached when every probability is tiny


def _leverage_select(vectors: torch.Tensor, expected: int, generator) -> torch.Tensor:
    """Indices kept with probability min(1, c π_j), π_j the normalised leverage scores."""
    scores = vectors.pow(2).sum(dim=1) / vectors.shape[1]
    return _sample_bernoulli((expected * scores).clamp(max=1.0), generator)


def _deim(vectors: torch.Tensor) -> torch.Tensor:
    """DEIM indices of the orthonormal columns of ``vectors`` (n x k): k distinct rows.

    DEIM's greedy step (pick the row where column j's residual, after interpolating it on the
    rows picked so far, is largest) is Gaussian elimination with partial pivoting: that residual
    is column j of the Schur complement, and the pivot is its largest entry. So the picks are
    the first k row pivots of the LU factorization of ``vectors``: O(n·k²) in one LAPACK call,
    against O(k⁴) for solving the j x j interpolation system at every step."""
    n, k = vectors.shape
    _, pivots = torch.linalg.lu_factor(vectors.cpu().double())
    order = list(range(n))
    for i, p in enumerate((pivots - 1).tolist()):  # LAPACK's row swaps, 1-based
        order[i], order[p] = order[p], order[i]
    return torch.tensor(order[:k])


def _truncated_pinv_gram(C: torch.Tensor, k: int) -> torch.Tensor:
    """([CᵀC]_k)⁺ from the eigendecomposition of the Gram matrix."""
    evals, evecs = torch.linalg.eigh(C.mT @ C)
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    tol = evals.max().clamp_min(0) * max(C.shape) * torch.finfo(C.dtype).eps
    inv = torch.where(evals > tol, 1.0 / evals, torch.zeros_like(evals))
    return (evecs * inv) @ evecs.mT


def _core_from_svd(full, col_idx: torch.Tensor, row_idx: torch.Tensor | None):
    """(U, relative error) of CUR (CX where ``row_idx`` is None) with C = W[:, col_idx] and
    R = W[row_idx], from the thin SVD W = Q diag(s) Vᵀ (``full``), in its k = min(m, n)
    coordinates. C = Q A with A = diag(s) Vᵀ[:, col_idx] and R = B Vᵀ with B = Q[row_idx] diag(s);
    as Q has orthonormal columns and Vᵀ orthonormal rows, C⁺ = A⁺ Qᵀ and R⁺ = V B⁺, so
    U = C⁺ W R⁺ = A⁺ diag(s) B⁺ (CX: C⁺ W = A⁺ diag(s) Vᵀ) and ||W - C U R|| = ||diag(s) - A U B||.
    The same U as ``pinv(C) @ W @ pinv(R)`` (A and C share their singular values, and the
    cut-offs are pinv's own) without the pseudo-inverse of the r x n matrix R or any m x n
    product: a 4096 x 25,088 layer's CUR at rank 3,000 in a fraction of the time."""
    Q, s, Vh = full
    eps = torch.finfo(s.dtype).eps
    m, n = Q.shape[0], Vh.shape[1]
    A = s[:, None] * Vh[:, col_idx]
    A_pinv = torch.linalg.pinv(A, rtol=max(m, A.shape[1]) * eps)
    if row_idx is None:
        U = (A_pinv * s) @ Vh
        core = A @ (A_pinv * s)
    else:
        B = Q[row_idx] * s
        U = (A_pinv * s) @ torch.linalg.pinv(B, rtol=max(B.shape[0], n) * eps)
        core = A @ U @ B
    core.diagonal().sub_(s)  # A U B - diag(s), in place
    norm = s.norm()
    return U, (float(core.norm() / norm) if norm > 0 else 0.0)


@torch.no_grad()
def cur(
    W: torch.Tensor,
    rank: int,
    *,
    method: str = "leverage",
    n_cols: int | None = None,
    n_rows: int | None = None,
    seed=0,
    cov: torch.Tensor | None = None,
    ridge: float = 1e-6,
    entries: torch.Tensor | None = None,
) -> CURResult:
    """CUR (or CX, RX) decomposition of the matrix ``W`` (m x n).

    Args:
        W: a float32/float64 matrix.
        rank: the target rank k (of the leverage scores, of [CᵀC]_k; for DEIM the default
            and least number of singular vectors it interpolates, ``n_cols``/``n_rows`` setting
            the number); clamped to min(m, n) with a warning.
        method: ``"leverage"`` (default), ``"linear_time"``, ``"cx"``, ``"deim"`` or ``"rx"``;
            see the module docstring for the algorithms.
        n_cols, n_rows: columns and rows to pick (expected counts for ``"leverage"``/``"cx"``,
            exact counts for ``"linear_time"`` (i.i.d., with repeats) and ``"deim"``); default
            ``rank``; must be >= ``rank``. The relative-error guarantee of leverage CUR needs
            several times ``rank``.
        seed: int or ``torch.Generator`` for the sampling methods.
        cov: the second moment Σ (n x n) of the inputs W multiplies, for the data-aware
            variant (module docstring); None: fit W itself.
        ridge: regulariser of Σ, relative to its mean diagonal, as :func:`svd`'s.
        entries: with ``cov``, the matrix (shaped as W) whose columns and rows C and R are,
            W being the map they are fitted to; default W itself.

    Returns:
        :class:`CURResult` with C, U, R, the picked indices (sorted for the Bernoulli methods,
        in pick order otherwise) and the relative Frobenius error (in the output norm with
        ``cov``). RX ignores ``n_cols``; fitted on data, linear-time keeps each sampled column
        and row once, unscaled (the fitted middle factor makes scaling moot).
    """
    check_tensor(W, "W", ndim=2)
    rank = check_rank(rank)
    check_choice(method, "method", CUR_METHODS)
    m, n = W.shape
    rank = clamp_rank(rank, min(m, n), why=f"min of the matrix shape {m}x{n}")
    n_cols = rank if n_cols is None else check_rank(n_cols, "n_cols")
    n_rows = rank if n_rows is None else check_rank(n_rows, "n_rows")
    for name, value in (("n_cols", n_cols), ("n_rows", n_rows)):
        if value < rank:
            raise ValueError(f"{name}: expected a count >= rank ({rank}), got {value}")
    limit = min(m, n) if method in _DEIM else None
    n_cols = clamp_rank(n_cols, limit or n, "n_cols", why="columns available")
    n_rows = clamp_rank(n_rows, limit or m, "n_rows", why="rows available")

    generator = make_generator(seed) if method not in _DEIM else None
    if entries is not None:
        check_tensor(entries, "entries", ndim=2)
        if entries.shape != W.shape:
            raise ValueError(f"entries: expected the shape of W {tuple(W.shape)}, got "
                             f"{tuple(entries.shape)}")
        if entries.device != W.device:  # (the factors are its rows and columns, taken at
            raise ValueError(f"entries: on {entries.device}, W on {W.device}; put both on "
                             "one device")  # indices computed on W's device)
        if cov is None:
            raise ValueError("entries: only the data-aware CUR (cov) fits one matrix with "
                             "another's entries")
    if cov is not None:
        check_positive(ridge, "ridge")
        return _data_aware_cur(W, rank, method, n_cols, n_rows, generator, cov, ridge,
                               W if entries is None else entries)
    R = row_idx = None
    if method == "linear_time":
        sq = W.pow(2)
        p, q = _distribution(sq.sum(dim=0)), _distribution(sq.sum(dim=1))
        col_idx = _sample_iid(p, n_cols, generator).to(W.device)
        row_idx = _sample_iid(q, n_rows, generator).to(W.device)
        col_scale = (n_cols * p[col_idx]).rsqrt()
        row_scale = (n_rows * q[row_idx]).rsqrt()
        C = W[:, col_idx] * col_scale
        R = W[row_idx] * row_scale[:, None]
        psi = C[row_idx] * row_scale[:, None]
        U = _truncated_pinv_gram(C, rank) @ psi.mT
    else:
        # only the leading singular vectors pick the columns and rows: a large matrix at a
        # small rank gets them from the randomized range finder (seeded) instead of a full SVD
        need = min(max(n_cols, n_rows) if method in _DEIM else rank, m, n)
        full = None if randomized_pays(m, n, need) else full_svd(W)
        Uw, _, Vh = full if full is not None else leading_singular_vectors(W, need, seed=0)
        if method == "rx":
            row_idx = _deim(Uw[:, :n_rows]).to(W.device)
            R = W[row_idx]
            X = W @ torch.linalg.pinv(R)
            return _result(W, None, X, R, None, row_idx, method)
        if method == "deim":
            col_idx = _deim(Vh[:n_cols].mT).to(W.device)
            row_idx = _deim(Uw[:, :n_rows]).to(W.device)
        else:
            col_idx = _leverage_select(Vh[:rank].mT, n_cols, generator).to(W.device)
            if method == "leverage":
                row_idx = _leverage_select(Uw[:, :rank], n_rows, generator).to(W.device)
        C = W[:, col_idx]
        R = None if row_idx is None else W[row_idx]
        if full is not None:
            U, rel_error = _core_from_svd(full, col_idx, row_idx)
            return CURResult(C=C, U=U, R=R, col_idx=col_idx, row_idx=row_idx,
                             rel_error=rel_error, method=method)
        U = torch.linalg.pinv(C) @ W
        if R is not None:
            U = U @ torch.linalg.pinv(R)

    return _result(W, C, U, R, col_idx, row_idx, method)


def _result(W, C, U, R, col_idx, row_idx, method) -> CURResult:
    """The CURResult of these factors, with its relative Frobenius error."""
    res = CURResult(C=C, U=U, R=R, col_idx=col_idx, row_idx=row_idx, rel_error=0.0,
                    method=method)
    norm = W.norm()
    rel_error = float((W - res.to_matrix()).norm() / norm) if norm > 0 else 0.0
    return CURResult(C=C, U=U, R=R, col_idx=col_idx, row_idx=row_idx, rel_error=rel_error,
                     method=method)


def _output_directions(W: torch.Tensor, cov: torch.Tensor, ridge: float):
    """(left singular vectors of W L, descending, the squared singular values, and the Gram's
    eigendecomposition (eigenvalues ascending, eigenvectors) or None), L Lᵀ = Σ + ridge: from
    the m x m Gram W Σ Wᵀ for a wide or square W (reused inside ``reuse_svds``, where the
    planner has formed it for the data-aware SVD), from W L for a tall one (reused there too:
    each rank of the planner's grid asks again; no Gram then)."""
    m, n = W.shape
    if m <= n:
        vals, vecs = _gram_eigh(W, cov, ridge)
        return vecs.flip(1), _squared_singular_values(vals), (vals, vecs)

    def directions():
        L = whitening_factor(cov, ridge, device=W.device)
        Uo, s, _ = torch.linalg.svd(W.double() @ L, full_matrices=False)
        return Uo, s.pow(2)

    return (*_reused(f"output directions {ridge!r}", [W, cov], directions), None)


def _data_aware_cur(W, rank, method, n_cols, n_rows, generator, cov, ridge, E) -> CURResult:
    """:func:`cur` with ``cov``: rows and columns of E picked for W's output on the inputs, the
    middle factor fitted in the output norm (module docstring)."""
    n = W.shape[1]
    check_tensor(cov, "cov", ndim=2)
    if cov.shape != (n, n):
        raise ValueError(f"cov: expected shape ({n}, {n}) (the input width of W), got "
                         f"{tuple(cov.shape)}")
    Wd, Ed = W.to(torch.float64), E.to(device=W.device, dtype=torch.float64)
    Uo, s2, gram = _output_directions(W, cov, ridge)
    total = float(s2.sum())
    row_idx = col_idx = None
    if method in _DEIM:
        row_idx = _deim(Uo[:, :n_rows])
    elif method == "leverage":
        row_idx = _leverage_select(Uo[:, :rank], n_rows, generator)
    elif method == "linear_time":  # rows by their output energy on the inputs
        energy = (Uo.pow(2) * s2).sum(dim=1)
        row_idx = torch.unique(_sample_iid(_distribution(energy), n_rows, generator))
    if method != "rx":
        # how each column of W reaches the output directions the inputs excite
        k = n_cols if method == "deim" else rank
        P = Uo[:, :k].mT @ Ed
        if method == "linear_time":
            p = P.pow(2).sum(dim=0)
            col_idx = torch.unique(_sample_iid(_distribution(p), n_cols, generator))
        else:
            _, _, Vp = torch.linalg.svd(P, full_matrices=False)
            vecs = Vp[:k].mT
            col_idx = (_deim(vecs) if method == "deim"
                       else _leverage_select(vecs[:, :rank], n_cols, generator))
    col_idx = None if col_idx is None else col_idx.to(W.device)
    row_idx = None if row_idx is None else row_idx.to(W.device)
    C = None if col_idx is None else Ed[:, col_idx]
    if row_idx is None:  # CX: C⁺ W is the optimum in any output norm; its error is what the
        # projection onto span(C) leaves of the output energy
        U = torch.linalg.pinv(C) @ Wd
        Q, sc, _ = torch.linalg.svd(C, full_matrices=False)
        Q = Q[:, sc > sc.max() * max(C.shape) * torch.finfo(sc.dtype).eps]  # a basis of span(C)
        kept = float((s2[: Uo.shape[1]] * (Uo.mT @ Q).pow(2).sum(dim=1)).sum())
        lost = max(total - kept, 0.0)
    else:
        R = Ed[row_idx]
        if E is W and gram is not None:
            # R's rows are W's: W (Σ + λI) Rᵀ and R (Σ + λI) Rᵀ are columns and a block of
            # the Gram G = V diag(vals) Vᵀ already decomposed, so no n x n x r product
            # (minutes per rank for a 4096 x 25,088 layer)
            vals, V = gram
            Vr = V[row_idx.to(V.device)]
            K, RSR = (V * vals) @ Vr.mT, (Vr * vals) @ Vr.mT
            RSR = (RSR + RSR.mT) / 2
        else:
            C64 = cov.to(device=W.device, dtype=torch.float64)
            # (Σ + λI) Rᵀ, n x r, Σ symmetrised as every other path takes it: ((Σ + Σᵀ)/2) Rᵀ
            # as two n x r products, not an n x n copy (two, with the sum: 10 GB for a
            # 25,088-wide classifier layer, which ran a 24 GB machine out of memory)
            SR = (C64 @ R.mT + (R @ C64).mT) / 2 + ridge_of(C64, ridge) * R.mT
            K, RSR = Wd @ SR, R @ SR  # W Σ Rᵀ, R Σ Rᵀ
        # the optimal map from the rows; R Σ Rᵀ's eigenvalues below √eps of its largest are
        # rounding (the Gram path reads them off an eigendecomposition accurate to eps·‖G‖):
        # inverted, they blew U up (1e6 on a rank-1 weight) and its float32 cast off the error
        X = K @ torch.linalg.pinv(RSR, hermitian=True,
                                  rtol=math.sqrt(torch.finfo(RSR.dtype).eps))
        U = X if C is None else torch.linalg.pinv(C) @ X
        A = X if C is None else C @ U
        # ||(W - A R) L||² = tr(W Σ Wᵀ) - 2 tr(A Kᵀ) + tr(A RΣRᵀ Aᵀ)
        lost = max(total - 2 * float((A * K).sum()) + float(((A @ RSR) * A).sum()), 0.0)
    rel_error = math.sqrt(lost / total) if total > 0 else 0.0
    dt = E.dtype
    return CURResult(C=None if C is None else E[:, col_idx], U=U.to(dt),
                     R=None if row_idx is None else E[row_idx], col_idx=col_idx,
                     row_idx=row_idx, rel_error=rel_error, method=method, data_aware=True)
