"""Truncated SVD of a matrix, exact or randomized, returned as two factors W ≈ A @ B.

The Eckart-Young theorem makes the rank-r truncated SVD the best rank-r approximation in the
Frobenius and spectral norms. For a Linear layer (out x in) the factors become two layers:
``in -> r`` with weight B and ``r -> out`` with weight A.

The randomized variant is Halko, Martinsson & Tropp (2011), "Finding structure with randomness"
(range finder with ``oversample`` extra columns and ``n_iter`` power iterations, as
:func:`torch.svd_lowrank`, but with its test matrix drawn on the CPU from the seed). Both
variants report the exact relative error: the exact one from the singular values (the
approximation is an orthogonal projection of W, so ||W - AB||² = ||W||² - Σ s_i²), the
randomized one from the residual itself (computed in float64).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .._fingerprint import update as _fingerprint
from ._checks import (
    check_choice,
    check_positive,
    check_rank,
    check_tensor,
    clamp_rank,
    make_generator,
)

SVD_METHODS = ("auto", "exact", "randomized")
BALANCES = ("sqrt", "left", "right")

# `method="auto"` switches to the randomized solver only where it is both faster and as accurate
# (oversampled by the rank, with `n_iter` power iterations): matrices whose short side is at
# least this long, at ranks up to this fraction of the short side.
_AUTO_MIN_SIDE = 1024
_AUTO_MAX_RANK_FRACTION = 0.125


@dataclass(frozen=True)
class SVDResult:
    """W ≈ A @ B with A (m x r), B (r x n); S the r leading singular values (descending)."""

    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor
    rel_error: float
    method: str

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def to_matrix(self) -> torch.Tensor:
        return self.A @ self.B


# Set by reuse_svds(): {"max": entries kept, "entries": OrderedDict(key -> result)}
_REUSED: dict | None = None


@contextlib.contextmanager
def reuse_svds(max_entries: int = 4):
    """Within the block, the full SVD of a matrix, its singular values alone
    (:func:`truncation_errors`: the spectrum the planner prices SVD ranks by) and the
    eigendecomposition of a data-aware layer's whitened Gram (:func:`whitened_gram`) that were
    computed before in it are reused, not computed again: entries keyed by the SHA-256 of the
    values (the matrix's, and the moment's), at most ``max_entries`` kept, the oldest dropped
    first. The factorizations are those made without it; a layer's spectrum is read off the
    kept eigendecomposition (``eigh``'s eigenvalues, which may differ from ``eigvalsh``'s in
    the last bits). For sweeps that factorize one layer at many ranks with one method
    after another (experiments/classifier_sweep.py): the exact SVD of a VGG's 4096 x 25,088
    classifier layer takes minutes on a CPU. Nested blocks share the outer one's entries; an
    inner block that asks for more keeps up to its ``max_entries`` while it runs (the oldest
    beyond the outer's are dropped when it ends)."""
    global _REUSED
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
        raise ValueError(f"max_entries: expected an int >= 0, got {max_entries!r}")
    outer = _REUSED
    if outer is None:
        _REUSED = {"max": max_entries, "entries": OrderedDict()}
        saved = None
    else:
        saved = outer["max"]
        outer["max"] = max(saved, max_entries)
    try:
        yield
    finally:
        if outer is not None:
            outer["max"] = saved
            while len(outer["entries"]) > saved:
                outer["entries"].popitem(last=False)
        _REUSED = outer


def _reused(kind: str, tensors, compute):
    """``compute()``, or what it gave before for the same ``kind`` and tensor values inside
    :func:`reuse_svds` (the cached tensors are shared: callers must not write into them)."""
    if _REUSED is None:
        return compute()
    h = hashlib.sha256(kind.encode())
    for t in tensors:
        h.update(str(t.device).encode())  # the same values on another device: another entry
        _fingerprint(h, t)
    key, entries = h.hexdigest(), _REUSED["entries"]
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    entries[key] = out = compute()
    while len(entries) > _REUSED["max"]:
        entries.popitem(last=False)
    return out


def full_svd(W: torch.Tensor):
    """torch.linalg.svd(W, full_matrices=False), reused inside :func:`reuse_svds` (the tensors
    are then shared: do not write into them)."""
    return _reused("svd", [W], lambda: torch.linalg.svd(W, full_matrices=False))


def canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """±1 per column of ``U``: the sign that makes the column's largest-magnitude entry
    positive. A singular pair (u, v) is only defined up to a common sign, which LAPACK,
    cuSOLVER and the randomized range finder each choose their own way; multiplying u and v by
    this sign gives one answer on every device and solver (as scikit-learn's svd_flip)."""
    if U.numel() == 0:
        return U.new_ones(U.shape[-1])
    pick = U.gather(0, U.abs().argmax(0, keepdim=True))[0]
    return torch.where(pick < 0, -1.0, 1.0).to(U.dtype)


def _split_singular_values(U, S, Vh, balance):
    sign = canonical_signs(U)
    U, Vh = U * sign, sign[:, None] * Vh
    if balance == "sqrt":
        root = S.sqrt()
        return U * root, root[:, None] * Vh
    if balance == "left":
        return U * S, Vh
    return U, S[:, None] * Vh


@torch.no_grad()
def svd(
    W: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    balance: str = "sqrt",
    oversample: int = 10,
    n_iter: int = 4,
    seed=0,
    cov: torch.Tensor | None = None,
    ridge: float = 1e-6,
) -> SVDResult:
    """Rank-``rank`` truncated SVD of the matrix ``W`` as ``W ≈ A @ B``.

    Args:
        W: a float32/float64 matrix (m x n), on any device.
        rank: the number of singular triplets kept; above ``min(m, n)`` it is clamped, with a
            :class:`RankClampWarning`.
        method: ``"exact"`` (LAPACK/cuSOLVER SVD), ``"randomized"`` (Halko et al.), or ``"auto"``
            (randomized, oversampled by at least the rank, only for large matrices at small rank,
            where it is faster at equal error).
        balance: where the singular values go: ``"sqrt"`` (A = U√S, B = √S Vᵀ, the default:
            both factors get the same scale, which suits fine-tuning), ``"left"`` (A = U S,
            B = Vᵀ) or ``"right"`` (A = U, B = S Vᵀ, the form of Mai et al.'s first layer).
        oversample, n_iter: randomized range finder's extra columns and power iterations.
        seed: seed (int or ``torch.Generator``) of the randomized variant's test matrix.
        cov: the second moment Σ = E[x xᵀ] (n x n) of the inputs W multiplies. Given, the
            factorization minimises the output error ||(W - AB) Σ^½||_F instead of the weight
            error: with L the Cholesky factor of Σ + ridge·mean(diag Σ)·I, AB = [W L]_r L⁻¹
            (the truncation-aware whitening of SVD-LLM). ``rel_error`` is then the relative
            output error ||(W - AB) L||_F / ||W L||_F.
        ridge: regulariser of Σ, relative to its mean diagonal (keeps L invertible).

    Returns:
        :class:`SVDResult` with factors, singular values and the exact relative Frobenius error.
    """
    check_tensor(W, "W", ndim=2)
    rank = check_rank(rank)
    check_choice(method, "method", SVD_METHODS)
    check_choice(balance, "balance", BALANCES)
    check_positive(oversample, "oversample", allow_zero=True, integer=True)
    check_positive(n_iter, "n_iter", allow_zero=True, integer=True)
    m, n = W.shape
    rank = clamp_rank(rank, min(m, n), why=f"min of the matrix shape {m}x{n}")
    if cov is not None:
        return _whitened_svd(W, rank, cov, ridge, balance)

    if method == "auto":
        method = "randomized" if randomized_pays(m, n, rank) else "exact"
        if method == "randomized":
            # Oversampling by the rank itself brings the error to within 1e-5 of the exact one
            # on trained-layer-like spectra while staying 2.5-6x faster (docs/decompose.md).
            oversample = max(oversample, rank)

    if method == "exact":
        U, S_all, Vh = full_svd(W)
        # (copies: inside reuse_svds these are the cache's tensors, which a caller writing
        # into a factor would otherwise change for every later use)
        U, S, Vh = U[:, :rank].clone(), S_all[:rank].clone(), Vh[:rank].clone()
        # The discarded singular values give the error without cancellation.
        norm = S_all.norm()
        rel_error = float(S_all[rank:].norm() / norm) if norm > 0 else 0.0
    else:
        U, S, Vh = _randomized(W, rank, oversample, n_iter, seed)
        rel_error = _residual(W, U * S, Vh)

    A, B = _split_singular_values(U, S, Vh, balance)
    return SVDResult(A=A, B=B, S=S, rel_error=rel_error, method=method)


def _residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: int = 256) -> float:
    """||W - A B|| / ||W||, summed in float64 a block of rows at a time (||W||² - Σ s² in
    float32 loses most of its digits when the error is small: 17x too high at 4e-5)."""
    err = total = 0.0
    Bd = B.double()
    for i in range(0, W.shape[0], rows):
        block = W[i:i + rows].double()
        err += float((block - A[i:i + rows].double() @ Bd).pow(2).sum())
        total += float(block.pow(2).sum())
    return math.sqrt(err / total) if total > 0 else 0.0


def randomized_pays(m: int, n: int, rank: int) -> bool:
    """Whether the leading ``rank`` singular triplets of an m x n matrix are cheaper from the
    randomized range finder (oversampled by the rank) than from a full SVD, at the same error:
    only for large matrices at small rank."""
    short = min(m, n)
    return short >= _AUTO_MIN_SIDE and rank <= _AUTO_MAX_RANK_FRACTION * short


def _randomized(W, rank, oversample, n_iter, seed):
    """The randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4: ``n_iter``
    power iterations, each re-orthonormalised) and the SVD of W projected on the range. The
    test matrix is drawn on the CPU from ``seed`` (torch.svd_lowrank draws it on W's device:
    a CUDA layer would get other numbers than the same layer on the CPU)."""
    m, n = W.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=make_generator(seed), dtype=torch.float64).to(W)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.mT @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)
    return (Q @ Ub[:, :rank]), S[:rank], Vh[:rank]


def leading_singular_vectors(W: torch.Tensor, k: int, seed=0):
    """(U_k, S_k, Vh_k): the ``k`` leading singular triplets of ``W``, by the randomized range
    finder (oversampled by k, 4 power iterations, seeded) where :func:`randomized_pays`, else
    by a full SVD."""
    if randomized_pays(*W.shape, k):
        return _randomized(W, k, k, 4, seed)
    U, S, Vh = full_svd(W)
    return U[:, :k], S[:k], Vh[:k]


def ridge_of(cov: torch.Tensor, ridge: float) -> float:
    """λ = ridge·mean(diag Σ) (at least ridge·1e-30): what :func:`regularised_moment` adds to
    the diagonal of a second moment Σ."""
    return ridge * float(cov.diagonal().to(torch.float64).mean().clamp_min(1e-30))


def regularised_moment(cov: torch.Tensor, ridge: float = 1e-6, device=None) -> torch.Tensor:
    """Σ + ridge·mean(diag Σ)·I (float64, symmetrised) for a second moment Σ: the matrix the
    data-aware factorizations measure output errors with."""
    C = cov.to(device=device or cov.device, dtype=torch.float64)
    C = (C + C.mT) / 2
    n = C.shape[0]
    return C + ridge_of(C, ridge) * torch.eye(n, dtype=C.dtype, device=C.device)


def whitening_factor(cov: torch.Tensor, ridge: float = 1e-6, device=None) -> torch.Tensor:
    """L (float64, lower triangular) with L Lᵀ = :func:`regularised_moment` of a second moment
    Σ: ||D L||_F is the output norm of a weight difference D on inputs with that moment."""
    return factorable_moment(cov, ridge, device)[1]


def factorable_moment(cov: torch.Tensor, ridge: float = 1e-6,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, L): :func:`regularised_moment` of ``cov`` (with the jitter below where rounding
    left it a hair short of positive definite) and its Cholesky factor, C = L Lᵀ; a matrix
    beyond that is no second moment, a ValueError."""
    C = regularised_moment(cov, ridge, device)
    L, info = torch.linalg.cholesky_ex(C)
    if bool(info):
        # a moment of fewer samples than features, summed in float32, has eigenvalues a
        # rounding below zero (about n·eps of the largest), which the ridge may not cover:
        # that much more on the diagonal; beyond it, Σ is not a second moment
        n = C.shape[0]
        top = float(torch.linalg.eigvalsh(C)[-1])
        jitter = n * torch.finfo(cov.dtype).eps * max(top, 1e-300)
        C = C + jitter * torch.eye(n, dtype=C.dtype, device=C.device)
        L, info = torch.linalg.cholesky_ex(C)
    if bool(info):
        raise ValueError("cov: not positive semi-definite (its Cholesky factorization failed "
                         "even with the ridge); pass a second-moment matrix E[x xᵀ]")
    return C, L


def whitened_gram(W: torch.Tensor, cov: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """W (Σ + ridge) Wᵀ (m x m, float64, symmetrised; the moment regularised as
    :func:`regularised_moment`): its eigenvalues are the squared singular values of W L and its
    eigenvectors the left singular vectors of W L (L Lᵀ = Σ + ridge). For a wide W (m < n, as
    most layers: a conv's S·kh·kw inputs, a classifier's 25,088) this replaces the n x n Cholesky
    factorization, the n x n product W L and the SVD of an m x n matrix by one m x n x n product,
    and needs no n x n copy of Σ. The Gram squares the spectrum: singular values below about
    1e-8 of the largest are not resolved (they are noise at that level either way)."""
    C = cov.to(device=W.device, dtype=torch.float64)
    Wd = W.to(torch.float64)
    eps = ridge_of(C, ridge)
    G = (Wd @ C) @ Wd.mT + eps * (Wd @ Wd.mT)
    return (G + G.mT) / 2


def _squared_singular_values(gram_eigenvalues: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of a :func:`whitened_gram` (ascending) as squared singular values
    (descending); a clearly negative one means Σ is not positive semi-definite: ValueError."""
    vals = gram_eigenvalues.flip(0)
    if float(vals[-1]) < -1e-9 * max(float(vals[0]), 1e-300):
        raise ValueError("cov: not positive semi-definite (W Σ Wᵀ has a negative eigenvalue); "
                         "pass a second-moment matrix E[x xᵀ]")
    return vals.clamp_min(0)


def _gram_eigh(W: torch.Tensor, cov: torch.Tensor, ridge: float):
    """torch.linalg.eigh of :func:`whitened_gram`, reused inside :func:`reuse_svds` (by the
    planner's pricing, :func:`whitened_spectrum`, and the factorization alike: the Gram of a
    4096 x 25,088 layer is minutes of float64 products on a CPU)."""
    return _reused(f"whitened gram {ridge!r}", [W, cov],
                   lambda: torch.linalg.eigh(whitened_gram(W, cov, ridge)))


def _wide_whitened_svd(W, rank, cov, ridge, balance) -> SVDResult:
    """:func:`_whitened_svd` from the m x m Gram W Σ Wᵀ (m < n): with W L = U S Vᵀ,
    S Vᵀ L⁻¹ = Uᵀ W, so the factors need neither L nor V."""
    vals, vecs = _gram_eigh(W, cov, ridge)
    Wd = W.to(torch.float64)  # after the Gram, whose own float64 copy is freed by then
    s2, vecs = _squared_singular_values(vals), vecs.flip(1)  # descending
    total = float(s2.sum())
    rel_error = math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0
    U, S = vecs[:, :rank], s2[:rank].sqrt()
    U = U * canonical_signs(U)
    # A = U a, B = a⁻¹ Uᵀ W with a = √S, S or 1 as the balance puts the singular values (a
    # zero singular value has Uᵀ W = 0: its row of B is 0)
    a = {"sqrt": S.sqrt(), "left": S, "right": torch.ones_like(S)}[balance]
    inv = torch.where(a > 0, 1 / a.clamp_min(1e-300), torch.zeros_like(a))
    A, B = U * a, inv[:, None] * (U.mT @ Wd)
    return SVDResult(A=A.to(W.dtype), B=B.to(W.dtype), S=S.to(W.dtype), rel_error=rel_error,
                     method="whitened")


def _whitened_svd(W, rank, cov, ridge, balance) -> SVDResult:
    n = W.shape[1]
    check_tensor(cov, "cov", ndim=2)
    if cov.shape != (n, n):
        raise ValueError(f"cov: expected shape ({n}, {n}) (the input width of W), got "
                         f"{tuple(cov.shape)}")
    check_positive(ridge, "ridge")
    if W.shape[0] < n:
        return _wide_whitened_svd(W, rank, cov, ridge, balance)
    L = whitening_factor(cov, ridge, device=W.device)
    U, S_all, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    U, S, Vh = U[:, :rank], S_all[:rank], Vh[:rank]
    norm = S_all.norm()
    rel_error = float(S_all[rank:].norm() / norm) if norm > 0 else 0.0
    A, BL = _split_singular_values(U, S, Vh, balance)
    B = torch.linalg.solve_triangular(L.mT, BL.mT, upper=True).mT  # B = (B L) L⁻¹
    return SVDResult(A=A.to(W.dtype), B=B.to(W.dtype), S=S.to(W.dtype), rel_error=rel_error,
                     method="whitened")


@torch.no_grad()
def truncation_errors(mats: list[torch.Tensor]) -> torch.Tensor:
    """err[r-1] = relative Frobenius error of keeping the r leading singular triplets of every
    matrix in ``mats`` (Eckart-Young: the tail energy of the singular values), r = 1..max."""
    if (isinstance(mats, torch.Tensor) or not mats
            or not all(isinstance(M, torch.Tensor) and M.ndim == 2 for M in mats)):
        raise ValueError(f"mats: expected a non-empty list of 2-D tensors, got "
                         f"{type(mats).__name__}")
    for i, M in enumerate(mats):  # finite float32/float64, not empty: as every other function
        check_tensor(M, f"mats[{i}]", ndim=2)
    return tail_errors([_reused("svdvals", [M], lambda M=M: torch.linalg.svdvals(M)).pow(2)
                        for M in mats])


@torch.no_grad()
def tail_errors(squared: list[torch.Tensor]) -> torch.Tensor:
    """:func:`truncation_errors` from each matrix's squared singular values (descending; their
    sum is the matrix's squared Frobenius norm)."""
    tails = []
    for s2 in squared:
        tail = s2.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i >= r} s_i²
        tails.append(torch.cat([tail[1:], tail.new_zeros(1)]))
    width = max(t.shape[0] for t in tails)
    tails = [torch.cat([t, t.new_zeros(width - t.shape[0])]) for t in tails]
    total = sum(s2.sum() for s2 in squared)
    summed = torch.stack(tails).sum(0)
    return (summed / total.clamp_min(1e-300)).clamp_min(0).sqrt()


@torch.no_grad()
def whitened_spectrum(W: torch.Tensor, cov: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """The squared singular values of W L (descending, float64; L Lᵀ = Σ + ridge): from the
    m x m :func:`whitened_gram` for a wide W, else from W L itself."""
    if W.shape[0] < W.shape[1]:
        vals = (torch.linalg.eigvalsh(whitened_gram(W, cov, ridge)) if _REUSED is None
                else _gram_eigh(W, cov, ridge)[0])  # the factorization will want the vectors
        return _squared_singular_values(vals)
    L = whitening_factor(cov, ridge, device=W.device)
    return torch.linalg.svdvals(W.to(torch.float64) @ L).pow(2)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least ``energy`` (a fraction) of the
    squared total."""
    if not isinstance(singular_values, torch.Tensor) or singular_values.ndim != 1:
        raise ValueError(f"singular_values: expected a 1-D tensor, got "
                         f"{type(singular_values).__name__}")
    if (isinstance(energy, bool) or not isinstance(energy, int | float)
            or not 0 < energy <= 1):  # (95 for 95%, or NaN: refused)
        raise ValueError(f"energy: expected a fraction in (0, 1], got {energy!r}")
    s2 = singular_values.double().pow(2)
    if not s2.numel() or float(s2.sum()) == 0:  # all zero: rank 1 keeps all there is
        return 1
    cum = s2.cumsum(0) / s2.sum()
    return min(int((cum < energy - 1e-12).sum()) + 1, len(s2))
